import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import check_data
import evaluate
import train
from configs import get_config
from datasets import build_dataset, class_table, read_image

# Written out from the sources: ADE20K's labels 1..150 (objectInfo150), the COCO-Stuff README's 11 thing ids without
# annotations (labels.txt ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91, minus one in the stuffthingmaps).
COCO_UNUSED = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
COCO_IDS = [i for i in range(182) if i not in COCO_UNUSED]
ADE_EXPECTED = [255] + list(range(150)) + [-1] * 104 + [255]  # 0 ("other") and 255 ignored; 151..254 refused
COCO_EXPECTED = [COCO_IDS.index(v) if v in COCO_IDS else 255 if v in COCO_UNUSED else -1 for v in range(255)] + [255]
SIZES = [(40, 52), (48, 36), (44, 60)]  # (H, W), mixed, each over 183 pixels: every label value fits in each label
ADE = {"preset": "ade20k", "splits": {"training": ["ADE_train_00000001", "ADE_train_00000002", "ADE_train_00000010"],
                                      "validation": ["ADE_val_00000001", "ADE_val_00000007"]},
       "values": list(range(151)), "expected": ADE_EXPECTED}
COCO = {"preset": "cocostuff", "splits": {"train2017": ["000000000009", "000000000025", "000000000030"],
                                          "val2017": ["000000000139", "000000000285"]},
        "values": [*range(182), 255], "expected": COCO_EXPECTED}


def write_dataset(root, spec):
    """Images NAME.jpg of mixed sizes and labels NAME.png holding every label value of `spec`, in the layout both
    datasets unzip to: ROOT/images/{split}/ and ROOT/annotations/{split}/; written out of order."""
    for split, names in spec["splits"].items():
        for d in ("images", "annotations"):
            os.makedirs(os.path.join(root, d, split), exist_ok=True)
        for n, name in sorted(enumerate(names), key=lambda t: t[1], reverse=True):
            shape = SIZES[n % len(SIZES)]
            image = np.random.default_rng(n).integers(0, 256, (*shape, 3), dtype=np.uint8)
            cv2.imwrite(os.path.join(root, "images", split, name + ".jpg"), image)
            label = np.resize(np.roll(np.array(spec["values"], np.uint8), n), shape)
            cv2.imwrite(os.path.join(root, "annotations", split, name + ".png"), label)
    return root


@pytest.fixture(params=[ADE, COCO], ids=["ade20k", "cocostuff"])
def dataset(request, tmp_path):
    spec = request.param
    return spec, write_dataset(str(tmp_path / spec["preset"]), spec)


def test_each_split_pairs_images_and_labels_by_name_and_maps_labels_as_the_written_out_table(dataset):
    spec, root = dataset
    cfg = get_config(spec["preset"], [f"data_root={root}"])
    for split, names in spec["splits"].items():
        data = build_dataset(cfg, split)
        assert [data.name(i) for i in range(len(data))] == names
        for n, (image_path, label_path) in enumerate(data.samples):
            assert image_path == os.path.join(root, "images", split, names[n] + ".jpg")
            image, label = data[n]
            assert image.shape == (*SIZES[n], 3) and (image == read_image(image_path)).all()
            raw = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(label, np.array(spec["expected"])[raw])


def test_class_tables_hold_the_official_names_palettes_and_label_values():
    ade, coco = (class_table(get_config(name)) for name in ("ade20k", "cocostuff"))
    assert ade.lookup.tolist() == ADE_EXPECTED and coco.lookup.tolist() == COCO_EXPECTED
    assert len(ade.names) == 150 and ade.names[:4] == ("wall", "building", "sky", "floor") and ade.names[-1] == "flag"
    assert ade.names[7] == "bed" and ade.names[12] == "person"  # mmsegmentation writes "bed " with a trailing space
    assert len(coco.names) == 171 and coco.names[0] == "person" and coco.names[-1] == "wood"
    # stuffthingmaps id = labels.txt id - 1: id 12 is "stop sign" (class 11), 91 "banner" (class 80)
    assert coco.names[11] == "stop sign" and coco.names[80] == "banner"
    assert ade.colors.shape == (150, 3) and coco.colors.shape == (171, 3)
    assert [tuple(ade.colors[i]) for i in (0, 2, 149)] == [(120, 120, 120), (6, 230, 230), (92, 0, 255)]
    assert [tuple(coco.colors[i]) for i in (0, 2, 170)] == [(0, 192, 64), (0, 64, 96), (64, 64, 0)]
    # save_dir writes each class as its own label value, ignore as "other" (ADE20K) or 255 (COCO-Stuff)
    assert ade.values[:150].tolist() == list(range(1, 151)) and ade.values[255] == 0
    assert coco.values[:171].tolist() == COCO_IDS and coco.values[255] == 255


def test_other_num_classes_and_missing_data_are_one_clear_line(tmp_path, capsys):
    with pytest.raises(Exception, match="dataset=ade20k has 150 classes"):
        get_config("cityscapes", ["dataset=ade20k"])
    assert train.main(["--config", "cocostuff", f"data_root={tmp_path}", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "images/val2017" in err and "stuffthingmaps_trainval2017.zip" in err


def test_the_checker_names_a_corrupt_file_in_each_layout(dataset, capsys):
    spec, root = dataset
    split, names = next(iter(spec["splits"].items()))
    bad = os.path.join(root, "annotations", split, names[1] + ".png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    assert check_data.main(["--config", spec["preset"], f"data_root={root}"]) != 0
    assert bad in capsys.readouterr().out


TINY = ["pretrained=none", "amp=none", "crop_size=32,32", "batch_size=2", "max_iter=2", "warmup_iters=1",
        "log_every=1", "workers=0", "eval_workers=0", "eval_every=0", "eval_crop=32,32", "eval_scales=0.75,1.25"]


@pytest.mark.parametrize("arch", ["bisenetv1", "bisenetv2"])
def test_a_tiny_run_of_each_preset_trains_and_scores_mixed_sizes_in_every_mode(dataset, arch, tmp_path):
    # and under torchrun: 2 processes, each image at its own size, the same confusion matrix as one process
    spec, root = dataset
    preset = spec["preset"] + ("_v2" if arch == "bisenetv2" else "")
    args = ["--config", preset, f"data_root={root}", f"out_dir={tmp_path / 'runs'}", *TINY]
    assert train.main(args) == 0
    run = tmp_path / "runs" / preset
    n = len(class_table(get_config(preset)).names)
    val = build_dataset(get_config(preset, [f"data_root={root}"]), get_config(preset).val_split)
    scored = sum(int((val[i][1] != 255).sum()) for i in range(len(val)))
    for mode in ("ss", "ssc", "msf", "mscf"):
        assert evaluate.main(["--ckpt", str(run / "model_final.pth"), f"mode={mode}", "eval_workers=0",
                              "eval_short_side=24"]) == 0
        results = json.loads((run / f"eval_{get_config(preset).val_split}_{mode}.json").read_text())
        assert results["images"] == len(list(spec["splits"].values())[1]) and len(results["iou"]) == n
        assert np.array(results["confusion"]).sum() == scored  # every labelled pixel, each image at its own size
        if mode == "mscf" and arch == "bisenetv1":
            repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = {k: v for k, v in os.environ.items() if k != "RANK"} | {"PYTHONPATH": repo}
            os.remove(run / f"eval_{get_config(preset).val_split}_{mode}.json")
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                   os.path.join(repo, "evaluate.py"), "--ckpt", str(run / "model_final.pth"),
                                   f"mode={mode}", "eval_workers=0", "eval_short_side=24"],
                                  capture_output=True, text=True, env=env, timeout=300)
            assert done.returncode == 0, done.stderr
            two = json.loads((run / f"eval_{get_config(preset).val_split}_{mode}.json").read_text())
            assert two["confusion"] == results["confusion"] and two["miou"] == results["miou"]


def test_int8_export_calibrates_and_checks_on_images_of_mixed_sizes(tmp_path):
    # 150 classes through export: ONNX, OpenVINO, NNCF calibrated on training images of three sizes
    for package in ("onnx", "onnxruntime", "openvino", "nncf"):
        pytest.importorskip(package)
    import export

    root = write_dataset(str(tmp_path / "ade"), ADE)
    # 30 iterations: a model that has learnt something, whose argmax INT8 keeps (export checks >= 90% of pixels)
    assert train.main(["--config", "ade20k", f"data_root={root}", f"out_dir={tmp_path / 'runs'}", *TINY,
                       "max_iter=30", "warmup_iters=5"]) == 0
    ckpt = tmp_path / "runs" / "ade20k" / "model_final.pth"
    assert export.main(["--ckpt", str(ckpt), "--int8", "--calib-size", "3", "--check-size", "2"]) == 0
    assert (ckpt.parent / "model_int8.xml").is_file()
    assert evaluate.main(["--ckpt", str(ckpt), "backend=openvino", f"backend_model={ckpt.parent / 'model_int8.xml'}",
                          "eval_workers=0"]) == 0
    results = json.loads((ckpt.parent / "eval_validation_ss_openvino_model_int8.json").read_text())
    assert len(results["iou"]) == 150 and results["images"] == 2
