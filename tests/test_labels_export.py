"""The labels model (export.py --argmax): uint8 BGR frames in, uint8 class ids out, checked on a tiny trained run
against PyTorch's own computation; and the programs that run such a file (runtime, evaluate.py, demo.py)."""

import json
import os
import warnings

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import colorize, copy_run

import demo
import evaluate
import export
import runtime
from checkpoint import load_for_inference
from configs import get_config
from distributed import Distributed
from model import build_model, fold_batchnorm
from transform import normalize

SIZES = ((64, 128), (67, 101))  # the run's image size, and one that 8 divides neither way


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """(checkpoint, unfolded model in eval mode, config, val images RGB) of a copy of the tiny trained run, with
    a labels file of each upsample beside the checkpoint: model_argmax.onnx (bilinear), model_half.onnx,
    model_nearest.onnx."""
    folder = copy_run(tiny_run, tmp_path_factory.mktemp("labels"))
    ckpt = str(folder / "model_final.pth")
    model, cfg = load_for_inference(ckpt)
    for name, upsample in (("model_argmax.onnx", "bilinear"), ("model_half.onnx", "half"),
                           ("model_nearest.onnx", "nearest")):
        labels = export.LabelsModel(fold_batchnorm(model), cfg.mean, cfg.std, upsample).eval()
        export.export_onnx(labels, str(folder / name), sample_hw=(64, 96))
    images = [image.numpy() for image, _ in evaluate.eval_dataset(cfg)]
    return ckpt, model, cfg, images


def frames_of(images, size):
    """The images resized to `size` (bilinear), as the BGR frames (1, H, W, 3) OpenCV decodes."""
    return [cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)[None, ..., ::-1].copy() for image in images]


def torch_logits(model, cfg, frame, **kwargs):
    """PyTorch's logits of a BGR frame (1, H, W, 3), normalized in Python as evaluation does (transform.normalize)."""
    with torch.no_grad():
        return model(normalize(torch.from_numpy(frame[..., ::-1].copy()), cfg.mean, cfg.std), **kwargs)


def expected_labels(model, cfg, frame):
    """argmax of the fp32 model's logits, bilinearly upsampled to the frame inside the model: evaluate.py's ss mode."""
    return torch_logits(model, cfg, frame).argmax(1).numpy()


def expected_nearest(model, cfg, frame):
    """argmax of the logits at the head's size (1/8, rounded up), each pixel taking the label of low-res pixel
    floor(i * h / H): nearest upsampling, written out in integers."""
    low = torch_logits(model, cfg, frame, resize_logits=False).argmax(1).numpy()
    (height, width), (h, w) = frame.shape[1:3], low.shape[1:]
    assert (h, w) == (-(-height // 8), -(-width // 8))
    return low[:, np.arange(height) * h // height][:, :, np.arange(width) * w // width]


def expected_half(model, cfg, frame):
    """argmax of the logits resized (bilinear) to half the frame, rounded up; pixel (i, j) takes the label of
    half-size pixel (i // 2, j // 2)."""
    low = torch_logits(model, cfg, frame, resize_logits=False)
    (height, width) = frame.shape[1:3]
    half = F.interpolate(low, ((height + 1) // 2, (width + 1) // 2), mode="bilinear", align_corners=False)
    return half.argmax(1).numpy().repeat(2, axis=1).repeat(2, axis=2)[:, :height, :width]


# --- the graph -----------------------------------------------------------------------------------------------------


def test_the_labels_graph_takes_uint8_frames_and_gives_uint8_labels(run):
    graph = onnx.load(run[0].replace("model_final.pth", "model_argmax.onnx")).graph
    [image], [labels] = graph.input, graph.output
    assert (image.name, labels.name) == ("image", "labels")
    assert image.type.tensor_type.elem_type == labels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    image_dims = [d.dim_value or d.dim_param for d in image.type.tensor_type.shape.dim]
    label_dims = [d.dim_param for d in labels.type.tensor_type.shape.dim]
    assert image_dims[3] == 3 and all(isinstance(d, str) for d in image_dims[:3]) and all(label_dims)


def test_the_graphs_normalization_equals_pythons(run):
    """The graph's first Add ends x * (1 / (255 std)) + (-mean / std): made an output, it equals transform.normalize
    of the frame turned to RGB, to the bit."""
    ckpt, _, cfg, images = run
    proto = onnx.load(ckpt.replace("model_final.pth", "model_argmax.onnx"))
    first_add = next(node for node in proto.graph.node if node.op_type == "Add")
    proto.graph.output.append(onnx.helper.make_tensor_value_info(first_add.output[0], onnx.TensorProto.FLOAT, None))
    path = ckpt.replace("model_final.pth", "probe.onnx")
    onnx.save(proto, path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for frame in frames_of(images[:1], SIZES[1]) + [np.random.default_rng(0).integers(0, 256, (2, 9, 13, 3), np.uint8)]:
        (normalized,) = session.run([first_add.output[0]], {"image": frame})
        expected = normalize(torch.from_numpy(frame[..., ::-1].copy()), cfg.mean, cfg.std).numpy()
        np.testing.assert_array_equal(normalized, expected)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("name, expected", [("model_argmax.onnx", expected_labels),  # bilinear
                                            ("model_half.onnx", expected_half)])
def test_fp32_labels_equal_their_computation_written_out(run, backend, name, expected):
    ckpt, model, cfg, images = run
    path = ckpt.replace("model_final.pth", name)
    if backend == "openvino":
        pytest.importorskip("openvino")
        path = export.export_openvino(path, path.replace(".onnx", ".xml"))
    file = runtime.BackendModel(path, backend)
    assert file.outputs_labels
    for size in SIZES:
        for frame in frames_of(images, size):
            labels = file.labels(frame)
            assert labels.dtype == torch.uint8 and labels.shape == frame.shape[:3]
            np.testing.assert_array_equal(labels.numpy(), expected(model, cfg, frame))


def test_low_resolution_logits_are_the_ones_the_model_upsamples(run):
    _, model, cfg, images = run
    frame = frames_of(images[:1], SIZES[1])[0]
    low, full = torch_logits(model, cfg, frame, resize_logits=False), torch_logits(model, cfg, frame)
    assert low.shape[2:] == (9, 13)
    torch.testing.assert_close(F.interpolate(low, SIZES[1], mode="bilinear", align_corners=False), full, rtol=0, atol=0)


def test_nearest_labels_are_the_low_resolution_argmax_upsampled(run):
    ckpt, model, cfg, images = run
    file = runtime.BackendModel(ckpt.replace("model_final.pth", "model_nearest.onnx"), "onnxruntime")
    for size in SIZES:
        for frame in frames_of(images, size):
            np.testing.assert_array_equal(file.labels(frame).numpy(), expected_nearest(model, cfg, frame))


def test_half_is_the_labels_models_default():
    args = export.parse_args(["--ckpt", "model_final.pth", "--argmax"])
    assert args.labels_upsample == "half"


def test_int8_labels_agree_with_fp32_on_99_percent_of_pixels(run, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    ckpt, model, cfg, images = run
    xml = export.export_openvino(ckpt.replace("model_final.pth", "model_argmax.onnx"), str(tmp_path / "fp32.xml"))
    calibration = export.SplitImages(cfg, cfg.train_split, 8, frames=True)
    assert all(x.dtype == np.uint8 and x.shape == (1, 64, 128, 3) for x in calibration)
    int8 = runtime.BackendModel(export.quantize_int8(xml, str(tmp_path / "int8.xml"), calibration), "openvino")
    frames = frames_of(images, SIZES[0])
    agreement = np.mean([(int8.labels(f).numpy() == expected_labels(model, cfg, f)).mean() for f in frames])
    assert agreement >= 0.99


def test_a_labels_model_refuses_more_than_255_classes_and_an_unknown_upsample():
    wide = nn.Conv2d(3, 256, 1)
    wide.arch = {"num_classes": 256}
    with pytest.raises(export.ExportError, match="uint8 class ids, but the model has 256 classes"):
        export.LabelsModel(wide, (0.5,) * 3, (0.25,) * 3)
    wide.arch = {"num_classes": 19}
    with pytest.raises(export.ExportError, match="labels upsample 'bicubic': expected one of half, bilinear, nearest"):
        export.LabelsModel(wide, (0.5,) * 3, (0.25,) * 3, "bicubic")


# --- the command line ----------------------------------------------------------------------------------------------


def test_cli_argmax_int8_writes_and_checks_the_labels_files(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "VERIFY_SIZES", ((67, 101),))  # the CPU cost of the check, not its meaning
    output = tmp_path / "labels.onnx"
    args = ["--ckpt", run[0], "--output", str(output), "--argmax", "--labels-upsample", "nearest", "--int8",
            "--calib-size", "4"]
    assert export.main(args) == 0, capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == ["labels.bin", "labels.onnx", "labels.xml", "labels_int8.bin",
                                            "labels_int8.xml"]
    out = capsys.readouterr().out
    # the fp32 files reproduce PyTorch's labels model on every pixel; INT8 is scored against PyTorch fp32's labels
    assert "onnxruntime vs PyTorch at 2x67x101x3: max abs logit diff n/a (labels), argmax agreement 100.000%" in out
    assert "OpenVINO vs PyTorch at 2x67x101x3: max abs logit diff n/a (labels), argmax agreement 100.000%" in out
    assert "OpenVINO INT8 vs PyTorch on 3 val images: mIoU" in out
    assert runtime.BackendModel(str(tmp_path / "labels_int8.xml"), "openvino").outputs_labels


def test_labels_upsample_without_argmax_is_one_usage_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--ckpt", "model_final.pth", "--labels-upsample", "nearest"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith("error: --labels-upsample nearest: it applies to the labels model; add "
                                            "--argmax\n")


# --- the programs that run a labels file ---------------------------------------------------------------------------


def test_evaluate_scores_a_labels_file_as_pytorch_scores_the_model(run, capsys):
    ckpt, model, cfg, _ = run
    dataset = evaluate.eval_dataset(cfg)
    expected = evaluate.evaluate(model, dataset, cfg, Distributed())["confusion"]
    file = ckpt.replace("model_final.pth", "model_argmax.onnx")
    assert evaluate.main(["--ckpt", ckpt, "backend=onnxruntime", f"backend_model={file}"]) == 0
    assert "scored by onnxruntime model_argmax.onnx" in capsys.readouterr().out
    with open(ckpt.replace("model_final.pth", "eval_val_ss_onnxruntime_model_argmax.json")) as f:
        results = json.load(f)
    assert results["confusion"] == expected  # the labels agree on every pixel (above), so every count does


@pytest.mark.parametrize("override", ["mode=msf", "eval_short_side=32"])
def test_a_labels_file_outside_ss_at_its_own_size_is_one_line(run, capsys, override):
    ckpt = run[0]
    file = ckpt.replace("model_final.pth", "model_argmax.onnx")
    assert evaluate.main(["--ckpt", ckpt, "backend=onnxruntime", f"backend_model={file}", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {file} outputs labels (export.py --argmax), which score in mode=ss")
    assert err.count("\n") == 1 and "export the logits (without --argmax)" in err


def test_demo_draws_a_labels_files_segmentation(run, tmp_path):
    ckpt, model, cfg, images = run
    image = images[0]
    path = str(tmp_path / "street.png")
    cv2.imwrite(path, np.ascontiguousarray(image[..., ::-1]))
    file = ckpt.replace("model_final.pth", "model_argmax.onnx")
    assert demo.main(["--ckpt", ckpt, path, "--out", str(tmp_path / "out"), "backend=onnxruntime",
                      f"backend_model={file}"]) == 0
    color = cv2.imread(str(tmp_path / "out" / "street_color.png"))[..., ::-1]
    expected = expected_labels(model, cfg, image[None, ..., ::-1].copy())[0]
    assert np.array_equal(color[:, :image.shape[1]], colorize(expected))


def test_a_video_through_the_openvino_labels_file_gives_every_frame_in_order(run, tmp_path):
    """demo.py on a video with the labels IR compiled for throughput (frames segmented at once on every CPU with more
    than one stream): every frame written, each the segmentation of its own input frame, in the input's order."""
    ckpt, model, cfg, images = run
    xml = export.export_openvino(ckpt.replace("model_final.pth", "model_argmax.onnx"), str(tmp_path / "labels.xml"))
    frames = [np.roll(images[i % len(images)], 9 * i, axis=1) for i in range(8)]  # RGB, each unlike the others
    video = tmp_path / "drive.avi"
    writer = cv2.VideoWriter(str(video), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), 10,
                             frames[0].shape[1::-1])
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()
    out = tmp_path / "out"
    assert demo.main(["--ckpt", ckpt, str(video), "--out", str(out), "backend=openvino", f"backend_model={xml}"]) == 0
    decoded, written = (read_frames(path) for path in (video, out / "drive_color.mp4"))
    assert len(written) == len(decoded) == 8
    width = frames[0].shape[1]
    expected = [colorize(expected_labels(model, cfg, frame[None]).astype(np.uint8)[0]) for frame in decoded]
    for i, picture in enumerate(written):  # compression moves colors a little; another frame's map moves them more
        errors = [np.abs(picture[:, :width, ::-1].astype(int) - e).mean() for e in expected]
        assert int(np.argmin(errors)) == i, errors


def read_frames(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while (frame := capture.read())[0]:
        frames.append(frame[1])
    capture.release()
    return frames


def test_a_labels_file_is_not_called_like_the_model_and_an_old_one_is_refused(run, tmp_path):
    ckpt, model, _, _ = run
    file = runtime.BackendModel(ckpt.replace("model_final.pth", "model_argmax.onnx"), "onnxruntime")
    with pytest.raises(runtime.BackendError, match="outputs labels .* of uint8 BGR frames: call labels()"):
        file(torch.zeros(1, 3, 16, 16))

    class OldArgmax(nn.Module):  # what export.py --argmax wrote before: float images in, int64 labels out
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).argmax(1)

    old = str(tmp_path / "old_argmax.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, as export.py uses
        torch.onnx.export(OldArgmax().eval(), (torch.randn(1, 3, 32, 32),), old, dynamo=False, input_names=["image"],
                          output_names=["labels"], dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}})
    with pytest.raises(runtime.BackendError, match="old_argmax.onnx outputs labels but takes input of shape "
                                                   r"\(\?, 3, \?, \?\), not uint8 frames"):
        runtime.BackendModel(old, "onnxruntime")


@pytest.mark.parametrize("arch", ["bisenetv1", "bisenetv2"])
@pytest.mark.parametrize("upsample", export.LABELS_UPSAMPLES)
def test_both_architectures_export_every_upsample(tmp_path, arch, upsample):
    """Random weights, so near ties: the export's own threshold against PyTorch's labels model of the same upsample."""
    torch.manual_seed(0)
    cfg = get_config("synthetic", ["aux_heads=false", f"arch={arch}"])
    model = build_model(cfg, pretrained=False).eval()
    labels = export.LabelsModel(fold_batchnorm(model), cfg.mean, cfg.std, upsample).eval()
    path = export.export_onnx(labels, str(tmp_path / "labels.onnx"), sample_hw=(64, 96))
    reference = export.LabelsModel(model, cfg.mean, cfg.std, upsample).eval()
    report = export.verify(runtime.onnxruntime_runner(path), reference, [(67, 101)])
    export.check_report(path, report)
