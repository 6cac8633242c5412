"""benchmark.py's sections on tiny inputs: each runs and gives a table whose figures are positive numbers.

(Speed itself is never asserted here: BENCHMARKS.md holds the measured figures.)
"""

import os
import re
import time

import pytest
import torch

import benchmark
import precision
from configs import get_config
from synthetic import generate


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


def test_latency_section_has_a_row_per_variant():
    cfg = get_config("synthetic")
    lines = benchmark.bench_latency(cfg, torch.device("cpu"), repeat=1, sizes=[(32, 64), (64, 96)], compile=False)
    rows, numbers = table_numbers(lines)
    names = [row.split(" | ")[0].strip("| ") for row in rows]
    assert names[:3] == ["fp32 eager", "fp32 folded BN", "fp32 folded BN + channels_last (`inference_model`)"]
    assert names[-1] == "ONNX Runtime (CPU), folded"
    assert rows[0].endswith("| 1.00x / 1.00x |") and all(n > 0 for n in numbers)
    assert any("FLOPs" in line for line in lines)


def test_eval_section_has_every_mode(monkeypatch):
    cfg = get_config("synthetic", ["eval_crop=32,32", "eval_scales=0.5,1.0", "eval_batch=2"])
    lines = benchmark.bench_eval(cfg, torch.device("cpu"), repeat=1, hw=(48, 80))
    rows, numbers = table_numbers(lines)
    assert [row.split(" | ")[0].strip("| ") for row in rows] == ["ss", "ssc", "msf", "mscf"]
    assert rows[0].split(" | ")[2] == "1.0x" and all(n > 0 for n in numbers)
    assert "one crop at a time" in lines[-1]


def test_train_section_has_fp32_and_the_precisions_this_device_grants(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # bf16 runs emulated on any CPU
    cfg = get_config("synthetic", ["crop_size=32,32"])
    rows, numbers = table_numbers(benchmark.bench_train(cfg, torch.device("cpu"), batch=2, repeat=1))
    assert [row.split(" | ")[0].strip("| ") for row in rows] == ["fp32", "bf16 autocast (`amp=bf16`)"]
    assert rows[0].endswith("| 1.00x |") and len(numbers) == 6 and all(n > 0 for n in numbers)


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
