"""benchmark.py's sections on tiny inputs: each runs and gives a table whose figures are positive numbers.

(Speed itself is never asserted here: BENCHMARKS.md holds the measured figures.)
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
from precision import native_bf16
from synthetic import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def table_numbers(lines):
    # the table's body: after its |---| separator line (the line before that is the header)
    start = next(i for i, line in enumerate(lines) if line.startswith("|---")) + 1
    rows = [line for line in lines[start:] if line.startswith("| ")]
    numbers = [float(x) for row in rows for x in re.findall(r"(?<![\w.])(\d+\.?\d*)(?=x? \|)", row)]
    return rows, numbers


def test_data_section(tmp_path):
    generate(str(tmp_path), n_train=2, n_val=0, size=(64, 128), seed=0, progress=False)
    cfg = get_config("cityscapes", ["crop_size=48,48"])
    rows, numbers = table_numbers(benchmark.bench_data(cfg, str(tmp_path), repeat=1))
    assert len(rows) == 5 and numbers and all(n > 0 for n in numbers)


def in_child(expression):
    """The value of `expression` (JSON-able; benchmark and get_config in scope) computed in a fresh Python process.

    For the sections that run OpenVINO and NNCF: run inside the test process, beside the torch threads of the
    other tests, they were followed by a crash in a later test (heap corruption in the interpreter's allocator);
    benchmark.py itself runs them in a process of its own.
    """
    code = ("import json, torch, benchmark\nfrom configs import get_config\n"
            f"print('RESULT ' + json.dumps({expression}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def test_latency_section_has_a_row_per_variant():
    lines = in_child('benchmark.bench_latency(get_config("synthetic"), torch.device("cpu"), repeat=1, '
                     'sizes=[(32, 64), (64, 96)], compile=False)')
    rows, numbers = table_numbers(lines)
    names = [row.split(" | ")[0].strip("| ") for row in rows]
    assert names[:3] == ["fp32 eager", "fp32 folded BN", "fp32 folded BN + channels_last (`inference_model`)"]
    exported = ["ONNX Runtime fp32", "OpenVINO fp32"] + ["OpenVINO bf16"] * native_bf16(torch.device("cpu"))
    assert names[-len(exported) - 1:] == exported + ["OpenVINO INT8 (NNCF)"]
    assert rows[0].endswith("| 1.00x / 1.00x |") and all(n > 0 for n in numbers)
    assert any("FLOPs" in line for line in lines)


def test_exported_rows_without_openvino_say_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    model = build_model(get_config("synthetic", ["aux_heads=false"]), pretrained=False).eval()
    models, notes = benchmark.exported_models(model, str(tmp_path), (32, 64), calibration=1)
    assert [name for name, _ in models] == ["ONNX Runtime fp32"]
    assert models[0][1](torch.zeros(1, 3, 32, 64)).shape == (1, 19, 32, 64)
    missing = [note for note in notes if "not installed" in note]
    assert len(missing) == 2 and all("pip install -r requirements-deploy.txt" in note for note in missing)


def test_eval_section_has_every_mode_in_torch_and_openvino(monkeypatch):
    lines = in_child('benchmark.bench_eval(get_config("synthetic", ["eval_crop=32,32", "eval_scales=0.5,1.0", '
                     '"eval_batch=2"]), torch.device("cpu"), repeat=1, hw=(48, 80))')
    rows, numbers = table_numbers(lines)
    assert [row.split(" | ")[0].strip("| ") for row in rows] == ["ss", "ssc", "msf", "mscf"]
    header = next(line for line in lines if line.startswith("| mode"))
    assert header.endswith("| OpenVINO fp32 s/image | OpenVINO INT8 (NNCF) s/image |") or native_bf16(
        torch.device("cpu"))
    assert all(len(row.split("|")) == len(header.split("|")) for row in rows)
    assert rows[0].split(" | ")[2] == "1.0x" and all(n > 0 for n in numbers)
    assert any("one crop at a time" in line for line in lines)


def test_train_section_has_fp32_and_the_precisions_this_device_grants(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # bf16 runs emulated on any CPU
    cfg = get_config("synthetic", ["crop_size=32,32"])
    rows, numbers = table_numbers(benchmark.bench_train(cfg, torch.device("cpu"), batch=2, repeat=1))
    assert [row.split(" | ")[0].strip("| ") for row in rows] == ["fp32", "bf16 autocast (`amp=bf16`)"]
    assert rows[0].endswith("| 1.00x |") and len(numbers) == 6 and all(n > 0 for n in numbers)


def test_preset_variants_change_one_thing_each(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    cfg = get_config("camvid")
    variants = benchmark.cpu_variants(cfg, torch.device("cpu"))
    assert [(name, c.channels_last, amp, compile) for name, c, amp, compile in variants] == [
        ("fp32", False, "none", False), ("fp32, channels_last", True, "none", False),
        ("bf16 autocast, channels_last", True, "bf16", False),
        ("fp32, channels_last, torch.compile", True, "none", True)]
    assert all(c.crop_size == cfg.crop_size for _, c, _, _ in variants)


def test_presets_section_times_each_variant_of_each_preset(monkeypatch):
    # torch.compile is left out here (tens of seconds to compile): the variant list is checked above
    monkeypatch.setattr(benchmark, "cpu_variants", lambda cfg, device: [
        ("fp32", cfg, "none", False),
        ("fp32, channels_last", get_config(base=cfg.to_dict(), overrides=["channels_last=true"]), "none", False)])
    monkeypatch.setattr(benchmark, "get_config", lambda preset: get_config(preset, ["crop_size=32,32"]))
    lines = benchmark.bench_presets(torch.device("cpu"), batch=2, repeat=1)
    assert [line for line in lines if line.startswith("Preset")] == ["Preset `synthetic`:", "Preset `camvid`:"]
    assert sum(line.startswith("| fp32, channels_last |") for line in lines) == 2


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


@pytest.mark.parametrize("argv, written", [
    ([], "BENCHMARKS.md"),  # a full run writes the report
    (["--only", "eval"], None),  # a partial run only prints: it would replace the whole report with one section
    (["--only", "eval", "--out", "eval.md"], "eval.md"),  # unless a file is named
])
def test_only_a_full_run_writes_benchmarks_md(monkeypatch, tmp_path, capsys, argv, written):
    monkeypatch.chdir(tmp_path)
    for section in benchmark.SECTIONS:
        monkeypatch.setattr(benchmark, f"bench_{section}", lambda *args, section=section, **kw: [f"{section} table"])
    monkeypatch.setattr(benchmark, "generate", lambda *args, **kw: None)
    assert benchmark.main(argv) == 0
    assert os.listdir(tmp_path) == ([written] if written else [])
    if written:
        text = (tmp_path / written).read_text()
        sections = benchmark.SECTIONS if not argv else ("eval",)
        assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == list(sections)
    else:
        assert "pass --out FILE" in capsys.readouterr().out
