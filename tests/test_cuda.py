"""The GPU path, on the first GPU the suite meets: `python -m pytest -m cuda -q` (about 3 minutes on one GPU).

Collected everywhere and skipped, with the reason, where no GPU is visible (the default run hides GPUs: conftest).
Each test trains or scores tiny synthetic data on cuda:0 as train.py and evaluate.py do; the two-process torchrun test
needs two GPUs.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import start_training, tiny_args

import evaluate
import train
from checkpoint import load_for_inference
from configs import get_config
from distributed import Distributed
from transform import normalize

pytestmark = pytest.mark.cuda

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_SETTINGS = ("max_iter=24", "ckpt_every=12", "eval_every=12", "channels_last=auto", "workers=2", "eval_workers=1")


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir):
    return [r["loss"] for r in read_log(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def fp16_run(tiny_root, tmp_path_factory):
    """A tiny run on the GPU in fp16 with its GradScaler (the default amp on CUDA), validated twice."""
    out = tmp_path_factory.mktemp("fp16")
    assert train.main(tiny_args(tiny_root, out, "amp=fp16", *GPU_SETTINGS)) == 0
    return out / "synthetic"


def test_the_fp16_run_trains_on_the_gpu_with_its_scaler_and_counts_skipped_steps(fp16_run):
    log = [r for r in read_log(fp16_run) if "loss" in r]
    assert [r["iter"] for r in log] == list(range(1, 25))
    assert all("skipped_steps" in r for r in log)  # fp16: the scaler's skipped steps are logged
    assert sum(r["skipped_steps"] for r in log) < 12  # a few at the start, while the scale settles
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert last < first, (first, last)
    ckpt = torch.load(fp16_run / "last.pth", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and "cuda" in ckpt["rng"]
    assert [r["iter"] for r in read_log(fp16_run) if "val_miou" in r] == [12, 24]


def test_bf16_and_channels_last_auto_on_the_gpu(tiny_root, tmp_path, capsys):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    assert train.main(tiny_args(tiny_root, tmp_path, "amp=bf16", "max_iter=8", "channels_last=auto")) == 0
    out = capsys.readouterr().out
    assert "device: cuda:0" in out and "amp: bfloat16, channels_last: True" in out
    log = [r for r in read_log(tmp_path / "synthetic") if "loss" in r]
    assert len(log) == 8 and all("skipped_steps" not in r for r in log)  # no scaler in bf16


@pytest.mark.parametrize("mode", ["ss", "ssc", "msf", "mscf"])
def test_every_eval_mode_on_the_gpu_agrees_with_the_cpu(fp16_run, mode, monkeypatch):
    model, cfg = load_for_inference(str(fp16_run / "model_final.pth"), overrides=[f"mode={mode}", "eval_workers=0"])
    gpu = evaluate.evaluate(model, evaluate.eval_dataset(cfg), cfg, Distributed())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_proc = Distributed()
    assert cpu_proc.device.type == "cpu"
    cpu = evaluate.evaluate(model, evaluate.eval_dataset(cfg), cfg, cpu_proc)
    # the same fp32 model: cuDNN's kernels (TF32 convolutions) may flip a pixel where two classes nearly tie
    agree = sum(gpu["confusion"][i][i] for i in range(cfg.num_classes)) - \
        sum(cpu["confusion"][i][i] for i in range(cfg.num_classes))
    total = sum(map(sum, cpu["confusion"]))
    assert abs(agree) <= 0.01 * total
    assert gpu["miou"] == pytest.approx(cpu["miou"], abs=0.02)


def test_the_loader_ships_uint8_and_the_gpu_normalizes_as_the_cpu(tiny_root):
    cfg = get_config("synthetic", [f"data_root={tiny_root}", "crop_size=64,64", "batch_size=2",
                                   "workers=2"])
    proc = Distributed()
    _, loader = train.train_loader(cfg, proc, 0)
    images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (2, 64, 64, 3) and images.is_pinned()
    assert labels.dtype == torch.uint8 and labels.shape == (2, 64, 64)
    on_gpu = normalize(images.to(proc.device, non_blocking=True), cfg.mean, cfg.std, channels_last=True)
    assert on_gpu.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(on_gpu.cpu(), normalize(images, cfg.mean, cfg.std))  # two IEEE roundings on both


def test_sigterm_on_the_gpu_saves_last_pth_without_validating_and_resumes(tiny_root, tmp_path):
    args = tiny_args(tiny_root, tmp_path, "amp=fp16", "max_iter=400", "ckpt_every=1000", "eval_every=200",
                     "workers=2", "eval_workers=1")
    proc = start_training(args, tmp_path / "synthetic" / "log.jsonl", 3, timeout=120)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    done = torch.load(tmp_path / "synthetic" / "last.pth", weights_only=True)["iteration"]
    assert 3 <= done < 400 and f"stopped by SIGTERM after iteration {done}" in err
    assert [r["iter"] for r in read_log(tmp_path / "synthetic") if "loss" in r] == list(range(1, done + 1))
    assert train.main([f"resume={tmp_path / 'synthetic' / 'last.pth'}", f"max_iter={done + 6}"]) == 0
    # bit-exact continuation is the CPU tests' to show: cuDNN's benchmark mode and the atomic adds of upsampling's
    # backward make GPU training itself non-deterministic
    assert [r["iter"] for r in read_log(tmp_path / "synthetic") if "loss" in r] == list(range(1, done + 7))
    final = torch.load(tmp_path / "synthetic" / "model_final.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def test_a_gpu_trained_checkpoint_exports_and_matches_pytorch(fp16_run, tmp_path):
    pytest.importorskip("onnxruntime")
    import export

    output = tmp_path / "model.onnx"
    assert export.main(["--ckpt", str(fp16_run / "model_final.pth"), "--output", str(output)]) == 0
    assert output.stat().st_size > 1_000_000


def test_torchrun_on_two_gpus_with_syncbn_and_validation(tiny_root, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    args = tiny_args(tiny_root, tmp_path, "amp=fp16", "batch_size=4", "max_iter=8", "eval_every=4", "sync_bn=true",
                     "workers=1", "eval_workers=1")
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(REPO, "train.py"), *args], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "processes: 2, batch per process: 2" in out.stdout
    assert [r["iter"] for r in read_log(tmp_path / "synthetic") if "val_miou" in r] == [4, 8]
