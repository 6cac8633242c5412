import dataclasses
import fnmatch
import json
import math
import os
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_frame
from torch import nn

import datasets
import evaluate
import export
import runtime
from checkpoint import inference_config, load_for_inference
from configs import format_config, get_config
from datasets import cityscapes_table
from distributed import Distributed
from evaluate import (
    confusion_update,
    crop_scores,
    eval_crop_size,
    iou_from_confusion,
    predict,
    predict_scores,
    sliding_scores,
)
from model import build_model, fold_batchnorm, inference_model
from transform import normalize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_iou_on_a_hand_built_example_with_absent_class_and_ignored_pixels():
    label = torch.tensor([0, 0, 1, 1, 255, 255, 1])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 3])
    confusion = confusion_update(torch.zeros((4, 4), dtype=torch.int64), pred, label)
    expected = torch.zeros((4, 4), dtype=torch.int64)
    expected[0, 0] = expected[0, 1] = 1  # truth 0: one right, one called 1
    expected[1, 1], expected[1, 3] = 2, 1  # truth 1: two right, one called 3; the ignored pixels count nowhere
    assert torch.equal(confusion, expected)
    iou, miou, accuracy = iou_from_confusion(confusion)
    # class 0: TP 1, FN 1, FP 0 -> 1/2; class 1: TP 2, FN 1, FP 1 -> 2/4; class 2: never in truth or
    # prediction (its only prediction is on an ignored pixel) -> not counted; class 3: FP 1 -> 0.
    assert iou[0].item() == pytest.approx(0.5) and iou[1].item() == pytest.approx(0.5)
    assert math.isnan(iou[2].item()) and iou[3].item() == 0.0
    assert miou == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert accuracy == pytest.approx(3 / 5)


class PixelModel(nn.Module):
    """Logits at a pixel depend only on that pixel: sliding crops must reproduce the whole image."""

    def __init__(self, classes=5, kernel=(1, 1)):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, kernel, padding=(kernel[0] // 2, kernel[1] // 2))

    def forward(self, x):
        return self.conv(x)


def test_sliding_crops_equal_whole_image_for_a_pixelwise_model():
    model, image = PixelModel(), torch.randn(1, 3, 50, 70)
    whole = model(image).softmax(1)[0]
    mean = sliding_scores(model, image, (32, 32), 2 / 3, 3, flip=False, fusion="mean")
    torch.testing.assert_close(mean, whole)
    # exp fusion adds overlapping crops: each pixel's scores are exp(p) times the number of crops covering it.
    added = sliding_scores(model, image, (32, 32), 2 / 3, 3, flip=False, fusion="exp")
    count = torch.zeros(50, 70)
    for y in (0, 18):  # written out: stride int(32 * 2/3) = 21; rows 0, then the last window ends at 50
        for x in (0, 21, 38):
            count[y:y + 32, x:x + 32] += 1
    torch.testing.assert_close(added, whole.exp() * count)
    assert torch.equal(added.argmax(0), whole.argmax(0))


def test_small_image_is_padded_to_the_crop():
    model, image = PixelModel(), torch.randn(1, 3, 20, 25)
    out = sliding_scores(model, image, (32, 32), 2 / 3, 4, flip=False, fusion="mean")
    assert out.shape == (5, 20, 25)
    torch.testing.assert_close(out, model(image).softmax(1)[0])


def test_bisenet_crops_are_placed_and_added_like_a_crop_by_crop_reference():
    model = build_model(get_config("synthetic", ["aux_heads=false"]), pretrained=False).eval()
    image = torch.randn(1, 3, 80, 100)
    with torch.no_grad():
        batched = sliding_scores(model, image, (48, 64), 2 / 3, 3, flip=True, fusion="exp")
        reference = torch.zeros(19, 80, 100)
        for y in (0, 32):  # stride int(48 * 2/3) = 32: 0, then 80 - 48 = 32
            for x in (0, 36):  # stride int(64 * 2/3) = 42 > 100 - 64 = 36: 0, then 36
                crop = image[:, :, y:y + 48, x:x + 64]
                p = model(crop).softmax(1)[0] + model(crop.flip(3)).softmax(1)[0].flip(2)
                reference[:, y:y + 48, x:x + 64] += p.exp()
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=1e-5)


def test_flip_is_undone_for_a_model_that_is_not_mirror_symmetric():
    model = PixelModel(kernel=(1, 3))
    mirrored = PixelModel(kernel=(1, 3))
    with torch.no_grad():
        mirrored.conv.weight.copy_(model.conv.weight.flip(3))  # flip(M(flip(x))) == M'(x), M' mirrored kernel
        mirrored.conv.bias.copy_(model.conv.bias)
        image = torch.randn(1, 3, 9, 13)
        got = crop_scores(model, image, flip=True, fusion="mean")
        expected = (model(image).softmax(1) + mirrored(image).softmax(1)) / 2  # mean fusion: the average
        assert not torch.allclose(model(image), mirrored(image))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("mode", ["msf", "mscf"])
def test_multi_scale_mean_fusion_gives_probabilities_at_the_original_size(mode):
    cfg = get_config("synthetic", ["eval_scales=0.5,0.75,1.3", "eval_crop=24,24", "eval_fusion=mean"])
    model, image = PixelModel(), torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        scores = predict_scores(model, image, cfg, mode)
    assert scores.shape == (5, 37, 53)
    # mean fusion averages probabilities (plain and mirrored, windows, scales): they sum to 1 at every pixel
    torch.testing.assert_close(scores.sum(0), torch.ones(37, 53))
    assert scores.min() >= 0


def seed_fusion(model, x):
    """The seed's per-window score, written out: exp(softmax(x) + mirror of softmax(mirror of x)), (C, h, w)."""
    plain = model(x).softmax(1)[0]
    mirrored = model(x.flip(3)).softmax(1)[0].flip(2)
    return (plain + mirrored).exp()


def resize(x, size):
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


def test_msf_with_exp_fusion_equals_the_seed_computation_written_out():
    cfg = get_config("synthetic", ["aux_heads=false", "eval_scales=0.5,1.0,1.25"])
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    image = torch.randn(1, 3, 40, 52)
    with torch.no_grad():
        got = predict_scores(model, image, cfg, "msf")
        # per scale: resize the image (40x52 -> 20x26, 40x52, 50x65), score it whole, resize back, add
        expected = sum(resize(seed_fusion(model, resize(image, size))[None], (40, 52))[0]
                       for size in ((20, 26), (40, 52), (50, 65)))
        assert not torch.allclose(model(image.flip(3)).flip(3), model(image), atol=1e-3)  # not flip-symmetric
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mscf_with_exp_fusion_equals_a_crop_by_crop_reference():
    cfg = get_config("synthetic", ["aux_heads=false", "eval_scales=0.5,0.75,1.25", "eval_crop=24,24", "eval_batch=3"])
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    image = torch.randn(1, 3, 40, 52)
    # Window origins per scale, written out: stride int(24 * 2/3) = 16 and a last window ending at the border.
    windows = {
        (20, 26): ([0], [0, 2]),  # 20 rows < 24: padded with zeros to 24; 26 columns: 0, then 26 - 24
        (30, 39): ([0, 6], [0, 15]),
        (50, 65): ([0, 16, 26], [0, 16, 32, 41]),
    }
    with torch.no_grad():
        got = predict_scores(model, image, cfg, "mscf")
        expected = torch.zeros(19, 40, 52)
        for (h, w), (rows, cols) in windows.items():
            x = resize(image, (h, w))
            if h < 24:
                x = torch.cat([x, torch.zeros(1, 3, 24 - h, w)], dim=2)
            scores = torch.zeros(19, max(h, 24), w)
            for y in rows:
                for x0 in cols:
                    scores[:, y:y + 24, x0:x0 + 24] += seed_fusion(model, x[:, :, y:y + 24, x0:x0 + 24])
            expected += resize(scores[None, :, :h, :w], (40, 52))[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_eval_crop_defaults_to_the_training_crop():
    cfg = get_config("synthetic", ["crop_size=96,128", "eval_crop=48,64"])
    assert eval_crop_size(cfg) == (48, 64)
    assert eval_crop_size(dataclasses.replace(cfg, eval_crop=())) == (96, 128)  # empty: "same as crop_size"


def test_a_model_elsewhere_is_copied_to_the_evaluation_device_and_left_where_it_is():
    model = PixelModel()
    net = inference_model(model, device=torch.device("meta"))  # the one other device a CPU-only machine has
    assert next(net.parameters()).device.type == "meta"
    assert next(model.parameters()).device.type == "cpu"


def test_tests_run_on_the_cpu_and_subprocesses_inherit_it():
    # conftest.py hides GPUs before torch is imported; torchrun and the scripts tests start get the same env
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()


def make_checkpoint(tmp_path, n_val=5, size=(40, 56), extra=()):
    root = str(tmp_path / "data")
    rng = np.random.default_rng(0)
    for i in range(n_val):
        write_frame(root, "val", "lindau" if i % 2 else "frankfurt", i,
                    rng.integers(0, 256, (*size, 3), dtype=np.uint8),
                    rng.choice([7, 8, 11, 21, 23, 26, 0], size=size).astype(np.uint8))
    cfg = get_config("synthetic", [f"data_root={root}", "eval_workers=0", *extra])
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False)
    path = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path, cfg, model


def test_saved_label_id_pngs_map_back_to_the_predicted_train_ids(tmp_path):
    _, cfg, model = make_checkpoint(tmp_path, n_val=2)
    save_dir = str(tmp_path / "pred")
    cfg = get_config(base=cfg.to_dict(), overrides=[f"save_dir={save_dir}", "save_color=true"])
    dataset = evaluate.eval_dataset(cfg)
    results = evaluate.evaluate(model, dataset, cfg, Distributed())
    # make_checkpoint writes frame 0 in frankfurt, frame 1 in lindau: the names the toolkit and the server expect
    expected = {"frankfurt": "frankfurt_000000_000019.png", "lindau": "lindau_000001_000019.png"}
    for kind in ("labelIds", "color"):
        assert sorted(os.listdir(os.path.join(save_dir, kind))) == sorted(expected)
        for city, name in expected.items():
            assert os.listdir(os.path.join(save_dir, kind, city)) == [name]
    confusion = torch.zeros((19, 19), dtype=torch.int64)
    for i, (city, name) in enumerate(expected.items()):
        # the official toolkit (csEvalPixelLevelSemanticLabeling, getPrediction) finds a ground-truth file's
        # prediction by this pattern, built from the ground truth's {city}_{seq}_{frame}
        gt = os.path.basename(dataset.samples[i][1])
        assert gt.endswith("_gtFine_labelIds.png")
        _, seq, frame = gt.split("_")[:3]
        assert fnmatch.filter(os.listdir(os.path.join(save_dir, "labelIds", city)), f"{city}_{seq}_{frame}*.png") \
            == [name]
        ids = cv2.imread(os.path.join(save_dir, "labelIds", city, name), cv2.IMREAD_UNCHANGED)
        color = cv2.imread(os.path.join(save_dir, "color", city, name))
        assert ids.dtype == np.uint8 and ids.shape == (40, 56) and color.shape == (40, 56, 3)
        assert set(np.unique(ids)) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
        with torch.no_grad():
            image = normalize(dataset[i][0][None], cfg.mean, cfg.std)
            pred = model.eval()(image).argmax(1)[0]
        # evaluate() runs the folded channels_last copy: float rounding may flip a near tie, nothing more
        saved = torch.from_numpy(cityscapes_table().to_class_ids(ids, name))
        assert (saved == pred).float().mean() >= 0.999
        confusion_update(confusion, saved, dataset[i][1])
    assert results["confusion"] == confusion.tolist()
    json.dumps(results, allow_nan=False)


def test_an_unwritable_prediction_is_an_error_naming_its_path(tmp_path):
    blocked = tmp_path / "pred" / "labelIds" / "lindau" / "lindau_000001_000019.png"
    blocked.mkdir(parents=True)  # a folder where the PNG should go: cv2.imwrite returns False
    with pytest.raises(OSError, match="lindau_000001_000019.png"):
        evaluate.save_prediction(str(tmp_path / "pred"), os.path.join("lindau", "lindau_000001_000019.png"),
                                 np.zeros((4, 6), np.uint8), cityscapes_table(), False)


def run_eval(args, env_extra=None, torchrun=False):
    env = {**os.environ, "PYTHONPATH": REPO, **(env_extra or {})}  # with conftest's CUDA_VISIBLE_DEVICES=""
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return subprocess.run(cmd + [os.path.join(REPO, "evaluate.py"), *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_two_process_torchrun_equals_one_process_on_an_odd_number_of_images(tmp_path):
    path, _, _ = make_checkpoint(tmp_path, n_val=5)
    single = run_eval(["--ckpt", path])
    assert single.returncode == 0, single.stderr
    result_path = os.path.join(tmp_path, "eval_val_ss.json")
    with open(result_path) as f:
        one = json.load(f)
    os.remove(result_path)
    double = run_eval(["--ckpt", path], torchrun=True)
    assert double.returncode == 0, double.stderr
    with open(result_path) as f:
        two = json.load(f)
    assert one["images"] == two["images"] == 5
    val = datasets.build_dataset(get_config("synthetic", [f"data_root={tmp_path / 'data'}"]), "val")
    assert np.sum(one["confusion"]) == 5 * 40 * 56 - sum((val[i][1] == 255).sum() for i in range(5))
    assert one["confusion"] == two["confusion"] and one["miou"] == two["miou"]
    assert "mIoU" in single.stdout and "road" in single.stdout
    # the resolved config: printed at start, and stored with the results
    cfg = get_config(base=torch.load(path, weights_only=True)["config"])
    assert single.stdout.startswith(format_config(cfg))
    assert one["config"] == json.loads(json.dumps(cfg.to_dict()))


def test_cli_errors_are_clear_and_non_zero(tmp_path, capsys):
    path, cfg, _ = make_checkpoint(tmp_path, n_val=1)
    cases = [
        (["--ckpt", str(tmp_path / "missing.pth")], "missing.pth"),
        (["--ckpt", path, "num_classes=5"], "checkpoint has 19 classes, config has 5 (num_classes)"),
        (["--ckpt", path, "arm=false"], "arm"),
        (["--ckpt", path, "mode=fast"], "expected one of ss, ssc, msf, mscf"),
        (["--ckpt", path, "val_split=train"], "no images found"),
    ]
    for argv, words in cases:
        assert evaluate.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err, (argv, err)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(64))
    assert evaluate.main(["--ckpt", str(garbage)]) == 2
    assert "garbage.pth" in capsys.readouterr().err


def test_modes_agree_with_ss_for_a_pixelwise_model():
    cfg = get_config("synthetic", ["eval_crop=16,16", "eval_fusion=mean"])
    model, image = PixelModel(), torch.randn(1, 3, 30, 40)
    with torch.no_grad():
        ss = predict_scores(model, image, cfg, "ss")
        ssc = predict_scores(model, image, cfg, "ssc")
    torch.testing.assert_close(ss, F.softmax(model(image), 1)[0].detach())
    torch.testing.assert_close(ssc, ss)


@pytest.mark.parametrize("mode", ["ss", "ssc", "msf"])
def test_predict_is_the_argmax_of_the_scores(mode):
    # predict() skips the softmax in ss and reduces with max(0): the same labels as argmax of predict_scores
    cfg = get_config("synthetic", ["aux_heads=false", "eval_crop=48,48", "eval_scales=0.75,1.0"])
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    image = torch.randn(1, 3, 61, 83)
    with torch.no_grad():
        expected = predict_scores(model, image, cfg, mode).argmax(0)
        got = predict(model, image, cfg, mode)
    assert got.shape == (61, 83) and got.dtype == torch.int64
    assert torch.equal(got, expected)


def strict_json(path):
    def refuse(name):
        raise ValueError(f"{name} in {path}: not valid JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_the_test_split_without_save_dir_is_refused_before_any_inference(tmp_path, capsys, monkeypatch):
    path, cfg, _ = make_checkpoint(tmp_path, n_val=1)
    write_frame(cfg.data_root, "test", "berlin", 0, np.zeros((40, 56, 3), np.uint8))  # no label: as published
    monkeypatch.setattr(evaluate, "predict", lambda *args: pytest.fail("inference ran"))
    assert evaluate.main(["--ckpt", path, "val_split=test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no labels" in err and "save_dir=DIR" in err
    assert sorted(os.listdir(tmp_path)) == ["data", "model.pth"]  # no results file


def test_the_test_split_is_predicted_not_scored(tmp_path, capsys):
    path, cfg, _ = make_checkpoint(tmp_path, n_val=1)
    for i, city in enumerate(("berlin", "bonn", "berlin")):
        write_frame(cfg.data_root, "test", city, i, np.random.default_rng(i).integers(0, 256, (40, 56, 3), np.uint8))
    save_dir = str(tmp_path / "submission")
    assert evaluate.main(["--ckpt", path, "val_split=test", f"save_dir={save_dir}"]) == 0
    out = capsys.readouterr().out
    assert "no labels" in out and os.path.join(save_dir, "labelIds") in out and "mIoU" not in out
    results = strict_json(tmp_path / "eval_test_ss.json")
    assert results["images"] == 3 and results["labels"] is False
    assert results["miou"] is None and results["pixel_accuracy"] is None and results["iou"] is None
    assert sorted(os.listdir(os.path.join(save_dir, "labelIds", "berlin"))) == \
        ["berlin_000000_000019.png", "berlin_000002_000019.png"]
    assert os.listdir(os.path.join(save_dir, "labelIds", "bonn")) == ["bonn_000001_000019.png"]


def test_a_split_whose_pixels_are_all_ignored_gives_strict_json_with_null_metrics(tmp_path, capsys):
    path, cfg, _ = make_checkpoint(tmp_path, n_val=1)
    label = os.path.join(cfg.data_root, "gtFine", "val", "frankfurt", "frankfurt_000000_000019_gtFine_labelIds.png")
    cv2.imwrite(label, np.zeros((40, 56), np.uint8))  # label id 0 (unlabeled): ignored everywhere
    assert evaluate.main(["--ckpt", path]) == 0
    results = strict_json(tmp_path / "eval_val_ss.json")
    assert results["miou"] is None and results["pixel_accuracy"] is None
    assert set(results["iou"].values()) == {None} and np.sum(results["confusion"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines if line.startswith(("mIoU", "pixel accuracy"))] == \
        [["pixel", "accuracy", "n/a"], ["mIoU", "n/a"]]


def test_an_unwritable_results_file_is_a_clear_error(tmp_path, capsys):
    path, _, _ = make_checkpoint(tmp_path, n_val=1)
    (tmp_path / "eval_val_ss.json").mkdir()  # a folder in the way: open() fails as on a read-only disk
    assert evaluate.main(["--ckpt", path]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert err.startswith("error:") and "eval_val_ss.json" in err


def test_a_different_upsample_than_the_checkpoints_is_warned_about(tmp_path, capsys):
    _, cfg, _ = make_checkpoint(tmp_path, n_val=1, extra=["upsample=bilinear"])
    # --config replaces the checkpoint's config: its upsample (nearest) loads silently into any checkpoint
    chosen = inference_config(cfg.to_dict(), "synthetic")
    assert chosen.upsample == "nearest"
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "upsample='nearest' (trained with 'bilinear')" in err
    inference_config(cfg.to_dict())  # the checkpoint's own: no warning
    assert capsys.readouterr().err == ""


def test_a_folder_dataset_is_scored_under_its_class_names_and_saved_in_its_own_values(tiny_folder, tmp_path):
    from conftest import FOLDER_OVERRIDES

    from datasets import build_dataset, class_table
    # label value 1 ignored and class 1 read from value 5: its predictions must be written as 5
    cfg = get_config("camvid", [*FOLDER_OVERRIDES, "label_remap=5:1,1:255", f"data_root={tiny_folder}",
                                f"save_dir={tmp_path / 'pred'}", "save_color=true", "eval_workers=0"])
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    results = evaluate.evaluate(model, evaluate.eval_dataset(cfg), cfg, Distributed())
    assert list(results["iou"]) == ["road", "tree", "car"]
    assert "road" in evaluate.format_results(results) and "car" in evaluate.format_results(results)
    colors = class_table(cfg).colors.tolist()
    assert colors == [[128, 64, 128], [128, 128, 0], [64, 0, 128]]
    seen = set()
    for name in ("frame00", "frame01"):
        values = cv2.imread(str(tmp_path / "pred" / "labelIds" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        color = cv2.cvtColor(cv2.imread(str(tmp_path / "pred" / "color" / f"{name}.png")), cv2.COLOR_BGR2RGB)
        for class_id, value in ((0, 0), (1, 5), (2, 2)):
            at = values == value
            assert (color[at] == colors[class_id]).all()
            seen.update([value] if at.any() else [])
        assert set(np.unique(values).tolist()) <= {0, 2, 5}
    assert seen  # something was predicted
    # the comparison picture: a row of titles over image | truth | prediction | legend, 4 white columns apart,
    # truth in the class colors
    picture = cv2.cvtColor(cv2.imread(str(tmp_path / "pred" / "compare" / "frame00.png")), cv2.COLOR_BGR2RGB)
    title, legend_w = evaluate.MIN_ROW, datasets.legend_layout(24, class_table(cfg).names)[-1]
    assert picture.shape == (title + 24, 3 * 32 + 12 + legend_w, 3)
    assert (picture[:title] < 128).any()  # the titles' text
    image, truth = build_dataset(cfg, "val")[0]
    assert np.array_equal(picture[title:, :32], image)
    assert np.array_equal(picture[title:, 36:68], class_table(cfg).colorize(truth))
    assert (picture[title:, 32:36] == 255).all()
    # the legend lists the classes of the truth and of the prediction (read back from its label-value PNG)
    values = cv2.imread(str(tmp_path / "pred" / "labelIds" / "frame00.png"), cv2.IMREAD_UNCHANGED)
    pred = class_table(cfg).lookup[values].astype(np.uint8)
    expected = datasets.legend(np.concatenate([truth.ravel(), pred.ravel()]), 24, class_table(cfg))
    assert np.array_equal(picture[title:, 3 * 32 + 12:], expected)


def test_evaluate_takes_a_dataset_with_its_evaluation_transform_and_leaves_it_as_it_is(tmp_path):
    _, cfg, model = make_checkpoint(tmp_path, n_val=1)
    dataset = evaluate.eval_dataset(cfg)
    transform = dataset.transform
    evaluate.evaluate(model, dataset, cfg, Distributed())
    assert dataset.transform is transform
    from datasets import build_dataset
    plain = build_dataset(cfg, "val")  # no transform: items are numpy arrays, which the model cannot take
    with pytest.raises(TypeError, match="eval_dataset"):
        evaluate.evaluate(model, plain, cfg, Distributed())
    assert plain.transform is None


def test_load_for_inference_reads_the_checkpoint_once_and_builds_its_config_without_aux_heads(tmp_path, monkeypatch):
    import checkpoint
    path, cfg, model = make_checkpoint(tmp_path, n_val=1, extra=["upsample=bilinear"])
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    loaded, got = checkpoint.load_for_inference(path, None, ["mode=msf", "eval_batch=3"])
    assert reads == [path]
    assert (got.upsample, got.eval_mode, got.eval_batch, got.aux_heads) == ("bilinear", "msf", 3, True)
    assert not loaded.training and loaded.aux8 is None and loaded.upsample == "bilinear"
    image = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), model.eval()(image), rtol=0, atol=0)


# ---- exported files: backend=openvino / onnxruntime ----

def export_files(ckpt):
    """model.onnx and model.xml next to the checkpoint, where export.py writes them by default."""
    model, _ = load_for_inference(ckpt)
    onnx_path = export.export_onnx(fold_batchnorm(model), export.default_output(ckpt, False), sample_hw=(64, 96))
    return onnx_path, export.export_openvino(onnx_path, export.openvino_paths(onnx_path)[0])


def read_predictions(save_dir):
    return {name: cv2.imread(os.path.join(save_dir, "labelIds", city, name), cv2.IMREAD_UNCHANGED)
            for city in sorted(os.listdir(os.path.join(save_dir, "labelIds")))
            for name in sorted(os.listdir(os.path.join(save_dir, "labelIds", city)))}


def test_exported_files_give_the_torch_predictions(tmp_path, capsys):
    path, _, _ = make_checkpoint(tmp_path, n_val=3)
    export_files(path)
    predictions, confusions = {}, {}
    for backend in ("torch", "openvino", "onnxruntime"):
        save_dir = str(tmp_path / backend)
        assert evaluate.main(["--ckpt", path, f"backend={backend}", f"save_dir={save_dir}"]) == 0, capsys.readouterr()
        predictions[backend] = read_predictions(save_dir)
        name = "eval_val_ss.json" if backend == "torch" else f"eval_val_ss_{backend}_model.json"
        confusions[backend] = np.array(strict_json(tmp_path / name)["confusion"])
    assert len(predictions["torch"]) == 3
    for backend in ("openvino", "onnxruntime"):
        assert predictions[backend].keys() == predictions["torch"].keys()
        same = [(predictions[backend][k] == v).mean() for k, v in predictions["torch"].items()]
        assert min(same) >= 0.999, (backend, same)
        # a pixel that changes class moves one count between two cells of the confusion matrix
        total = confusions["torch"].sum()
        assert np.abs(confusions[backend] - confusions["torch"]).sum() <= 2 * 0.001 * total
    # each backend's results file is its own: the torch model's was not replaced
    assert np.array_equal(strict_json(tmp_path / "eval_val_ss.json")["confusion"], confusions["torch"])


def test_eval_amp_with_an_exported_file_warns_that_it_applies_to_torch_only(tmp_path):
    path, _, _ = make_checkpoint(tmp_path, n_val=1)
    onnx_path, _ = export_files(path)
    model, cfg = load_for_inference(path, None, ["backend=onnxruntime", "eval_amp=bf16"])
    with pytest.warns(UserWarning, match="^eval_amp=bf16 applies to backend=torch only; the onnxruntime file runs"):
        loaded = runtime.load_model(cfg, path, model)
    assert isinstance(loaded, runtime.BackendModel) and loaded.path == onnx_path
    _, cfg = load_for_inference(path, None, ["backend=onnxruntime"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.load_model(cfg, path, model)


@pytest.mark.parametrize("mode", ["ssc", "msf", "mscf"])
def test_every_mode_runs_an_exported_file_like_the_torch_model(tmp_path, mode):
    path, _, _ = make_checkpoint(tmp_path, n_val=2)
    onnx_path, xml_path = export_files(path)
    model, cfg = load_for_inference(path, None, ["eval_crop=32,32", "eval_scales=0.75,1.25", "eval_batch=3"])
    dataset = evaluate.eval_dataset(cfg)
    expected = np.array(evaluate.evaluate(model, dataset, cfg, Distributed(), mode)["confusion"])
    for file, backend in ((xml_path, "openvino"), (onnx_path, "onnxruntime")):
        results = evaluate.evaluate(runtime.BackendModel(file, backend), dataset, cfg, Distributed(), mode)
        got = np.array(results["confusion"])
        assert results["mode"] == mode and got.sum() == expected.sum()
        assert np.abs(got - expected).sum() <= 2 * 0.001 * expected.sum(), backend


def test_a_missing_backend_model_is_one_line_naming_it(tmp_path, capsys):
    path, _, _ = make_checkpoint(tmp_path, n_val=1)
    for backend, args, missing in (("openvino", [], str(tmp_path / "model.xml")),
                                   ("onnxruntime", [f"backend_model={tmp_path / 'other.onnx'}"],
                                    str(tmp_path / "other.onnx"))):
        assert evaluate.main(["--ckpt", path, f"backend={backend}", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {backend} model not found: {missing};") and err.count("\n") == 1


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_a_missing_runtime_package_is_one_line_with_the_install_command(tmp_path, capsys, monkeypatch, backend):
    path, _, _ = make_checkpoint(tmp_path, n_val=1)
    monkeypatch.setitem(sys.modules, backend, None)  # makes `import openvino` / `import onnxruntime` fail
    assert evaluate.main(["--ckpt", path, f"backend={backend}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the {backend} package is needed") and err.count("\n") == 1
    assert err.strip().endswith("pip install -r requirements-deploy.txt")


def test_an_unknown_backend_is_refused(tmp_path, capsys):
    path, _, _ = make_checkpoint(tmp_path, n_val=1)
    assert evaluate.main(["--ckpt", path, "backend=tensorrt"]) == 2
    assert "bad value for backend: 'tensorrt'; expected one of torch, openvino, onnxruntime" in capsys.readouterr().err


# ---- hostile use: no wrong number, nothing lost ----

@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_an_exported_model_of_other_classes_is_refused_before_any_image(tmp_path, capsys, backend):
    """A 19-class checkpoint scored with an 11-class file: `label * n + pred` would land in wrong cells; one line
    naming the file and both counts, no number printed, no results file."""
    eleven, _, _ = make_checkpoint(tmp_path / "a", n_val=1, extra=("num_classes=11",))
    onnx_path, xml_path = export_files(eleven)
    nineteen, _, _ = make_checkpoint(tmp_path / "b", n_val=2)
    file = xml_path if backend == "openvino" else onnx_path
    assert evaluate.main(["--ckpt", nineteen, f"backend={backend}", f"backend_model={file}"]) == 2
    out, err = capsys.readouterr()
    assert err == (f"error: {file} outputs 11 classes, but the config has num_classes=19: it was exported from "
                   "another model; export this checkpoint (python export.py --ckpt CKPT)\n")
    assert "mIoU" not in out and not [n for n in os.listdir(tmp_path / "b") if n.startswith("eval_")]


@pytest.mark.parametrize("content, backend", [(b"not a model", "onnxruntime"), (b"<net>garbage", "openvino"),
                                              (None, "openvino"), ("xml", "onnxruntime")])
def test_a_corrupt_or_mismatched_exported_file_is_one_line(tmp_path, capsys, content, backend):
    path, _, _ = make_checkpoint(tmp_path, n_val=1)
    if content is None:  # an IR whose .bin is missing
        _, file = export_files(path)
        os.remove(file.replace(".xml", ".bin"))
    elif content == "xml":  # an OpenVINO IR given to onnxruntime
        _, file = export_files(path)
    else:
        file = str(tmp_path / ("bad.onnx" if backend == "onnxruntime" else "bad.xml"))
        with open(file, "wb") as f:
            f.write(content)
    assert evaluate.main(["--ckpt", path, f"backend={backend}", f"backend_model={file}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {backend} cannot load {file}: ") and err.count("\n") == 1 and "Traceback" not in err


def test_the_confusion_update_refuses_a_class_outside_the_matrix():
    confusion = torch.zeros((3, 3), dtype=torch.int64)
    label = torch.tensor([[0, 1], [2, 255]])
    evaluate.confusion_update(confusion, torch.tensor([[0, 2], [2, 7]]), label)  # 7 under ignore: not counted
    assert confusion.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    for bad in (3, -1):  # 1 * 3 + 3 would have counted as (2, 0), -1 as (0, 2)
        with pytest.raises(evaluate.ConfigError, match=f"a prediction holds class {bad}, outside 0..2"):
            evaluate.confusion_update(confusion, torch.tensor([[0, bad], [2, 0]]), label)
    assert confusion.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]  # unchanged by a refused update


def test_a_failed_results_write_keeps_the_earlier_file_and_names_it(tmp_path, capsys, monkeypatch):
    path, _, _ = make_checkpoint(tmp_path, n_val=1)
    assert evaluate.main(["--ckpt", path]) == 0
    results = tmp_path / "eval_val_ss.json"
    before = results.read_bytes()
    capsys.readouterr()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    assert evaluate.main(["--ckpt", path, "eval_fusion=mean"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line] == \
        [f"error: cannot write {results}: No space left on device"]
    assert results.read_bytes() == before and json.loads(before)["miou"] is not None
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # no temporary file left


@pytest.mark.parametrize("config, words", [
    ("list", "holds a config that is not a dict of settings (list)"),
    ("string_classes", "bad stored value for num_classes: '19' (str); expected an int"),
])
def test_a_checkpoint_with_a_malformed_config_is_one_line(tmp_path, capsys, config, words):
    path, cfg, model = make_checkpoint(tmp_path, n_val=1)
    stored = [1, 2] if config == "list" else {**cfg.to_dict(), "num_classes": "19"}
    torch.save({"model": model.state_dict(), "config": stored}, path)
    assert evaluate.main(["--ckpt", path]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and err.startswith("error: ")


@pytest.mark.parametrize("content", ["pickle", "truncated"])
def test_an_unreadable_checkpoint_is_one_line_that_never_advises_weights_only_false(tmp_path, capsys, content):
    import datetime

    path = tmp_path / "model.pth"
    if content == "pickle":  # objects a weights-only load refuses
        torch.save({"model": {"w": torch.zeros(1)}, "made": datetime.date(2026, 1, 1)}, path)
    else:
        torch.save({"model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:500])
    assert evaluate.main(["--ckpt", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read checkpoint {path}: ") and err.count("\n") == 1
    assert "weights_only" not in err and "cause above" not in err
    if content == "pickle":
        assert "a pickle, which could run code when loaded): refused" in err


def test_a_run_folder_given_as_ckpt_suggests_the_weights_inside(tmp_path, capsys):
    path, _, _ = make_checkpoint(tmp_path, n_val=1)
    os.rename(path, tmp_path / "model_final.pth")
    assert evaluate.main(["--ckpt", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path} is a folder, not a checkpoint; did you mean "
                                       f"{tmp_path / 'model_final.pth'}?\n")


def test_another_presets_model_for_a_checkpoint_says_to_leave_out_config(tmp_path, capsys):
    path, _, _ = make_checkpoint(tmp_path, n_val=1)  # BiSeNetV1, with its config stored
    assert evaluate.main(["--ckpt", path, "--config", "cityscapes_v2"]) == 2
    assert capsys.readouterr().err == ("error: the checkpoint was trained with arch='bisenetv1'; --config "
                                       "cityscapes_v2 builds arch='bisenetv2': leave out --config, the checkpoint's "
                                       "own config is used\n")


def test_a_quick_look_scores_the_first_images_and_an_exported_file_is_named_in_the_table(tmp_path, capsys):
    path, cfg, _ = make_checkpoint(tmp_path, n_val=3)
    onnx_path, _ = export_files(path)
    assert evaluate.main(["--ckpt", path, "eval_images=2", "backend=onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "(ss on 2 val images (eval_images: the first ones only), scored by onnxruntime model.onnx; mIoU" in out
    results = strict_json(tmp_path / "eval_val_ss_onnxruntime_model.json")
    assert results["images"] == 2 and results["scored_by"] == "onnxruntime model.onnx"
    dataset = evaluate.eval_dataset(cfg)  # the pixels scored: the labelled ones of the first two frames
    assert np.array(results["confusion"]).sum() == sum(int((dataset[i][1] != 255).sum()) for i in range(2))


def test_the_console_names_every_folder_of_saved_predictions(tmp_path, capsys):
    path, _, _ = make_checkpoint(tmp_path, n_val=1)
    save = tmp_path / "pred"
    assert evaluate.main(["--ckpt", path, f"save_dir={save}", "save_color=true"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("results: ")][-1]
    assert line.endswith(f"; predictions: {save / 'labelIds'}, {save / 'color'}, {save / 'compare'}")
    assert all((save / kind).is_dir() for kind in ("labelIds", "color", "compare"))


def test_scores_are_resized_into_the_sum_a_few_classes_at_a_time_as_one_resize_would():
    scores = torch.randn(40, 9, 13)
    whole = F.interpolate(scores[None], (20, 31), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(evaluate.add_resized(None, scores, (20, 31), chunk=16), whole)
    total = torch.ones(40, 20, 31)
    assert evaluate.add_resized(total, scores, (20, 31), chunk=7) is total  # added in place: no second full map
    torch.testing.assert_close(total, whole + 1)  # float rounding: the kernels differ by channel count


@pytest.mark.parametrize("mode", ["ss", "msf"])
def test_eval_short_side_scores_the_resized_image_and_resizes_its_scores_back(mode):
    # As CoinCheung's ADE20K evaluation: the short side to eval_short_side, the scores back to the label's size.
    model, image = PixelModel(classes=6, kernel=(3, 3)), torch.randn(1, 3, 30, 45)
    cfg = get_config("cityscapes", ["eval_short_side=20", "eval_scales=0.5,1.0", "eval_fusion=mean"])
    small = F.interpolate(image, (20, 30), mode="bilinear", align_corners=False)
    with torch.no_grad():
        if mode == "ss":  # the logits resized, as their ss
            expected = F.interpolate(model(small), (30, 45), mode="bilinear", align_corners=False)[0]
        else:  # each scale's probabilities (and the flipped image's) resized to the label's size, then averaged
            expected = 0
            for size in ((10, 15), (20, 30)):
                x = F.interpolate(small, size, mode="bilinear", align_corners=False) if size != (20, 30) else small
                probs = (model(x).softmax(1) + model(x.flip(-1)).softmax(1).flip(-1)) / 2
                expected = expected + F.interpolate(probs, (30, 45), mode="bilinear", align_corners=False)[0] / 2
        got = predict(model, image, cfg, mode)
    assert got.shape == (30, 45)
    assert torch.equal(got, expected.argmax(0))


def test_many_classes_print_the_best_and_worst_and_keep_every_class_in_the_json():
    names = [f"class {i}" for i in range(150)]
    iou = {name: (None if i == 7 else i / 200) for i, name in enumerate(names)}
    results = {"mode": "ss", "images": 2, "split": "validation", "labels": True, "config": {}, "iou": iou,
               "pixel_accuracy": 0.5, "miou": 0.37}
    lines = evaluate.format_results(results).splitlines()
    shown = [line.split()[0] + " " + line.split()[1] for line in lines[1:32]]
    # written out: the 15 highest IoU (149 down to 135), then the 15 lowest, the never-seen class 7 last
    assert shown[:15] == [f"class {i}" for i in range(149, 134, -1)]
    assert shown[15] == "(120 more)"
    assert shown[16:] == [f"class {i}" for i in [14, 13, 12, 11, 10, 9, 8, 6, 5, 4, 3, 2, 1, 0, 7]]
    assert "150 classes by IoU, every one in the results JSON" in lines[-1]
    assert len(results["iou"]) == 150  # the JSON keeps them all


def test_the_confusion_picture_of_many_classes_shows_those_with_the_lowest_iou(tmp_path, monkeypatch):
    import plots

    pytest.importorskip("matplotlib")
    drawn = {}
    monkeypatch.setattr(plots, "save", lambda fig, plt, path: drawn.setdefault("fig", fig))
    n = 150
    confusion = np.diag(np.arange(1, n + 1)).tolist()
    iou = {f"c{i}": ((i * 37) % n) / n for i in range(n)}  # a permutation of IoUs: the lowest are written out below
    results = {"split": "validation", "mode": "ss", "miou": 0.5, "confusion": confusion, "iou": iou, "config": {}}
    plots.plot_confusion(results, str(tmp_path / "confusion.png"))
    ax = drawn["fig"].axes[0]
    lowest = sorted(range(n), key=lambda i: (i * 37) % n)[:30]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"c{i}" for i in sorted(lowest)]
    assert "the 30 of 150 classes with the lowest IoU" in ax.get_title()
