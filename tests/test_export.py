"""BatchNorm folding, ONNX and OpenVINO (fp32, INT8) export, checked against the unfolded PyTorch model (CPU, small
inputs)."""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
import torch
import torch.nn as nn
from conftest import randomize_batchnorm

import export
import precision
import runtime
from configs import PRESETS, get_config
from evaluate import eval_dataset
from model import ConvBNReLU, build_model, fold_batchnorm, inference_model
from precision import autocast_dtype
from transform import normalize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLD_PRESETS = ["synthetic"] + [name for name in PRESETS if name.startswith("ablation_")]
EXPORT_HW = (64, 96)


def make_model(name="synthetic", *overrides):
    torch.manual_seed(0)
    cfg = get_config(name, ["aux_heads=false", *overrides])
    return randomize_batchnorm(build_model(cfg, pretrained=False)).eval()


def count_batchnorms(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def torch_logits(model, image):
    with torch.no_grad():
        return model(image).numpy()


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def onnx_files(model, tmp_path_factory):
    """One logits file and one labels file (bilinear), both traced at EXPORT_HW from the folded model."""
    folder = tmp_path_factory.mktemp("onnx")
    folded = fold_batchnorm(model)
    logits = export.export_onnx(folded, str(folder / "model.onnx"), sample_hw=EXPORT_HW)
    labels = export.export_onnx(labels_model(folded), str(folder / "model_argmax.onnx"), sample_hw=EXPORT_HW)
    return logits, labels


def labels_model(model):
    cfg = get_config("synthetic")
    return export.LabelsModel(model, cfg.mean, cfg.std, "bilinear").eval()


def frames_and_images(shape, seed):
    """Random uint8 BGR frames (N, H, W, 3) and the same images normalized in Python (N, 3, H, W)."""
    cfg = get_config("synthetic")
    frames = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return frames.numpy(), normalize(frames.flip(-1), cfg.mean, cfg.std)


# --- folding -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FOLD_PRESETS)
def test_folded_model_matches_unfolded(name):
    model = make_model(name)
    folded = fold_batchnorm(model)
    image = torch.randn(1, 3, 67, 101, generator=torch.Generator().manual_seed(1))
    assert count_batchnorms(folded) == 0
    assert count_batchnorms(model) > 0  # the original is left as it was
    np.testing.assert_allclose(torch_logits(folded, image), torch_logits(model, image), atol=1e-4, rtol=0)


def test_inference_model_is_folded_channels_last_and_matches_the_model():
    model = make_model().train()
    fast = inference_model(model)
    assert count_batchnorms(fast) == 0 and not fast.training
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.kernel_size != (1, 1))
    assert model.training and count_batchnorms(model) > 0  # the original is left as it was
    image = torch.randn(2, 3, 67, 101, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(torch_logits(fast, image), torch_logits(model.eval(), image), atol=1e-4, rtol=0)


def test_eval_amp_falls_back_to_fp32_with_a_warning_where_the_hardware_lacks_it(monkeypatch):
    cpu = torch.device("cpu")
    assert autocast_dtype("none", cpu) is None
    with pytest.warns(UserWarning, match="eval_amp=fp16: cpu has no native fp16; running fp32"):
        assert autocast_dtype("fp16", cpu) is None
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert autocast_dtype("bf16", cpu) is None
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert autocast_dtype("bf16", cpu) == torch.bfloat16


def test_bf16_inference_model_gives_float_logits_close_to_fp32(monkeypatch):
    # bf16 autocast runs on any CPU (emulated where not native), so its numbers can be checked everywhere
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    model = make_model()
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fp32, bf16 = inference_model(model)(image), inference_model(model, "bf16")(image)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert not torch.equal(bf16, fp32)  # it did run in bf16
    # bf16 keeps 8 bits of mantissa: a few hundredths on logits of this size, and the same labels almost everywhere
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()
    assert (bf16.argmax(1) == fp32.argmax(1)).float().mean() > 0.98


def test_folding_also_removes_sync_batchnorm():
    # train.py converts to SyncBatchNorm under multi-GPU torchrun; the final evaluation folds that model
    model = make_model()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(make_model())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    folded = fold_batchnorm(synced)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    image = torch.randn(1, 3, 67, 101, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(torch_logits(folded, image), torch_logits(model, image), atol=1e-4, rtol=0)


def test_fold_keeps_an_existing_conv_bias_and_returns_eval_mode():
    block = randomize_batchnorm(ConvBNReLU(3, 5, 3))
    block.conv.bias = nn.Parameter(torch.randn(5))
    folded = fold_batchnorm(block.train())
    image = torch.randn(2, 3, 9, 11)
    # the formula written out: BN(conv(x) + b) = conv(x) * s + (b - mean) * s + beta, with s = gamma / sqrt(var + eps)
    bn = block.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    expected = torch.relu(
        nn.functional.conv2d(image, block.conv.weight, None, 1, 1) * scale[:, None, None]
        + ((block.conv.bias - bn.running_mean) * scale + bn.bias)[:, None, None]
    )
    assert not folded.training and isinstance(folded.bn, nn.Identity)
    torch.testing.assert_close(folded(image), expected.detach(), atol=1e-5, rtol=0)


# --- ONNX ----------------------------------------------------------------------------------------------------------


def test_onnx_graph_has_dynamic_batch_height_and_width_and_opset_17_or_newer(onnx_files):
    files = ((onnx_files[0], "logits", (0, 2, 3), 4), (onnx_files[1], "labels", (0, 1, 2), 3))
    for path, name, image_axes, rank in files:
        proto = onnx.load(path, load_external_data=False)
        opsets = {o.domain: o.version for o in proto.opset_import}
        assert opsets.get("", opsets.get("ai.onnx", 0)) >= 17  # the default ONNX domain is "" (or "ai.onnx")
        graph = proto.graph
        assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == [name]
        image_dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
        output_dims = [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim]
        assert all(image_dims[i] for i in image_axes)  # symbolic, not fixed numbers
        assert len(output_dims) == rank and all(output_dims[i] for i in (0, rank - 2, rank - 1))


@pytest.mark.parametrize("shape", [(1, 3, 67, 101), (2, 3, 80, 112)])
def test_onnx_logits_match_pytorch_at_other_sizes(model, onnx_files, shape):
    image = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    session = ort.InferenceSession(onnx_files[0], providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": image.numpy()})
    expected = torch_logits(model, image)  # the unfolded model: covers folding and export together
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() < 1e-4
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.999


def test_onnx_argmax_file_gives_uint8_train_ids_of_uint8_frames(model, onnx_files):
    frames, image = frames_and_images((1, 67, 101, 3), 3)
    session = ort.InferenceSession(onnx_files[1], providers=["CPUExecutionProvider"])
    (labels,) = session.run(None, {"image": frames})
    assert labels.dtype == np.uint8 and labels.shape == (1, 67, 101)
    assert (labels == torch_logits(model, image).argmax(1)).mean() >= 0.999


def test_verify_reports_the_worst_figures_of_an_onnx_file(model, onnx_files):
    report = export.verify(runtime.onnxruntime_runner(onnx_files[0]), model, [(67, 101), (80, 112)])
    assert [r["size"] for r in report["sizes"]] == [[1, 3, 67, 101], [1, 3, 80, 112]]
    assert report["max_abs_diff"] == max(r["max_abs_diff"] for r in report["sizes"]) < 1e-4
    assert report["argmax_agreement"] >= 0.999
    labels_report = export.verify(runtime.onnxruntime_runner(onnx_files[1]), labels_model(model), [(67, 101)])
    assert labels_report["sizes"][0]["size"] == [1, 67, 101, 3]  # random uint8 frames, what the file takes
    assert labels_report["max_abs_diff"] is None and labels_report["argmax_agreement"] >= 0.999


class OffsetRunner:
    """A runtime stand-in whose "logits" are PyTorch's plus `offset` at one element."""

    def __init__(self, model, offset):
        self.model, self.offset = model, offset

    def __call__(self, image):
        logits = torch_logits(self.model, torch.from_numpy(image))
        logits.reshape(-1)[7] += self.offset
        return logits


@pytest.mark.parametrize("factor, passes", [(0.9, True), (1.1, False)])
def test_the_export_check_allows_1e_4_plus_1e_5_of_the_largest_logit(model, factor, passes):
    image = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(4))
    tolerance = 1e-4 + 1e-5 * np.abs(torch_logits(model, image)).max()  # the rule, written out
    result = export._compare(OffsetRunner(model, factor * tolerance), model, image)
    assert result["max_abs_diff"] == pytest.approx(factor * tolerance, rel=1e-3)
    assert result["within_tolerance"] is passes
    report = {"max_abs_diff": result["max_abs_diff"], "within_tolerance": passes, "argmax_agreement": 1.0}
    if passes:
        export.check_report("model.onnx", report)
    else:
        with pytest.raises(export.ExportError, match="model.onnx does not match PyTorch"):
            export.check_report("model.onnx", report)


def test_missing_onnxruntime_is_named(model, onnx_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(runtime.BackendError, match="onnxruntime.*pip install -r requirements-deploy.txt"):
        export.verify(runtime.onnxruntime_runner(onnx_files[0]), model, [(67, 101)])


# --- OpenVINO ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ir_file(onnx_files):
    return export.export_openvino(onnx_files[0], onnx_files[0].replace(".onnx", ".xml"))


def openvino_logits(path, image):
    """The IR run on the CPU in f32, compiled as every OpenVINO file is (runtime.openvino_runner): OpenVINO's default
    on CPUs with native bf16 (AVX512-BF16, AMX) would be bf16."""
    return runtime.openvino_runner(path)(image.numpy())


def test_ir_is_fp32_with_dynamic_batch_height_and_width(ir_file):
    assert os.path.isfile(ir_file.replace(".xml", ".bin"))
    ir = ov.Core().read_model(ir_file)
    assert ir.input(0).get_partial_shape().is_dynamic and ir.input(0).get_partial_shape()[1] == 3
    # compress_to_fp16=False: every constant stays fp32 (save_model's default would store the weights as f16)
    constants = [op for op in ir.get_ops() if op.get_type_name() == "Constant"]
    assert constants and not any(op.get_element_type() == ov.Type.f16 for op in constants)


@pytest.mark.parametrize("shape", [(1, 3, 67, 101), (2, 3, 80, 112)])
def test_ir_logits_match_pytorch_at_other_sizes(model, ir_file, shape):
    image = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    logits = openvino_logits(ir_file, image)
    expected = torch_logits(model, image)  # the unfolded model: covers folding, ONNX export and conversion
    assert logits.shape == expected.shape and logits.dtype == np.float32
    assert np.abs(logits - expected).max() < 1e-4
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.999


def test_verify_reports_on_an_openvino_file_as_on_an_onnx_file(model, ir_file):
    report = export.verify(runtime.openvino_runner(ir_file), model, [(67, 101), (80, 112)])
    assert [r["size"] for r in report["sizes"]] == [[1, 3, 67, 101], [1, 3, 80, 112]]
    assert report["max_abs_diff"] < 1e-4 and report["within_tolerance"] and report["argmax_agreement"] >= 0.999
    export.check_report(ir_file, report)
    assert export.format_report(report, "OpenVINO").startswith("OpenVINO vs PyTorch at 1x3x67x101: max abs logit")


def test_backend_model_is_called_like_the_pytorch_model(model, onnx_files, ir_file):
    image = torch.randn(2, 3, 45, 77, generator=torch.Generator().manual_seed(5))
    expected = torch_logits(model, image)
    for path, backend in ((ir_file, "openvino"), (onnx_files[0], "onnxruntime")):
        logits = runtime.BackendModel(path, backend)(image)
        assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float32 and logits.shape == expected.shape
        assert np.abs(logits.numpy() - expected).max() < 1e-4
    labels_file = runtime.BackendModel(onnx_files[1], "onnxruntime")
    with pytest.raises(runtime.BackendError, match="model_argmax.onnx outputs labels .* call labels()"):
        labels_file(image)
    frames, image = frames_and_images((2, 45, 77, 3), 5)
    labels = labels_file.labels(frames)
    assert labels.dtype == torch.uint8 and (labels.numpy() == torch_logits(model, image).argmax(1)).mean() >= 0.999


def test_runtimes_use_pytorchs_thread_count(onnx_files, ir_file, monkeypatch):
    """torchrun's OMP_NUM_THREADS=1 per process reaches ONNX Runtime and OpenVINO, which do not read it."""
    sessions, compiled = [], []

    class Session(ort.InferenceSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sessions.append(self)

    class Core(ov.Core):
        def compile_model(self, *args, **kwargs):
            compiled.append(super().compile_model(*args, **kwargs))
            return compiled[-1]

    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr(ov, "Core", Core)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            runtime.BackendModel(onnx_files[0], "onnxruntime")
            runtime.BackendModel(ir_file, "openvino")
            assert sessions[-1].get_session_options().intra_op_num_threads == count
            assert compiled[-1].get_property("INFERENCE_NUM_THREADS") == count
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("asked", ["f32", "bf16"])
def test_openvino_files_compile_with_an_explicit_inference_precision(ir_file, monkeypatch, asked):
    """OpenVINO's CPU plugin computes in bf16 by default where the CPU has it (AMX, AVX512-BF16): an fp32 file is
    compiled with an f32 hint on every CPU, and the benchmark's bf16 row asks bf16 itself."""
    configs = []

    class Core(ov.Core):
        def compile_model(self, model, device, config):
            configs.append(config)
            return super().compile_model(model, device, config)

    monkeypatch.setattr(ov, "Core", Core)
    runtime.BackendModel(ir_file, "openvino", asked)
    [config] = configs
    assert config[ov.properties.hint.inference_precision] == getattr(ov.Type, asked)
    if asked == "f32":  # what the compiled model runs in, on this CPU whatever its class
        compiled = ov.Core().compile_model(ir_file, "CPU", config)
        assert compiled.get_property(ov.properties.hint.inference_precision) == ov.Type.f32


def test_missing_openvino_is_named(ir_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(runtime.BackendError, match="openvino package .* pip install -r requirements-deploy.txt"):
        runtime.BackendModel(ir_file, "openvino")


# --- INT8 ----------------------------------------------------------------------------------------------------------


def tiny_config(root, *overrides):
    """The synthetic preset on a tiny Cityscapes-format folder (conftest's tiny_cityscapes), small crops."""
    return get_config("synthetic", [f"data_root={root}", "crop_size=32,48", *overrides])


def test_split_images_are_whole_evaluation_images_in_the_same_order_every_time(tiny_cityscapes):
    cfg = tiny_config(tiny_cityscapes)
    split = eval_dataset(cfg, "train")
    images = export.SplitImages(cfg, "train", 3)
    first = list(images)
    assert len(images) == 3 and all(x.shape == (1, 3, 24, 40) and x.dtype == np.float32 for x in first)
    # NNCF iterates more than once (statistics, then bias correction): every pass and every export sees the same
    for again in (list(images), list(export.SplitImages(cfg, "train", 3))):
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    # each is one of the split's images as evaluation normalizes it (transform.normalize), none twice
    whole = [normalize(split[i][0][None], cfg.mean, cfg.std)[0].numpy() for i in range(len(split))]
    matches = [[k for k, w in enumerate(whole) if np.array_equal(x[0], w)] for x in first]
    assert all(len(m) == 1 for m in matches) and len({m[0] for m in matches}) == 3
    assert len(export.SplitImages(cfg, "train", 100)) == len(split)  # no image repeated to reach the size
    # for a labels file: the same images as the uint8 BGR frames OpenCV decodes
    frames = list(export.SplitImages(cfg, "train", 3, frames=True))
    assert all(f.shape == (1, 24, 40, 3) and f.dtype == np.uint8 for f in frames)
    assert all(np.array_equal(f[0, ..., ::-1], split[m[0]][0].numpy()) for f, m in zip(frames, matches, strict=True))


def test_compare_on_split_scores_both_against_the_labels(model, tiny_cityscapes):
    cfg = tiny_config(tiny_cityscapes)
    images = export.SplitImages(cfg, "val", 2)

    def torch_run(x):
        return torch_logits(model, torch.from_numpy(x))

    same = export.compare_on_split(torch_run, model, images, cfg.num_classes)
    assert same["argmax_agreement"] == 1 and same["miou_file"] == same["miou_torch"] and same["images"] == 2

    def road_everywhere(x):  # class 0 at every pixel
        logits = np.zeros((x.shape[0], cfg.num_classes, *x.shape[2:]), np.float32)
        logits[:, 0] = 1
        return logits

    report = export.compare_on_split(road_everywhere, model, images, cfg.num_classes)
    labels = torch.cat([label.flatten() for _, label in images.labelled()])
    valid = labels != 255
    road_iou = ((labels == 0) & valid).sum() / valid.sum()  # TP = road pixels; TP + FP + FN = every labelled pixel
    # every other class present in the labels has IoU 0, classes absent from both are not counted
    present = len(set(labels[valid].tolist()) | {0})
    assert report["miou_file"] == pytest.approx(float(road_iou) / present)
    assert report["miou_torch"] == same["miou_torch"]
    predicted = [torch.from_numpy(torch_logits(model, images.normalized(image))[0]).argmax(0)
                 for image, _ in images.labelled()]
    assert report["argmax_agreement"] == pytest.approx(min(float((p == 0).float().mean()) for p in predicted))


def test_int8_file_runs_and_its_agreement_is_computed(model, ir_file, tiny_cityscapes, tmp_path):
    images = export.SplitImages(tiny_config(tiny_cityscapes), "train", 4)
    path = export.quantize_int8(ir_file, str(tmp_path / "model_int8.xml"), images)
    assert os.path.isfile(path) and os.path.isfile(path.replace(".xml", ".bin"))
    assert any(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(path).get_ops())
    image = torch.randn(1, 3, 67, 101, generator=torch.Generator().manual_seed(0))  # verify's image (its seed 0)
    report = export.verify(runtime.openvino_runner(path), model, [(67, 101)])
    logits, expected = openvino_logits(path, image), torch_logits(model, image)
    assert logits.shape == expected.shape
    assert report["argmax_agreement"] == (logits.argmax(1) == expected.argmax(1)).mean()  # same image, seed 0
    assert 0 < report["argmax_agreement"] <= 1


@pytest.mark.parametrize("native", [True, False])
def test_int8_files_get_the_bf16_hint_where_bf16_is_native_and_fp32_files_f32(ir_file, tiny_cityscapes, tmp_path,
                                                                              monkeypatch, native):
    """An INT8 file's unquantized layers run in bf16 where the CPU has it natively (precision.native_bf16 answers
    `native` on every CPU class); an fp32 file keeps f32 everywhere. What is asked is recorded; the compile itself
    gets f32, which every CPU runs."""
    int8 = export.quantize_int8(ir_file, str(tmp_path / "model_int8.xml"),
                                export.SplitImages(tiny_config(tiny_cityscapes), "train", 2))
    asked = []

    class Core(ov.Core):
        def compile_model(self, model, device, config):
            asked.append(config[ov.properties.hint.inference_precision])
            return super().compile_model(model, device, {**config, ov.properties.hint.inference_precision: ov.Type.f32})

    monkeypatch.setattr(ov, "Core", Core)
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    for path, expected in ((ir_file, "f32"), (int8, "bf16" if native else "f32")):
        assert runtime.openvino_runner(path).hint == expected
        assert asked[-1] == getattr(ov.Type, expected)
    assert runtime.openvino_runner(int8, "f32").hint == "f32" and asked[-1] == ov.Type.f32  # asked for: kept


def test_a_throughput_runner_gives_each_thread_its_own_request(model, ir_file):
    """Compiled for throughput, a runner says how many inputs to run at once (OpenVINO's optimal number of requests)
    and, called from that many threads at once, gives each input the output it gives alone."""
    alone, together = runtime.openvino_runner(ir_file), runtime.openvino_runner(ir_file, throughput=True)
    compiled = ov.Core().compile_model(ir_file, "CPU", {
        ov.properties.hint.performance_mode: ov.properties.hint.PerformanceMode.THROUGHPUT,
        ov.properties.inference_num_threads: torch.get_num_threads()})
    assert together.jobs == compiled.get_property(ov.properties.optimal_number_of_infer_requests()) >= 1
    assert alone.jobs == 1
    images = [x.numpy() for x in export.random_images([(40, 64)] * 6)]
    with ThreadPoolExecutor(max(2, together.jobs)) as pool:
        outputs = list(pool.map(together, images))
    assert all(np.array_equal(out, alone(x)) for out, x in zip(outputs, images, strict=True))


SIGNAL_CHECK = """
import gc, signal, sys
import numpy as np, torch
import export, precision, runtime
from configs import get_config
ir, int8, root = sys.argv[1:]
export.quantize_int8(ir, int8, export.SplitImages(get_config("synthetic", [f"data_root={root}", "crop_size=32,48"]),
                                                  "train", 2))
hints = ("f32", "bf16") if precision.native_bf16(torch.device("cpu")) else ("f32",)  # bf16 where the benchmark asks it
runs = [runtime.openvino_runner(path, hint) for path in (ir, int8) for hint in hints]
for run in runs:
    run(np.zeros((1, 3, 32, 48), np.float32))
del runs, run
gc.collect()  # the compiled models, and the OpenVINO cores that compiled them, freed
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):  # Ctrl-C; a scheduler's stop; a loader worker's end
    caught = []
    signal.signal(signum, lambda *args: caught.append(signum))
    signal.raise_signal(signum)
    assert caught == [signum]
print("OK")
"""


def test_a_signal_after_openvino_work_reaches_pythons_handler(ir_file, tiny_cityscapes, tmp_path):
    """After NNCF's quantization and OpenVINO compiles (the runners freed since), a signal on the thread that did
    them runs Python's handler: Ctrl-C is a KeyboardInterrupt, not a segmentation fault on an alternate signal stack
    OpenVINO's CPU plugin freed (runtime.signal_stack_kept)."""
    result = subprocess.run([sys.executable, "-c", SIGNAL_CHECK, ir_file, str(tmp_path / "int8.xml"),
                             str(tiny_cityscapes)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "OK", (result.returncode, result.stderr[-3000:])


def test_int8_check_fails_below_90_percent_agreement():
    export.check_int8_report("model_int8.xml", {"argmax_agreement": 0.91})
    with pytest.raises(export.ExportError, match="model_int8.xml agrees with PyTorch on only 89.0% of the pixels"):
        export.check_int8_report("model_int8.xml", {"argmax_agreement": 0.89})


# --- command line --------------------------------------------------------------------------------------------------


def test_cli_exports_a_training_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = get_config("synthetic")  # with aux heads, as train.py saves it: the export drops them
    torch.manual_seed(0)
    trained = randomize_batchnorm(build_model(cfg, pretrained=False))
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": trained.state_dict(), "config": cfg.to_dict()}, ckpt)
    monkeypatch.setattr(export, "VERIFY_SIZES", ((67, 101),))  # the CPU cost of the check, not its meaning
    assert export.main(["--ckpt", str(ckpt)]) == 0
    assert (tmp_path / "model.onnx").is_file()
    out = capsys.readouterr().out
    assert "2x3x67x101" in out and "argmax agreement" in out


def test_cli_writes_onnx_ir_and_int8_files(tiny_cityscapes, tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tiny_cityscapes)
    torch.manual_seed(0)
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": randomize_batchnorm(build_model(cfg, pretrained=False)).state_dict(),
                "config": cfg.to_dict()}, ckpt)
    monkeypatch.setattr(export, "VERIFY_SIZES", ((67, 101),))
    # random weights leave near ties at most pixels, which INT8 rounding flips: the threshold is for trained models
    monkeypatch.setattr(export, "MIN_INT8_AGREEMENT", 0.0)
    output = tmp_path / "out" / "bisenet.onnx"
    assert export.main(["--ckpt", str(ckpt), "--output", str(output), "--int8", "--calib-size", "4"]) == 0
    names = sorted(os.listdir(output.parent))
    assert names == ["bisenet.bin", "bisenet.onnx", "bisenet.xml", "bisenet_int8.bin", "bisenet_int8.xml"]
    out = capsys.readouterr().out
    assert "OpenVINO vs PyTorch at 2x3x67x101" in out and "calibrated on 4 train images" in out
    # INT8 is checked on the val split's images (2 in the tiny set), not on random noise, with the mIoU of both
    assert re.search(r"OpenVINO INT8 vs PyTorch on 2 val images: mIoU \d+\.\d\d vs \d+\.\d\d \(fp32\)", out)


@pytest.mark.parametrize("flag, package", [("--openvino", "openvino"), ("--int8", "nncf"), ("", "onnx")])
def test_cli_missing_package_is_one_line_with_the_install_command(tmp_path, monkeypatch, capsys, flag, package):
    cfg = get_config("synthetic")
    torch.manual_seed(0)
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": build_model(cfg, pretrained=False).state_dict(), "config": cfg.to_dict()}, ckpt)
    monkeypatch.setitem(sys.modules, package, None)
    assert export.main(["--ckpt", str(ckpt), *([flag] if flag else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the {package} package is needed") and err.count("\n") == 1
    assert err.strip().endswith("pip install -r requirements-deploy.txt")
    assert not (tmp_path / "model.onnx").exists()  # named before any work


def test_cli_missing_checkpoint_exits_nonzero_with_the_path(tmp_path):
    missing = str(tmp_path / "no_such.pth")
    result = subprocess.run([sys.executable, "export.py", "--ckpt", missing], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert missing in result.stderr


@pytest.mark.parametrize("flag", ["--calib-size", "--check-size"])
def test_a_count_below_one_is_one_usage_line(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--ckpt", str(tmp_path / "model_final.pth"), "--int8", flag, "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: {flag} 0: expected a positive number of images\n")


def test_the_check_of_an_argmax_file_compares_its_labels(model, tiny_cityscapes):
    """export.py --int8 --argmax checks a file that takes uint8 BGR frames and gives the labels themselves (N, H, W)."""
    cfg = tiny_config(tiny_cityscapes)
    images = export.SplitImages(cfg, "val", 2, frames=True)

    def labels_run(frames):
        assert frames.dtype == np.uint8 and frames.shape[-1] == 3
        return torch_logits(labels_model(model), torch.from_numpy(frames))

    report = export.compare_on_split(labels_run, model, images, cfg.num_classes)
    assert report["argmax_agreement"] == 1 and report["miou_file"] == report["miou_torch"]


def test_an_opset_this_torch_cannot_export_is_one_line(tmp_path, capsys):
    cfg = get_config("synthetic")
    path = tmp_path / "model_final.pth"
    torch.save({"model": build_model(cfg, pretrained=False).state_dict(), "config": cfg.to_dict()}, path)
    assert export.main(["--ckpt", str(path), "--opset", "99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --opset 99: ") and "expected 17 or a newer opset this torch exports" in err
    assert err.count("\n") == 1
