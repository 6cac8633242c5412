import json
import os
import subprocess
import sys

import pytest
import torch

import train
from configs import get_config
from model import build_model, load_checkpoint
from synthetic import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two runs of the preset on 2 CPU cores reached 0.217 (lr 0.02, the preset) and 0.207 (lr 0.05).
SYNTHETIC_MIOU_FLOOR = 0.15


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    generate(root, n_train=8, n_val=3, size=(64, 128), seed=3, progress=False)
    return root


def tiny_args(root, out, *extra):
    return ["--config", "synthetic", "synthetic=false", f"data_root={root}", f"out_dir={out}", "crop_size=64,64",
            "batch_size=2", "max_iter=6", "warmup_iters=2", "log_every=1", "ckpt_every=3", "workers=0",
            "eval_workers=0", *extra]


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_state(run_dir):
    return torch.load(os.path.join(run_dir, "model_final.pth"), weights_only=True)["model"]


def test_short_run_lowers_the_loss_and_writes_loadable_checkpoints(tiny_root, tmp_path):
    assert train.main(tiny_args(tiny_root, tmp_path, "max_iter=16", "lr=0.01")) == 0
    run_dir = tmp_path / "synthetic"
    log = read_log(run_dir)
    assert [r["iter"] for r in log] == list(range(1, 17))
    assert log[0]["loss_sums"] == "main+aux8+aux16"
    assert log[0]["loss"] == pytest.approx(log[0]["loss_main"] + log[0]["loss_aux8"] + log[0]["loss_aux16"])
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    cfg = get_config("synthetic", ["crop_size=64,64"])
    ckpt = load_checkpoint(build_model(cfg, pretrained=False), str(run_dir / "last.pth"))
    assert ckpt["iteration"] == 16 and ckpt["config"]["max_iter"] == 16
    load_checkpoint(build_model(cfg, pretrained=False), str(run_dir / "model_final.pth"))
    with open(run_dir / "config.json") as f:
        assert json.load(f)["batch_size"] == 2
    with open(run_dir / "eval.json") as f:
        assert 0 <= json.load(f)["miou"] <= 1
    assert not [p for p in os.listdir(run_dir) if ".tmp" in p]


class Crash(Exception):
    pass


def test_resume_continues_exactly_where_the_run_stopped(tiny_root, tmp_path, monkeypatch):
    assert train.main(tiny_args(tiny_root, tmp_path / "straight")) == 0
    straight = final_state(tmp_path / "straight" / "synthetic")

    save = train.save_checkpoint

    def save_then_crash(path, state):
        save(path, state)
        if state.get("iteration") == 3:
            raise Crash

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train.main(tiny_args(tiny_root, tmp_path / "resumed"))
    monkeypatch.setattr(train, "save_checkpoint", save)
    run_dir = tmp_path / "resumed" / "synthetic"
    # Resumed with two loader workers: the data stream does not depend on them.
    assert train.main([f"resume={run_dir / 'last.pth'}", "workers=2"]) == 0
    resumed = final_state(run_dir)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0, msg=key)
    assert [r["iter"] for r in read_log(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_root, tmp_path, monkeypatch):
    import loss

    forward, calls = loss.BiSeNetLoss.forward, []

    def nan_at_fifth(self, outputs, target):
        calls.append(1)
        total, parts = forward(self, outputs, target)
        return (total * float("nan"), parts) if len(calls) == 5 else (total, parts)

    monkeypatch.setattr(loss.BiSeNetLoss, "forward", nan_at_fifth)
    with pytest.raises(SystemExit, match="not finite at iteration 5") as err:
        train.main(tiny_args(tiny_root, tmp_path))
    last = tmp_path / "synthetic" / "last.pth"
    assert str(last) in str(err.value)
    ckpt = load_checkpoint(build_model(get_config("synthetic"), pretrained=False), str(last))
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_used_run_directory_is_never_overwritten(tiny_root, tmp_path):
    for _ in range(2):
        assert train.main(tiny_args(tiny_root, tmp_path, "max_iter=3", "ckpt_every=3")) == 0
    assert sorted(os.listdir(tmp_path)) == ["synthetic", "synthetic-1"]


@pytest.mark.parametrize("argv, words", [
    (["--config", "nope"], "unknown config 'nope'"),
    (["--config", "synthetic", "lr=fast"], "lr: 'fast'"),
    (["resume=/no/such/last.pth"], "/no/such/last.pth"),
    (["--config", "synthetic", "data_root=/no/such/root", "synthetic=false"], "--config synthetic"),
    (["--config", "synthetic", "batch_size=1"], "batch_size=1 gives 1 image per process"),
])
def test_bad_input_is_a_clear_error(argv, words, capsys, tmp_path):
    # The synthetic preset's data root goes to tmp_path too: a failing run must not write into the repository.
    root = [] if any(a.startswith("data_root=") for a in argv) else [f"data_root={tmp_path / 'data'}"]
    assert train.main([*argv, *root, f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and words in err
    assert not (tmp_path / "data").exists()  # the error comes before any data is generated


def test_sampler_positions_shard_and_resume():
    full = train.InfiniteSampler(5, seed=1, rank=0, world=1)
    stream = [next(it) for it in [iter(full)] for _ in range(12)]
    # Each epoch of 5 is a permutation; the augmentation seed is (seed, position).
    assert sorted(i for i, _ in stream[:5]) == list(range(5)) and sorted(i for i, _ in stream[5:10]) == list(range(5))
    assert [s for _, s in stream] == [(1, p) for p in range(12)]
    ranks = [iter(train.InfiniteSampler(5, seed=1, rank=r, world=2)) for r in range(2)]
    sharded = [next(ranks[p % 2]) for p in range(12)]
    assert sharded == stream
    later = iter(train.InfiniteSampler(5, seed=1, rank=1, world=2, start=3))
    assert [next(later) for _ in range(3)] == stream[7:12:2]


def test_torchrun_two_processes_keep_identical_weights_and_write_once(tiny_root, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import os, sys, torch\n"
        "import train\n"
        "from configs import get_config\n"
        "from distributed import Distributed\n"
        "cfg = get_config('synthetic', sys.argv[2:])\n"
        "ddp = Distributed()\n"
        "model, run_dir = train.train(cfg, ddp)\n"
        "torch.save(model.state_dict(), os.path.join(sys.argv[1], f'rank{ddp.rank}.pt'))\n"
        "ddp.close()\n")
    args = tiny_args(tiny_root, tmp_path / "runs", "batch_size=4", "max_iter=4", "ckpt_every=2")[2:]
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path), *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert os.listdir(tmp_path / "runs") == ["synthetic"]
    assert sorted(os.listdir(tmp_path / "runs" / "synthetic")) == ["config.json", "last.pth", "log.jsonl",
                                                                    "model_final.pth"]
    assert "batch per process: 2" in out.stdout and out.stdout.count("run directory:") == 1
    log = read_log(tmp_path / "runs" / "synthetic")
    assert [r["iter"] for r in log] == [1, 2, 3, 4]


def test_the_synthetic_preset_learns_end_to_end(tmp_path, capsys):
    """The README's first command with its defaults (only the folders moved): generate, train, evaluate.

    A few minutes on 2 CPU cores. The threshold is well under what the preset reaches (README: Quick start),
    and far above a model that learned nothing (0.003 for the untrained model).
    """
    data = tmp_path / "data"
    assert train.main(["--config", "synthetic", f"data_root={data}", f"out_dir={tmp_path}"]) == 0
    with open(tmp_path / "synthetic" / "eval.json") as f:
        results = json.load(f)
    assert results["images"] == 16 and results["split"] == "val"
    assert results["miou"] > SYNTHETIC_MIOU_FLOOR and results["pixel_accuracy"] > 0.6
    assert "mIoU" in capsys.readouterr().out
    log = read_log(tmp_path / "synthetic")
    assert log[-1]["iter"] == 300 and log[-1]["loss"] < 0.7 * log[0]["loss"]


def test_amp_dtype_per_device_and_setting(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert train.amp_dtype("fp16", cuda) == torch.float16 and train.amp_dtype("bf16", cuda) == torch.bfloat16
    assert train.amp_dtype("none", cuda) is None and train.amp_dtype("fp16", cpu) is None
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    assert train.amp_dtype("bf16", cpu) is None
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert train.amp_dtype("bf16", cpu) == torch.bfloat16
    cfg = get_config("synthetic", ["amp=bf16"])
    autocast, scaler = train.amp_settings(cfg, cpu)
    assert isinstance(autocast, torch.autocast) and autocast.fast_dtype == torch.bfloat16 and not scaler.is_enabled()


def test_cpu_bf16_training_runs_and_lowers_the_loss(tiny_root, tmp_path, monkeypatch, capsys):
    # bf16 autocast works on any CPU (emulated where not native): the loop, loss and checkpoint take bf16 logits
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert train.main(tiny_args(tiny_root, tmp_path, "max_iter=16", "lr=0.01", "amp=bf16")) == 0
    assert "amp: bfloat16" in capsys.readouterr().out
    log = read_log(tmp_path / "synthetic")
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert all(r["loss"] == r["loss"] for r in log) and last < 0.8 * first, (first, last)
