"""Measure the pipeline and write benchmarks/<machine class>.md (benchmarks/README.md says what each report holds).

    python benchmark.py                                   # every section, written to benchmarks/<class>.md
    python benchmark.py --only data,latency               # some (see SECTIONS): printed
    python benchmark.py --only eval --out eval_bench.md   # some, written to the file given

Each figure is the median of --repeat timed runs after a warm-up run, on the GPU where there is one; exported files
run on the CPU. Rows whose package (requirements-deploy.txt) is missing are left out with a note.
"""

import argparse
import dataclasses
import functools
import glob
import importlib
import itertools
import os
import platform
import re
import statistics
import tempfile
import time

import cv2
import numpy as np
import torch

import demo
import export
import precision
from configs import get_config
from datasets import build_dataset, class_table
from distributed import Distributed
from evaluate import eval_crop_size, predict, predict_scores
from export import export_onnx, export_openvino, openvino_paths, quantize_int8, random_frames, random_images
from loss import build_loss
from model import ARCHITECTURES, build_model, count_gflops, fold_batchnorm, inference_model
from optimizer import build_optimizer
from precision import training_precision, use_channels_last
from runtime import BackendError, BackendModel, openvino_runner, require
from synthetic import generate
from train import train_step
from transform import TrainTransform, normalize

SECTIONS = ("data", "train", "presets", "latency", "deploy", "video", "eval")
CITYSCAPES_SIZES = [(512, 1024), (1024, 2048)]


def timed(fn, device, repeat):
    """Median seconds of fn() over `repeat` runs after one warm-up run. On CUDA from events recorded around fn on the
    current stream (the GPU's own time, which host clocks only approximate); on the CPU from perf_counter."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)  # elapsed_time is in milliseconds
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_info(path="/proc/cpuinfo"):
    """(model name, set of flags) of the first CPU in `path`; (platform's name, empty set) where it is unreadable."""
    name, flags = platform.processor() or platform.machine(), set()
    if os.path.exists(path):
        with open(path) as f:
            lines = [line.split(":", 1) for line in f if ":" in line]
        name = next((v.strip() for k, v in lines if k.strip() == "model name"), name)
        flags = next((set(v.split()) for k, v in lines if k.strip() == "flags"), flags)
    return name, flags


def cpu_isa(capability, flags):
    """The CPU class that decides the precision rows: "AMX", "AVX512-BF16", "AVX512", "AVX2" or PyTorch's own word;
    torch's `capability` stops at AVX512, /proc/cpuinfo's `flags` (amx_bf16, avx512_bf16) tell bf16 apart."""
    if {"amx_tile", "amx_bf16"} <= flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if capability == "AVX512" or "avx512f" in flags:
        return "AVX512"
    return capability


def machine_class():
    """The name of this machine's report: the GPU's name, made a file name, where there is a GPU, else cpu_isa's."""
    if torch.cuda.is_available():
        return re.sub(r"[^\w.-]+", "-", torch.cuda.get_device_name(0)).strip("-")
    return cpu_isa(torch.backends.cpu.get_cpu_capability(), cpu_info()[1])


def machine():
    cpu, flags = cpu_info()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    bf16 = "native bf16" if precision.native_bf16(torch.device("cpu")) else "no native bf16"
    isa = cpu_isa(torch.backends.cpu.get_cpu_capability(), flags)
    return (f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, ISA {isa} "
            f"(PyTorch kernels {torch.backends.cpu.get_cpu_capability()}), {bf16}; GPU: {gpu}; "
            f"torch {torch.__version__}, OpenCV {cv2.__version__}, Python {platform.python_version()}")


def bench_data(cfg, root, repeat):
    tf = TrainTransform.from_config(cfg)
    data_cfg = dataclasses.replace(cfg, data_root=root)
    dataset, plain = build_dataset(data_cfg, "train", tf), build_dataset(data_cfg, "train")
    raw = [(img, lbl.astype(np.uint8)) for img, lbl in (plain[i] for i in range(len(plain)))]
    rng, n = np.random.default_rng(0), len(dataset)

    def per_sample(fn):
        return timed(lambda: [fn(i) for i in range(n)], torch.device("cpu"), repeat) / n

    def as_float(i):  # the baseline: workers shipped the image normalized to float32 and the labels as int64
        image, label = dataset[(i, (0, i))]
        return normalize(image[None], cfg.mean, cfg.std)[0], label.long()

    t_full = per_sample(lambda i: dataset[(i, (0, i))])
    t_float = per_sample(as_float)
    t_geometry = per_sample(lambda i: tf.geometry(*raw[i], rng))
    rows = [
        ("full sample: PNG decode + label map + augmentation, shipped as uint8 (ours)", t_full,
         f"{t_float / t_full:.2f}x"),
        ("full sample, normalized in the worker: float32 image + int64 label (baseline)", t_float, "1.00x"),
        ("PNG decode + label map only", per_sample(lambda i: plain[i]), ""),
        ("scale/pad/crop/flip: one warpAffine of the crop", t_geometry, ""),
        ("color jitter", per_sample(lambda i: tf(*raw[i], rng)) - t_geometry, ""),
    ]
    h, w = cfg.crop_size
    ours_bytes, float_bytes = h * w * 3 + h * w, h * w * 3 * 4 + h * w * 8
    lines = [f"Training pipeline, one worker process, {n} synthetic 1024x2048 frames, crop {h}x{w}, scale "
             f"{cfg.scales}:", "", "| step | samples/s per worker | speed vs baseline |", "|---|---|---|"]
    lines += [f"| {name} | {1 / seconds:.2f} | {ratio} |" for name, seconds, ratio in rows]
    lines += ["", f"Bytes a sample takes through the loader's shared and pinned memory: {ours_bytes / 1e6:.2f} MB as "
              f"uint8 image and labels, {float_bytes / 1e6:.2f} MB as float32 image and int64 labels "
              f"({float_bytes / ours_bytes:.1f}x)."]
    return lines


def precision_variants(cfg, device):
    """(name, cfg, amp, compile) for each precision train.py can use on `device`: fp32, and amp=fp16 / bf16 where
    precision.py grants it; on CUDA, fp16 and bf16 also in the format channels_last=auto does not choose."""
    variants = [("fp32", cfg, "none", False)]
    for amp in ("fp16", "bf16"):
        if training_precision(amp, device)[0] is not None:
            variants.append((f"{amp} autocast (`amp={amp}`)", cfg, amp, False))
            if device.type == "cuda":
                other = dataclasses.replace(cfg, channels_last="false")
                variants.append((f"{amp} autocast, contiguous NCHW (`channels_last=false`)", other, amp, False))
    return variants


def cpu_variants(cfg, device):
    """The choices that may speed up training on a CPU, each added to fp32 on its own: channels_last, bf16 with it
    (CPUs with native bf16), torch.compile with it."""
    plain, last = dataclasses.replace(cfg, channels_last="false"), dataclasses.replace(cfg, channels_last="true")
    variants = [("fp32", plain, "none", False), ("fp32, channels_last", last, "none", False)]
    if training_precision("bf16", device)[0] is not None:
        variants.append(("bf16 autocast, channels_last", last, "bf16", False))
    variants.append(("fp32, channels_last, torch.compile", last, "none", True))
    return variants


def bench_train(cfg, device, batch, repeat, variants=precision_variants):
    """Images/s of train.train_step, built as train.py builds it, for each (name, cfg, amp, compile) variant."""
    h, w = cfg.crop_size
    # a batch as the loader ships it, uint8 images (N, H, W, 3) and labels: train_step normalizes it on the device
    batches = itertools.repeat((torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, device=device),
                                torch.randint(0, cfg.num_classes, (batch, h, w), dtype=torch.uint8, device=device)))
    proc, heads = Distributed(), 1 + len(ARCHITECTURES[cfg.arch].AUX_MODULES) * cfg.aux_heads
    lines = [f"Training step of {ARCHITECTURES[cfg.arch].__name__} (`train.train_step`: forward, OHEM loss on {heads} "
             f"heads, backward, SGD), crop {h}x{w}, batch {batch} per process, random data:", "",
             "| variant | images/s | s/iteration | speed vs fp32 |", "|---|---|---|---|"]
    base, notes = None, []
    for name, variant_cfg, amp, compile in variants(cfg, device):
        dtype, autocast, scaler = training_precision(amp, device)
        torch.manual_seed(0)
        channels_last = use_channels_last(variant_cfg.channels_last, device, dtype)
        model = build_model(variant_cfg, pretrained=False).to(device).train()
        model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        optimizer, criterion = build_optimizer(model, variant_cfg), build_loss(variant_cfg).to(device)
        step = functools.partial(train_step, torch.compile(model) if compile else model, criterion, optimizer, scaler,
                                 autocast, batches, variant_cfg, proc, variant_cfg.lr, channels_last=channels_last)
        if compile:
            start = time.perf_counter()
            try:
                step()
            except Exception as error:  # no C++ compiler, unsupported platform...: report, do not stop the benchmark
                notes.append(f"{name}: not run ({type(error).__name__}: {str(error)[:200]})")
                continue
            notes.append(f"{name}: the first step compiles, {time.perf_counter() - start:.0f} s here")
        seconds = timed(step, device, repeat)
        base = base or seconds
        lines.append(f"| {name} | {batch / seconds:.2f} | {seconds:.2f} | {base / seconds:.2f}x |")
    return lines + ([""] + [f"- {note}" for note in notes] if notes else [])


def bench_presets(device, batch, repeat, presets=("synthetic", "camvid", "camvid_v2")):
    """bench_train's CPU choices (cpu_variants) at the crop of each CPU preset."""
    lines = []
    for preset in presets:
        lines += [f"Preset `{preset}`:", "", *bench_train(get_config(preset), device, batch, repeat, cpu_variants), ""]
    return lines[:-1]


def latency_variants(model, device, compile=True):
    """(name, callable(x) -> logits, note) triples: each execution variant of the same eval model, each step adding
    one thing to the one before (ONNX Runtime and bf16 are separate roads)."""
    fast = inference_model(model)  # folded + channels_last: what evaluate.py and demo.py run
    variants = [("fp32 eager", model, ""), ("fp32 folded BN", fold_batchnorm(model), ""),
                ("fp32 folded BN + channels_last (`inference_model`)", fast, "")]
    if compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights as constants: lets inductor prepack them for oneDNN / cuDNN
        fn = torch.compile(fast)
        try:
            with torch.inference_mode():
                fn(torch.zeros(1, 3, 64, 128, device=device))
            variants.append(("fp32 folded + channels_last + torch.compile", fn,
                             "first call per input size compiles: 10-15 s on 2 CPU cores"))
        except Exception as error:  # no C++ compiler, unsupported platform...: report, do not stop the benchmark
            print(f"torch.compile unavailable: {type(error).__name__}: {str(error)[:200]}")
    for amp in ("bf16", "fp16") if device.type == "cuda" else ("bf16",) if precision.native_bf16(device) else ():
        variants.append((f"{amp} autocast folded + channels_last (`eval_amp={amp}`)", inference_model(model, amp), ""))
    return variants


def exported_models(model, directory, hw, calibration=8, labels=None):
    """([(name, runtime.BackendModel)], [notes]) of export.py's files of `model`, as far as the deploy packages are
    installed: ONNX Runtime fp32, OpenVINO fp32, bf16 (native only) and INT8 (random calibration: enough to time);
    with `labels`, a config (its mean and std), the labels files (--argmax) too: fp32 and INT8 of each upsample."""
    onnx_path = os.path.join(directory, "model.onnx")
    xml, int8 = openvino_paths(onnx_path)
    calibration_images = [x.numpy() for x in random_images([hw] * calibration)]
    makers = [("ONNX Runtime fp32", lambda: BackendModel(onnx_path, "onnxruntime")),
              ("OpenVINO fp32", lambda: BackendModel(export_openvino(onnx_path, xml), "openvino"))]
    bf16 = precision.native_bf16(torch.device("cpu"))
    if bf16:
        makers.append(("OpenVINO bf16", lambda: BackendModel(xml, "openvino", "bf16")))
    makers.append(("OpenVINO INT8 (NNCF)",
                   lambda: BackendModel(quantize_int8(xml, int8, calibration_images), "openvino")))
    folded = fold_batchnorm(model).cpu().eval()
    exports = [(folded, onnx_path)]
    if labels is not None:
        frames = [x.numpy() for x in random_frames([hw] * calibration)]
        for upsample in export.LABELS_UPSAMPLES:
            path = os.path.join(directory, f"labels_{upsample}.onnx")
            exports.append((export.LabelsModel(folded, labels.mean, labels.std, upsample).eval(), path))
            labels_xml, labels_int8 = openvino_paths(path)
            if upsample == export.LABELS_UPSAMPLES[0]:
                makers.append((f"OpenVINO fp32 labels ({upsample})",
                               lambda xml=labels_xml, path=path: BackendModel(export_openvino(path, xml), "openvino")))
            makers.append((f"OpenVINO INT8 labels ({upsample})", lambda xml=labels_xml, int8=labels_int8, path=path:
                           BackendModel(quantize_int8(export_openvino(path, xml), int8, frames), "openvino")))
    try:
        for exported, path in exports:
            export_onnx(exported, path)
    except BackendError as error:
        return [], [f"exported models: not run ({error})"]
    models, missing = [], {}  # error message -> the rows it stopped: one note per missing package
    for name, make in makers:
        try:
            models.append((name, make()))
        except BackendError as error:
            missing.setdefault(str(error), []).append(name)
    notes = [f"{', '.join(names)}: not run ({error})" for error, names in missing.items()]
    if not bf16:
        notes.append("OpenVINO bf16: not run; this CPU has no native bf16 (AVX512-BF16 or AMX)")
    return models, notes


def peak_rates(repeat, channels=1024, hw=32, depth=16):
    """({"f32", "bf16" (native only), "INT8"}: GFLOP/s, [notes]) of OpenVINO on this CPU, each kernel at its best:
    `depth` chained 1x1 convolutions of `channels` channels on an hw x hw map (each a channels x channels x hw^2
    matmul), compiled as runtime.openvino_runner compiles files (INT8: FakeQuantize ops as NNCF writes them)."""
    try:
        ov, ops = require("openvino"), importlib.import_module("openvino.opset13")
    except BackendError as error:
        return {}, [f"peak: not run ({error})"]
    rng = np.random.default_rng(0)
    weights = [(rng.uniform(-1, 1, (channels, channels, 1, 1)) / channels ** 0.5).astype(np.float32)
               for _ in range(depth)]

    def fake_quantize(x, low, high, levels):
        return ops.fake_quantize(x, *(np.float32(v) for v in (low, high, low, high)), levels)

    def chain(int8):
        x = ops.parameter([1, channels, hw, hw], ov.Type.f32, name="image")
        y = x
        for w in weights:
            y, w = (fake_quantize(y, 0, 4, 256), fake_quantize(w, -1, 1, 255)) if int8 else (y, ops.constant(w))
            y = ops.relu(ops.convolution(y, w, [1, 1], [0, 0], [0, 0], [1, 1]))
        return ov.Model([y], [x])

    image, flops = rng.uniform(0, 4, (1, channels, hw, hw)).astype(np.float32), 2 * channels ** 2 * hw * hw * depth
    rates = {}
    with tempfile.TemporaryDirectory() as directory:
        for name, int8, hint in (("f32", False, "f32"), ("bf16", False, "bf16"), ("INT8", True, None)):
            if name == "bf16" and not precision.native_bf16(torch.device("cpu")):
                continue
            path = os.path.join(directory, f"{name}.xml")
            ov.save_model(chain(int8), path, compress_to_fp16=False)
            run = openvino_runner(path, hint)
            rates[name] = flops / 1e9 / timed(functools.partial(run.infer, image), torch.device("cpu"), repeat)
    return rates, []


PEAK_NOTE = ("Peak of this CPU, measured in this run (peak_rates: 16 chained 1x1 convolutions of 1024 channels on "
             "32x32, a 1024x1024x1024 matmul each, in OpenVINO), GFLOP/s: ")


def bench_deploy(cfg, repeat, sizes, peaks):
    """export.py's files of `cfg`'s model (random weights) on the CPU: the request alone (OpenVINO's infer, the output
    left in the request) and the call as a user makes it (logits: BackendModel(image tensor); labels: .labels(uint8
    frames)), frames per second, the share of `peaks` (peak_rates) and the time against OpenVINO's logits."""
    model = build_model(dataclasses.replace(cfg, aux_heads=False), pretrained=False).eval()
    flops, cpu = {hw: count_gflops(model, hw) for hw in sizes}, torch.device("cpu")
    with tempfile.TemporaryDirectory() as directory:
        exported, notes = exported_models(model, directory, sizes[0], calibration=4, labels=cfg)
        names = [name for name, _ in exported]
        base = "OpenVINO bf16" if "OpenVINO bf16" in names else "OpenVINO fp32"
        rows = {}
        for name, file in exported:
            inputs = [(random_frames if file.outputs_labels else random_images)([hw])[0] for hw in sizes]
            call = file.labels if file.outputs_labels else file
            calls = [timed(functools.partial(call, x), cpu, repeat) for x in inputs]
            requests = ([timed(functools.partial(file.run.infer, x.numpy()), cpu, repeat) for x in inputs]
                        if hasattr(file.run, "infer") else None)
            rows[name] = (file, requests, calls)
    size = "x".join(map(str, sizes[0]))
    lines = [f"{type(model).__name__} (`arch={cfg.arch}`), export.py's files of random weights on the CPU, batch 1: "
             "the request alone and the call as a user makes it (logits: a float image tensor in, logits out; labels: "
             "a uint8 frame in, uint8 labels out), ms:", "",
             "| file | hint | " + " | ".join(f"request {h}x{w}" for h, w in sizes) + " | "
             + " | ".join(f"call {h}x{w}" for h, w in sizes) + f" | frames/s {size} | share of peak {size} | "
             f"call vs {base} |", "|---|---|" + "---|" * (2 * len(sizes) + 3)]
    for name, (file, requests, calls) in rows.items():
        hint = getattr(file.run, "hint", "")  # ONNX Runtime: f32, no hint
        kind = "INT8" if "INT8" in name else hint or "f32"
        share = (f"{100 * flops[sizes[0]] / (requests or calls)[0] / peaks[kind]:.0f}% of {kind}"
                 if kind in peaks else "")
        ratio = " / ".join(f"{c / b:.2f}x" for c, b in zip(calls, rows[base][2], strict=True)) if base in rows else ""
        cells = [name, hint, *(f"{1000 * t:.1f}" if t else "-" for t in requests or [None] * len(sizes)),
                 *(f"{1000 * t:.1f}" for t in calls), f"{1 / calls[0]:.1f}", share, ratio]
        lines.append("| " + " | ".join(cells) + " |")
    goal, target = f"OpenVINO INT8 labels ({export.LABELS_UPSAMPLES[0]})", 0.5 if base == "OpenVINO bf16" else 0.45
    if goal in rows and base in rows:
        lines += ["", f"Goal: {goal}, the call, at most {target}x the {base} logits call at {size}: "
                  f"{rows[goal][2][0] / rows[base][2][0]:.2f}x."]
    return lines + ["", "GFLOPs: " + ", ".join(f"{flops[hw]:.1f} at {hw[0]}x{hw[1]}" for hw in sizes) + ".",
                    *("- " + n for n in notes)]


def bench_latency(cfg, device, repeat, sizes, compile=True):
    model = build_model(dataclasses.replace(cfg, aux_heads=False), pretrained=False).to(device).eval()
    flops = {hw: count_gflops(model, hw) for hw in sizes}
    lines = [f"{type(model).__name__} (`arch={cfg.arch}`) inference, batch 1, eval mode (main head), random weights:",
             "",
             "| variant | " + " | ".join(f"{h}x{w} ms" for h, w in sizes) + " | " +
             " | ".join(f"{h}x{w} GFLOP/s" for h, w in sizes) + " | speed vs fp32 eager |",
             "|---|" + "---|" * (2 * len(sizes) + 1)]
    variants = latency_variants(model, device, compile)
    notes = [f"{name}: {note}" for name, _, note in variants if note]
    if device.type == "cpu" and not precision.native_bf16(device):
        notes.append("bf16 autocast: not run; this CPU has no AVX512-BF16 or AMX, so oneDNN emulates bf16 "
                     "(many times slower than fp32)")
    base = None
    for name, fn, _ in variants:
        with torch.inference_mode():  # on a random image of each size
            times = [timed(functools.partial(fn, torch.randn(1, 3, *hw, device=device)), device, repeat)
                     for hw in sizes]
        base = base or times
        speed = " / ".join(f"{b / t:.2f}x" for b, t in zip(base, times, strict=True))
        rates = [flops[hw] / t for hw, t in zip(sizes, times, strict=True)]  # 2 digits below 10: tiny test inputs
        lines.append(f"| {name} | " + " | ".join(f"{1000 * t:.0f}" for t in times) + " | " +
                     " | ".join(f"{r:.0f}" if r >= 10 else f"{r:.2g}" for r in rates) + f" | {speed} |")
    lines += ["", "FLOPs (torch.utils.flop_counter, 2 per multiply-add): " +
              ", ".join(f"{flops[hw]:.1f} G at {hw[0]}x{hw[1]}" for hw in sizes) + "; export.py's files: the "
              "deploy section.", *("- " + n for n in notes)]
    return lines


def bench_video(cfg, repeat, sizes, frames=24):
    """Frames per second of a generated video (synthetic.py's scenes, mp4v) decoded, segmented by export.py's INT8
    labels file (random weights) and colorized, through demo.pipeline as demo.py runs it: as many requests at once as
    OpenVINO's throughput hint gives, and one at a time; then demo.py's own video path, which also draws the overlay
    and the legend and encodes two videos."""
    model = build_model(dataclasses.replace(cfg, aux_heads=False), pretrained=False).eval()
    table, cpu = class_table(cfg), torch.device("cpu")
    with tempfile.TemporaryDirectory() as directory:
        labels = export.LabelsModel(fold_batchnorm(model), cfg.mean, cfg.std).eval()
        try:
            xml, int8 = openvino_paths(export_onnx(labels, os.path.join(directory, "labels.onnx")))
            path = quantize_int8(export_openvino(xml.replace(".xml", ".onnx"), xml), int8,
                                 [x.numpy() for x in random_frames([sizes[0]] * 4)])
            streams = BackendModel(path, "openvino", throughput=True)
            files = [(f"{streams.run.jobs} request{'s' * (streams.run.jobs > 1)} at once (throughput hint)", streams),
                     ("one request at a time", BackendModel(path, "openvino"))]
        except BackendError as error:
            return [f"not run ({error})"]
        generate(os.path.join(directory, "scenes"), n_train=4, n_val=0, size=sizes[-1], seed=0, progress=False)
        scenes = [cv2.imread(p) for p in sorted(glob.glob(os.path.join(directory, "scenes", "**", "*_leftImg8bit.png"),
                                                          recursive=True))]
        videos = {}
        for h, w in sizes:
            writer = demo.open_writer(os.path.join(directory, f"video_{h}x{w}"), 30, (w, h))
            for i in range(frames):
                writer.write(cv2.resize(scenes[i % len(scenes)], (w, h), interpolation=cv2.INTER_AREA))
            writer.release()
            [videos[h, w]] = glob.glob(os.path.join(directory, f"video_{h}x{w}.*"))

        def labels_fps(file, video):
            work = lambda frame: table.colorize(file.labels(frame[None])[0].numpy())  # noqa: E731
            run = lambda: demo.pipeline(demo.read_frames(cv2.VideoCapture(video)), work, lambda _: None,  # noqa: E731
                                        file.run.jobs)
            return frames / timed(run, cpu, repeat)

        def demo_fps(file, video):
            run = functools.partial(demo.process_video, file, cfg, table, video, directory, file.run.jobs)
            return frames / timed(run, cpu, repeat)

        rows = [(f"decode + INT8 labels + colorize, {name}", [labels_fps(file, videos[hw]) for hw in sizes])
                for name, file in files]
        rows.append((f"demo.py: + overlay and legend, two videos encoded, {files[0][0]}",
                     [demo_fps(files[0][1], videos[hw]) for hw in sizes]))
    return [f"Video, {frames} frames of synthetic.py's scenes (mp4v), {type(model).__name__}'s INT8 labels file "
            "(export.py --argmax --int8, random weights), frames per second end to end (demo.pipeline: decoding, "
            "inference and writing overlap):", "",
            "| pipeline | " + " | ".join(f"frames/s {h}x{w}" for h, w in sizes) + " |", "|---|" + "---|" * len(sizes),
            *(f"| {name} | " + " | ".join(f"{fps:.1f}" for fps in rates) + " |" for name, rates in rows)]


def bench_eval(cfg, device, repeat, hw=(1024, 2048)):
    model = build_model(dataclasses.replace(cfg, aux_heads=False), pretrained=False).to(device).eval()
    fast = inference_model(model)
    image = torch.randn(1, 3, *hw, device=device)
    crop_h, crop_w = eval_crop_size(cfg)
    with tempfile.TemporaryDirectory() as directory:
        exported, notes = exported_models(model, directory, (crop_h, crop_w))
        exported = [(name, fn) for name, fn in exported if name.startswith("OpenVINO")]
        lines = [f"Evaluation modes on one {hw[0]}x{hw[1]} image (crop {crop_h}x{crop_w}, stride "
                 f"{cfg.eval_stride:.3f} of the crop, scales {cfg.eval_scales}, {cfg.eval_batch} crops per forward), "
                 "as evaluate.py runs them (folded channels_last model, `predict`), the plain way (eager model, "
                 "softmax scores, argmax(0)), and as `backend=openvino` runs them (the exported files, on the CPU):",
                 "", "| mode | s/image | cost vs ss | plain way s/image | speed vs plain |"
                 + "".join(f" {name} s/image |" for name, _ in exported),
                 "|---|---|---|---|---|" + "---|" * len(exported)]
        seconds, cpu_image = {}, image.cpu()
        with torch.inference_mode():
            for mode in ("ss", "ssc", "msf", "mscf"):
                n = 1 if mode in ("msf", "mscf") else repeat
                seconds[mode] = timed(lambda mode=mode: predict(fast, image, cfg, mode), device, n)
                plain = timed(lambda mode=mode: predict_scores(model, image, cfg, mode).argmax(0), device, n)
                backends = [timed(lambda fn=fn, mode=mode: predict(fn, cpu_image, cfg, mode), torch.device("cpu"), n)
                            for _, fn in exported]
                lines.append(f"| {mode} | {seconds[mode]:.3g} | {seconds[mode] / seconds['ss']:.1f}x | {plain:.3g} | "
                             f"{plain / seconds[mode]:.2f}x |" + "".join(f" {t:.3g} |" for t in backends))
            one = dataclasses.replace(cfg, eval_batch=1)
            single = timed(lambda: predict(fast, image, one, "ssc"), device, repeat)
    lines += ["", f"ssc with {cfg.eval_batch} crops per forward: {seconds['ssc']:.2f} s; one crop at a time: "
              f"{single:.2f} s; batched / one-at-a-time time ratio {seconds['ssc'] / single:.2f}.",
              *("- " + n for n in notes)]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure (median)")
    parser.add_argument("--train-batch", type=int, default=8, help="images per training step (reference: 8 per GPU)")
    parser.add_argument("--out", default=None, help="report file ('' to only print); default: benchmarks/<machine "
                                                    "class>.md for a full run, none with --only")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; expected {', '.join(SECTIONS)}")
    out = args.out
    if out is None and set(sections) == set(SECTIONS):  # a partial run must not replace the machine's whole report
        out = os.path.join("benchmarks", f"{machine_class()}.md")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg, repeat, batch = get_config("cityscapes"), args.repeat, args.train_batch
    torch.manual_seed(0)
    report = ["# Benchmarks", "", f"Machine: {machine()}.", "",
              f"Command: `python benchmark.py --only {','.join(sections)} --repeat {repeat}`.", ""]
    for section in sections:
        print(f"[{section}] ...", flush=True)
        if section == "data":
            with tempfile.TemporaryDirectory() as root:
                generate(root, n_train=4, n_val=0, size=(1024, 2048), seed=0, progress=False)
                lines = bench_data(cfg, root, repeat)
        elif section == "train":
            lines = bench_train(cfg, device, batch, max(1, repeat - 1))
        elif section == "presets":
            lines = bench_presets(device, batch, max(1, repeat - 1))
        elif section == "latency":  # both architectures at the Cityscapes sizes
            lines = [line for preset in ("cityscapes", "cityscapes_v2") for line in
                     (*bench_latency(get_config(preset), device, repeat, CITYSCAPES_SIZES), "")][:-1]
        elif section == "deploy":  # on the CPU, against the peak measured in this run
            peaks, lines = peak_rates(repeat)
            lines += [line for preset in ("cityscapes", "cityscapes_v2") for line in
                      (*bench_deploy(get_config(preset), repeat, CITYSCAPES_SIZES, peaks), "")]
            lines.append(PEAK_NOTE + ", ".join(f"{kind} {rate:.0f}" for kind, rate in peaks.items()) + ".")
        elif section == "video":
            lines = bench_video(cfg, repeat, CITYSCAPES_SIZES)
        else:
            lines = bench_eval(cfg, device, repeat)
        block = [f"## {section}", "", *lines, ""]
        print("\n".join(block), flush=True)
        report += block
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write("\n".join(report))
        print(f"wrote {out}")
    else:
        print("report not written: the default file is written by a full run only; pass --out FILE to write this one")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
