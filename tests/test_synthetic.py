"""The synthetic data set: Cityscapes layout and encoding, determinism, safety of real data, regeneration, one writer
per machine, and that it is not solvable from color alone."""

import re

import cv2
import numpy as np
import pytest

import checkpoint
import synthetic
from configs import get_config
from datasets import build_dataset

# labelId -> trainId, written out from the official cityscapesScripts table; every other id is ignored.
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
             27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
IMAGE_NAME = re.compile(r"leftImg8bit/(train|val)/([a-z]+)/\2_\d{6}_\d{6}_leftImg8bit\.png")
LABEL_NAME = re.compile(r"gtFine/(train|val)/([a-z]+)/\2_\d{6}_\d{6}_gtFine_labelIds\.png")
SIZE = (128, 256)


def to_train_ids(label_ids):
    table = np.full(256, 255, np.uint8)
    for label_id, train_id in TRAIN_IDS.items():
        table[label_id] = train_id
    return table[label_ids]


def label_path_of(root, image_path):
    """The gtFine file Cityscapes pairs with a leftImg8bit file."""
    relative = image_path.relative_to(root / "leftImg8bit")
    return root / "gtFine" / relative.parent / relative.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")


def read_pairs(root):
    """(image as stored, label ids) for every image, in name order."""
    pairs = []
    for image_path in sorted(root.glob("leftImg8bit/*/*/*.png")):
        image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(str(label_path_of(root, image_path)), cv2.IMREAD_UNCHANGED)
        pairs.append((image, label))
    return pairs


def file_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    synthetic.generate(root, n_train=8, n_val=4, size=SIZE, seed=0, progress=False)
    return root


def test_files_follow_the_cityscapes_layout(dataset):
    files = [p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file()]
    images = [f for f in files if IMAGE_NAME.fullmatch(f)]
    labels = [f for f in files if LABEL_NAME.fullmatch(f)]
    assert sorted(set(files) - set(images) - set(labels)) == ["SYNTHETIC"]
    assert len(images) == len(labels) == 12
    assert sum(f.startswith("leftImg8bit/train/") for f in images) == 8
    cities = {split: {IMAGE_NAME.fullmatch(f).group(2) for f in images if f.split("/")[1] == split}
              for split in ("train", "val")}
    assert len(cities["train"]) >= 2 and len(cities["val"]) >= 2 and not cities["train"] & cities["val"]
    for image in images:
        assert label_path_of(dataset, dataset / image).relative_to(dataset).as_posix() in labels
    marker = (dataset / "SYNTHETIC").read_text()
    assert "seed: 0" in marker and "train: 8" in marker and "val: 4" in marker


def test_images_are_8bit_color_and_labels_8bit_label_ids(dataset):
    for image, label in read_pairs(dataset):
        assert image.dtype == np.uint8 and image.shape == (*SIZE, 3)
        assert label.dtype == np.uint8 and label.shape == SIZE
        assert label.max() <= 33  # Cityscapes label ids are 0..33 (license plate, -1, is never stored)
        assert image.std() > 20  # a picture, not a flat fill


def test_most_train_classes_and_the_ignored_ids_appear(dataset):
    pairs = read_pairs(dataset)
    present = set(np.unique(np.concatenate([label.ravel() for _, label in pairs])).tolist())
    train_classes = {TRAIN_IDS[i] for i in present if i in TRAIN_IDS}
    assert len(train_classes) >= 12, sorted(train_classes)
    # unlabeled, ego vehicle, rectification border, out of roi, static, parking: ignored, as in the real data
    assert {0, 1, 2, 3, 4, 9} <= present, sorted(present)
    for _, label in pairs:  # ignored pixels stay a minority
        assert (to_train_ids(label) != 255).mean() > 0.7


def test_the_cityscapes_loader_reads_it_with_the_ignore_index(dataset):
    val = build_dataset(get_config("synthetic", [f"data_root={dataset}"]), "val")
    assert len(val) == 4
    labels = np.stack([val[i][1] for i in range(len(val))])
    assert set(np.unique(labels).tolist()) - {255} <= set(TRAIN_IDS.values())
    assert (labels == 255).any() and (labels != 255).mean() > 0.7


def test_color_alone_is_ambiguous_but_labels_are_structured(dataset):
    pairs = read_pairs(dataset)
    train_ids = np.concatenate([to_train_ids(label).ravel() for _, label in pairs])
    quantized = np.concatenate([(image >> 4).reshape(-1, 3).astype(np.int64) for image, _ in pairs])
    colors = quantized[:, 0] * 256 + quantized[:, 1] * 16 + quantized[:, 2]
    valid = train_ids != 255
    # The best classifier that sees only a pixel's color (16 levels per channel): the majority class of each color,
    # fitted and scored on the same pixels, so it is an upper bound for any color-only rule.
    counts = np.bincount(colors[valid] * 19 + train_ids[valid], minlength=4096 * 19).reshape(4096, 19)
    assert counts.max(axis=1).sum() / valid.sum() < 0.85
    for _, label in pairs:
        # Regions, not speckle: neighbours mostly share their label (random labels would agree about 1 time in 10).
        assert (label[:, 1:] == label[:, :-1]).mean() > 0.9
        rows = np.arange(label.shape[0])[:, None].repeat(label.shape[1], axis=1)
        if (label == 23).any() and (label == 7).any():
            assert rows[label == 23].mean() < rows[label == 7].mean()  # sky above road


def test_same_seed_gives_the_same_bytes_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synthetic.generate(tmp_path / name, n_train=2, n_val=1, size=(64, 128), seed=seed, progress=False)
    first, again, other = (file_bytes(tmp_path / name) for name in "abc")
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if name.endswith(".png"))


def test_an_image_does_not_depend_on_how_many_are_generated(tmp_path):
    synthetic.generate(tmp_path / "small", n_train=1, n_val=1, size=(64, 128), seed=0, progress=False)
    synthetic.generate(tmp_path / "large", n_train=3, n_val=2, size=(64, 128), seed=0, progress=False)
    small, large = file_bytes(tmp_path / "small"), file_bytes(tmp_path / "large")
    assert all(large[name] == data for name, data in small.items() if name.endswith(".png"))


def test_every_file_is_written_through_the_projects_atomic_write(tmp_path, monkeypatch):
    written = []

    def recording(path, write):
        written.append(str(path))
        checkpoint.write_atomically(path, write)

    monkeypatch.setattr(synthetic, "write_atomically", recording)
    synthetic.generate(tmp_path / "data", n_train=2, n_val=1, size=(64, 128), progress=False)
    files = {str(p) for p in (tmp_path / "data").rglob("*") if p.is_file()}
    assert files <= set(written) and len(files) == 7  # 3 images, 3 labels, the marker
    assert not any(".tmp" in name for name in files)


def test_ensure_synthetic_does_not_regenerate_when_the_marker_matches(tmp_path, monkeypatch):
    root = tmp_path / "data"
    assert synthetic.ensure_synthetic(root, 2, 1, (64, 128), seed=0)
    before = file_bytes(root)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although the marker matches")

    monkeypatch.setattr(synthetic, "generate", fail)
    assert not synthetic.ensure_synthetic(root, 2, 1, (64, 128), seed=0)
    assert file_bytes(root) == before


def test_ensure_synthetic_regenerates_for_other_settings_without_stale_files(tmp_path):
    root = tmp_path / "data"
    synthetic.ensure_synthetic(root, 3, 2, (64, 128), seed=0)
    assert synthetic.ensure_synthetic(root, 1, 1, (64, 128), seed=0)
    assert len(list(root.glob("leftImg8bit/train/*/*.png"))) == len(list(root.glob("gtFine/train/*/*.png"))) == 1
    assert len(list(root.glob("leftImg8bit/val/*/*.png"))) == 1
    assert "train: 1" in (root / "SYNTHETIC").read_text()


def test_a_folder_left_by_a_run_killed_while_writing_its_first_marker_is_still_ours(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "SYNTHETIC.partial.tmp4242").write_bytes(b"")
    assert synthetic.ensure_synthetic(root, 1, 1, (64, 128))
    assert sorted(p.name for p in root.iterdir()) == ["SYNTHETIC", "gtFine", "leftImg8bit"]


def test_real_data_is_never_written_into(tmp_path):
    root = tmp_path / "cityscapes"
    real = root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"a real image")
    with pytest.raises(FileExistsError, match="SYNTHETIC"):
        synthetic.ensure_synthetic(root, 2, 1, (64, 128))
    with pytest.raises(FileExistsError):
        synthetic.generate(root, 2, 1, (64, 128), progress=False)
    with pytest.raises(SystemExit, match="not empty"):
        synthetic.main(["--root", str(root), "--train", "1", "--val", "1", "--quiet"])
    assert [p.relative_to(root) for p in root.rglob("*") if p.is_file()] == [real.relative_to(root)]
    assert real.read_bytes() == b"a real image"


def test_an_interrupted_run_is_regenerated_and_leaves_no_stale_files(tmp_path, monkeypatch):
    root = tmp_path / "data"
    draw_scene, calls = synthetic.draw_scene, []

    def draw_then_crash(rng, size):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return draw_scene(rng, size)

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "draw_scene", draw_then_crash)
        with pytest.raises(KeyboardInterrupt):
            synthetic.ensure_synthetic(root, 3, 1, (64, 128))
    assert not (root / "SYNTHETIC").exists() and (root / "SYNTHETIC.partial").exists() and any(root.rglob("*.png"))
    # What a killed process would leave: temporary files of write_atomically, and an image of another run.
    for stale in ("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png.tmp4242", "SYNTHETIC.tmp4242",
                  "gtFine/val/lindau/lindau_000007_000019_gtFine_labelIds.png"):
        (root / stale).parent.mkdir(parents=True, exist_ok=True)
        (root / stale).write_bytes(b"stale")
    assert synthetic.ensure_synthetic(root, 3, 1, (64, 128))
    synthetic.generate(tmp_path / "clean", 3, 1, (64, 128), progress=False)
    assert file_bytes(root) == file_bytes(tmp_path / "clean")


def test_the_command_generates_once_and_then_leaves_the_data_set_as_it_is(tmp_path, capsys):
    """python synthetic.py --root DIR, run twice: the second run finds the same data set and writes nothing."""
    args = ["--root", str(tmp_path / "data"), "--train", "2", "--val", "1", "--size", "64", "128", "--quiet"]
    synthetic.main(args)
    assert "wrote 2 train + 1 val images" in capsys.readouterr().out
    before = file_bytes(tmp_path / "data")
    assert len([name for name in before if name.endswith(".png")]) == 6
    synthetic.main(args)
    assert capsys.readouterr().out == f"{tmp_path / 'data'} holds this synthetic data set already: nothing to write\n"
    assert file_bytes(tmp_path / "data") == before


def test_command_line(tmp_path, capsys):
    root = tmp_path / "cli"
    synthetic.main(["--root", str(root), "--train", "2", "--val", "1", "--size", "64", "128", "--seed", "5", "--quiet"])
    assert "wrote 2 train + 1 val images" in capsys.readouterr().out
    assert len(list(root.glob("leftImg8bit/*/*/*.png"))) == 3
    assert "seed: 5" in (root / "SYNTHETIC").read_text()
    with pytest.raises(SystemExit, match="size"):
        synthetic.main(["--root", str(tmp_path / "bad"), "--size", "8", "8", "--quiet"])


def test_an_unwritable_root_is_one_line(tmp_path, monkeypatch, capsys):
    def read_only(path, write):
        raise OSError(30, f"cannot write {path}: Read-only file system")

    monkeypatch.setattr(synthetic, "write_atomically", read_only)
    with pytest.raises(SystemExit) as end:
        synthetic.main(["--root", str(tmp_path / "data"), "--quiet", "--train", "1", "--val", "1"])
    assert str(end.value).startswith(f"error: cannot write the synthetic data in {tmp_path / 'data'}: cannot write ")
