"""benchmark.py's sections on tiny inputs: each runs and gives a table whose figures are positive numbers.

(Speed itself is never asserted here: benchmarks/ holds the measured figures.)
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import benchmark
import precision
from configs import get_config
from model import build_model
from synthetic import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A CPU with native bf16 (AVX512-BF16, AMX) and one without: every CPU runs both, precision.native_bf16 patched.
both_bf16_branches = pytest.mark.parametrize("native", [True, False], ids=["native_bf16", "no_native_bf16"])


def table_numbers(lines):
    # the table's body: after its |---| separator line (the line before that is the header)
    start = next(i for i, line in enumerate(lines) if line.startswith("|---")) + 1
    rows = [line for line in lines[start:] if line.startswith("| ")]
    numbers = [float(x) for row in rows for x in re.findall(r"(?<![\w.])(\d+\.?\d*)(?=x? \|)", row)]
    return rows, numbers


def test_data_section(tmp_path):
    generate(str(tmp_path), n_train=2, n_val=0, size=(64, 128), seed=0, progress=False)
    cfg = get_config("cityscapes", ["crop_size=48,48"])
    lines = benchmark.bench_data(cfg, str(tmp_path), repeat=1)
    rows, numbers = table_numbers(lines)
    assert len(rows) == 5 and numbers and all(n > 0 for n in numbers)
    # a 48x48 sample: 3 + 1 bytes a pixel as uint8 image and labels, 12 + 8 as float32 and int64
    assert lines[-1] == ("Bytes a sample takes through the loader's shared and pinned memory: 0.01 MB as uint8 image "
                         "and labels, 0.05 MB as float32 image and int64 labels (5.0x).")


def in_child(expression, native_bf16=None):
    """The value of `expression` (JSON-able; benchmark and get_config in scope) computed in a fresh Python process,
    with precision.native_bf16 answering `native_bf16` for every device where it is given (None: this machine's).

    For the sections that run OpenVINO and NNCF: their threads and compiled models stay out of the test process,
    as they stay out of a training run's.
    """
    patch = "" if native_bf16 is None else f"precision.native_bf16 = lambda device: {native_bf16}\n"
    code = ("import json, torch, benchmark, precision\nfrom configs import get_config\n" + patch +
            f"print('RESULT ' + json.dumps({expression}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def exported_names(native):
    """The exported rows in order, on a CPU with (native=True) or without native bf16."""
    return ["ONNX Runtime fp32", "OpenVINO fp32"] + ["OpenVINO bf16"] * native + ["OpenVINO INT8 (NNCF)"]


def test_latency_section_has_a_row_per_variant():
    # this machine's branch, from the function the benchmark asks; the other one is covered by the tests below
    native = precision.native_bf16(torch.device("cpu"))
    lines = in_child('benchmark.bench_latency(get_config("synthetic"), torch.device("cpu"), repeat=1, '
                     'sizes=[(32, 64), (64, 96)], compile=False)')
    rows, numbers = table_numbers(lines)
    names = [row.split(" | ")[0].strip("| ") for row in rows]
    assert names == ["fp32 eager", "fp32 folded BN", "fp32 folded BN + channels_last (`inference_model`)",
                     *["bf16 autocast folded + channels_last (`eval_amp=bf16`)"] * native]
    assert rows[0].endswith("| 1.00x / 1.00x |") and all(n > 0 for n in numbers)
    assert any("FLOPs" in line for line in lines)
    assert any(line.startswith("- bf16 autocast: not run") for line in lines) is not native


@both_bf16_branches
def test_latency_variants_have_a_bf16_row_exactly_where_bf16_is_native(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    model = build_model(get_config("synthetic", ["aux_heads=false"]), pretrained=False).eval()
    variants = benchmark.latency_variants(model, torch.device("cpu"), compile=False)
    assert [name for name, _, _ in variants][3:] == ["bf16 autocast folded + channels_last (`eval_amp=bf16`)"] * native
    if native:  # the row runs the model under bf16 autocast (emulated where the CPU lacks it): float32 logits out
        bf16 = variants[3][1]
        assert bf16.dtype == torch.bfloat16 and bf16(torch.zeros(1, 3, 32, 32)).dtype == torch.float32


@both_bf16_branches
def test_exported_rows_have_openvino_bf16_exactly_where_bf16_is_native(native):
    names, notes = in_child('(lambda m, n: ([name for name, _ in m], n))(*benchmark.exported_models(__import__('
                            '"model").build_model(get_config("synthetic", ["aux_heads=false"]), pretrained=False)'
                            '.eval(), __import__("tempfile").mkdtemp(), (32, 64), calibration=1))', native)
    assert names == exported_names(native)
    assert any(note.startswith("OpenVINO bf16: not run; this CPU has no native bf16") for note in notes) is not native


@both_bf16_branches
def test_a_missing_runtime_is_one_note_however_many_rows_it_feeds(monkeypatch, tmp_path, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    model = build_model(get_config("synthetic", ["aux_heads=false"]), pretrained=False).eval()
    models, notes = benchmark.exported_models(model, str(tmp_path), (32, 64), calibration=1)
    assert [name for name, _ in models] == ["ONNX Runtime fp32"]
    assert models[0][1](torch.zeros(1, 3, 32, 64)).shape == (1, 19, 32, 64)
    [missing] = [note for note in notes if "not installed" in note]  # one note, though it stops 2 or 3 rows
    assert missing.startswith(", ".join(exported_names(native)[1:]) + ": not run (the openvino package is needed")
    assert missing.endswith("pip install -r requirements-deploy.txt)")


LABELS_ROWS = ["OpenVINO fp32 labels (half)", "OpenVINO INT8 labels (half)", "OpenVINO INT8 labels (bilinear)",
               "OpenVINO INT8 labels (nearest)"]


@both_bf16_branches
def test_deploy_section_times_every_exported_file_against_openvinos_logits(native):
    """Every file export.py writes, its request alone and its call; frames/s, the share of the peak given and the
    ratio to the baseline (bf16 logits where bf16 is native, else fp32) recomputed from the table's own figures."""
    sizes, peaks = [(32, 64), (48, 80)], {"f32": 100.0, "bf16": 200.0, "INT8": 400.0}
    lines = in_child(f'benchmark.bench_deploy(get_config("synthetic"), 1, {sizes}, {peaks})', native)
    rows, _ = table_numbers(lines)
    cells = [[c.strip() for c in row.strip("| ").split(" | ")] for row in rows]
    assert [c[0] for c in cells] == exported_names(native) + LABELS_ROWS
    int8_hint = "bf16" if native else "f32"
    assert [c[1] for c in cells] == ["", "f32"] + ["bf16"] * native + [int8_hint, "f32"] + [int8_hint] * 3
    base = cells[2] if native else cells[1]
    assert next(line for line in lines if line.startswith("| file")).endswith(f"| call vs {base[0]} |")
    gflops = benchmark.count_gflops(build_model(get_config("synthetic", ["aux_heads=false"]), pretrained=False),
                                    sizes[0])
    for c in cells:
        requests, calls = [float(x) if x != "-" else None for x in c[2:4]], [float(x) for x in c[4:6]]
        assert (requests == [None, None]) is (c[0] == "ONNX Runtime fp32") and all(t > 0 for t in calls)
        # ms and frames/s each printed to 0.1
        assert 1000 / (calls[0] + 0.05) - 0.05 <= float(c[6]) <= 1000 / (calls[0] - 0.05) + 0.05
        kind = "INT8" if "INT8" in c[0] else c[1] or "f32"
        share, suffix = c[7].split("% of ")
        assert suffix == kind
        assert float(share) == pytest.approx(100 * gflops / ((requests[0] or calls[0]) / 1000) / peaks[kind], rel=0.1,
                                             abs=1)
        ratios = [float(r.rstrip("x")) for r in c[8].split(" / ")]
        expected = [t / float(b) for t, b in zip(calls, base[4:6], strict=True)]
        assert ratios == pytest.approx(expected, rel=0.1, abs=0.01)
    goal = next(line for line in lines if line.startswith("Goal:"))
    target = "0.5x" if native else "0.45x"
    assert goal.startswith(f"Goal: OpenVINO INT8 labels (half), the call, at most {target} the {base[0]} logits")
    assert goal.endswith(f": {cells[-3][8].split(' / ')[0]}.")


@both_bf16_branches
def test_peak_rates_have_each_precision_this_cpu_runs(native):
    rates, notes = in_child("benchmark.peak_rates(1, channels=64, hw=8, depth=2)", native)
    assert sorted(rates) == sorted(["f32", "INT8"] + ["bf16"] * native) and all(r > 0 for r in rates.values())
    assert notes == []


def test_video_section_gives_frames_per_second_of_each_pipeline():
    lines = in_child('benchmark.bench_video(get_config("synthetic"), 1, [(32, 64), (48, 80)], frames=4)')
    rows, numbers = table_numbers(lines)
    names = [row.split(" | ")[0].strip("| ") for row in rows]
    assert len(rows) == 3 and names[1] == "decode + INT8 labels + colorize, one request at a time"
    assert names[0].startswith("decode + INT8 labels + colorize, ") and names[0].endswith("(throughput hint)")
    assert names[2].startswith("demo.py: + overlay and legend, two videos encoded")
    assert len(numbers) == 6 and all(n > 0 for n in numbers)


def test_eval_section_has_every_mode_in_torch_and_openvino(monkeypatch):
    lines = in_child('benchmark.bench_eval(get_config("synthetic", ["eval_crop=32,32", "eval_scales=0.5,1.0", '
                     '"eval_batch=2"]), torch.device("cpu"), repeat=1, hw=(48, 80))')
    rows, numbers = table_numbers(lines)
    assert [row.split(" | ")[0].strip("| ") for row in rows] == ["ss", "ssc", "msf", "mscf"]
    header = next(line for line in lines if line.startswith("| mode"))
    openvino = exported_names(precision.native_bf16(torch.device("cpu")))[1:]
    assert header.endswith("| speed vs plain |" + "".join(f" {name} s/image |" for name in openvino))
    assert all(len(row.split("|")) == len(header.split("|")) for row in rows)
    assert rows[0].split(" | ")[2] == "1.0x" and all(n > 0 for n in numbers)
    assert any("one crop at a time" in line for line in lines)


@both_bf16_branches
def test_train_section_has_fp32_and_the_precisions_this_device_grants(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)  # bf16 runs emulated on any CPU
    cfg = get_config("synthetic", ["crop_size=32,32"])
    rows, numbers = table_numbers(benchmark.bench_train(cfg, torch.device("cpu"), batch=2, repeat=1))
    assert [row.split(" | ")[0].strip("| ") for row in rows] == ["fp32"] + ["bf16 autocast (`amp=bf16`)"] * native
    assert rows[0].endswith("| 1.00x |") and len(numbers) == 3 * len(rows) and all(n > 0 for n in numbers)


@both_bf16_branches
def test_preset_variants_change_one_thing_each(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    cfg = get_config("camvid")
    variants = benchmark.cpu_variants(cfg, torch.device("cpu"))
    assert [(name, c.channels_last, amp, compile) for name, c, amp, compile in variants] == [
        ("fp32", "false", "none", False), ("fp32, channels_last", "true", "none", False),
        *[("bf16 autocast, channels_last", "true", "bf16", False)] * native,
        ("fp32, channels_last, torch.compile", "true", "none", True)]
    assert all(c.crop_size == cfg.crop_size for _, c, _, _ in variants)


# /proc/cpuinfo flags of the three CPU classes (abridged), with what PyTorch's get_cpu_capability() says on each
AVX2_FLAGS = {"sse4_2", "avx", "avx2", "fma"}
AVX512_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


@pytest.mark.parametrize("capability, flags, isa", [
    ("AVX2", AVX2_FLAGS, "AVX2"),
    ("AVX512", AVX512_FLAGS, "AVX512"),
    ("AVX512", AVX512_FLAGS | {"avx512_bf16"}, "AVX512-BF16"),  # e.g. AMD EPYC Zen 4
    ("AVX512", AVX512_FLAGS | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}, "AMX"),  # Intel Xeon Sapphire Rapids
    ("DEFAULT", set(), "DEFAULT"),  # no vector ISA PyTorch uses (or another architecture): its own word
])
def test_the_report_names_the_cpus_isa_from_capability_and_flags(capability, flags, isa):
    assert benchmark.cpu_isa(capability, flags) == isa


def test_cpu_info_reads_the_model_name_and_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert benchmark.cpu_info(str(path)) == ("Test CPU 9000", {"fpu", "avx2", "avx512_bf16"})
    assert benchmark.cpu_info(str(tmp_path / "absent"))[1] == set()


def test_presets_section_times_each_variant_of_each_preset(monkeypatch):
    # torch.compile is left out here (tens of seconds to compile): the variant list is checked above
    monkeypatch.setattr(benchmark, "cpu_variants", lambda cfg, device: [
        ("fp32", cfg, "none", False),
        ("fp32, channels_last", get_config(base=cfg.to_dict(), overrides=["channels_last=true"]), "none", False)])
    monkeypatch.setattr(benchmark, "get_config", lambda preset: get_config(preset, ["crop_size=32,32"]))
    lines = benchmark.bench_presets(torch.device("cpu"), batch=2, repeat=1)
    assert [line for line in lines if line.startswith("Preset")] == ["Preset `synthetic`:", "Preset `camvid`:",
                                                                     "Preset `camvid_v2`:"]
    assert sum(line.startswith("| fp32, channels_last |") for line in lines) == 3
    titles = [line for line in lines if line.startswith("Training step of")]
    assert [title.split(" (")[0].split()[-1] for title in titles] == ["BiSeNet", "BiSeNet", "BiSeNetV2"]
    assert [re.search(r"OHEM loss on (\d) heads", title).group(1) for title in titles] == ["3", "3", "5"]


def test_timed_on_the_cpu_is_the_median_wall_time_after_a_warm_up():
    calls = []

    def nap():
        calls.append(1)
        time.sleep(0.02)

    seconds = benchmark.timed(nap, torch.device("cpu"), repeat=3)
    assert len(calls) == 4 and 0.02 <= seconds < 0.2


class FakeEvent:
    """torch.cuda.Event stand-in: record() notes the host time; elapsed_time() is in milliseconds, as CUDA's."""

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self):
        self.at = time.perf_counter()

    def synchronize(self):
        assert self.at is not None  # waited for only once recorded

    def elapsed_time(self, end):
        return 1000 * (end.at - self.at)


def test_timed_on_cuda_reads_events_around_the_call_and_converts_milliseconds(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    seconds = benchmark.timed(lambda: time.sleep(0.02), torch.device("cuda"), repeat=3)
    assert 0.02 <= seconds < 0.2


@pytest.mark.parametrize("isa", ["AVX2", "AVX512-BF16", "AMX"])
@pytest.mark.parametrize("argv, written", [
    ([], "benchmarks/{isa}.md"),  # a full run writes the report of its machine class
    (["--only", "eval"], None),  # a partial run only prints: it would replace the whole report with one section
    (["--only", "eval", "--out", "eval.md"], "eval.md"),  # unless a file is named
])
def test_only_a_full_run_writes_the_report_of_its_machine_class(monkeypatch, tmp_path, capsys, isa, argv, written):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark, "machine_class", lambda: isa)
    for section in benchmark.SECTIONS:
        monkeypatch.setattr(benchmark, f"bench_{section}", lambda *args, section=section, **kw: [f"{section} table"])
    monkeypatch.setattr(benchmark, "generate", lambda *args, **kw: None)
    monkeypatch.setattr(benchmark, "peak_rates", lambda repeat: ({}, []))  # the deploy section's own measurement
    assert benchmark.main(argv) == 0
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, names in os.walk(tmp_path) for f in names)
    assert files == ([written.format(isa=isa)] if written else [])
    if written:
        text = (tmp_path / written.format(isa=isa)).read_text()
        sections = benchmark.SECTIONS if not argv else ("eval",)
        assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == list(sections)
    else:
        assert "pass --out FILE" in capsys.readouterr().out


@pytest.mark.parametrize("capability, flags, isa", [
    ("AVX2", AVX2_FLAGS, "AVX2"), ("AVX512", AVX512_FLAGS | {"avx512_bf16"}, "AVX512-BF16"),
    ("AVX512", AVX512_FLAGS | {"avx512_bf16", "amx_tile", "amx_bf16"}, "AMX")])
def test_the_machine_class_is_the_cpus_isa_without_a_gpu(monkeypatch, capability, flags, isa):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(benchmark, "cpu_info", lambda: ("Test CPU", flags))
    assert benchmark.machine_class() == isa


def test_the_machine_class_is_the_gpus_name_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert benchmark.machine_class() == "NVIDIA-H100-80GB-HBM3"
