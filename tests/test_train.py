import argparse
import json
import os
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch
from conftest import copy_run, start_training, tiny_args

import checkpoint
import configs
import precision
import synthetic
import train
from checkpoint import load_checkpoint
from configs import add_config_args, format_config, get_config
from distributed import Distributed
from model import build_model
from optimizer import build_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The end-to-end test's smaller problem reached 0.179 (bf16) and 0.174 (fp32) on 2 CPU cores; untrained: 0.003.
SYNTHETIC_MIOU_FLOOR = 0.10




def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_state(run_dir):
    return torch.load(os.path.join(run_dir, "model_final.pth"), weights_only=True)["model"]


def train_only(argv):
    """What `python train.py ARGV` does, without the final evaluation: (config, run directory)."""
    cfg = train.read_config(add_config_args(argparse.ArgumentParser()).parse_args(argv))
    return cfg, train.train(cfg, Distributed())[1]


def poly_lr(it, lr, warmup_iters, max_iter, power=0.9):
    return lr * (1 - (it - warmup_iters) / (max_iter - warmup_iters)) ** power


def test_short_run_lowers_the_loss_and_writes_loadable_checkpoints(tiny_root, tmp_path, capsys):
    assert train.main(tiny_args(tiny_root, tmp_path, "max_iter=16", "lr=0.01", "aux_weight=0.4")) == 0
    assert "loss = main+0.4*(aux8+aux16)" in capsys.readouterr().out
    run_dir = tmp_path / "synthetic"
    log = read_log(run_dir)
    assert [r["iter"] for r in log] == list(range(1, 17))
    # The logged loss is the optimized one: the heads weighted as the config says.
    for r in log:
        assert r["loss_sums"] == "main+0.4*(aux8+aux16)"
        assert r["loss"] == pytest.approx(r["loss_main"] + 0.4 * (r["loss_aux8"] + r["loss_aux16"]), rel=1e-6)
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    cfg = get_config("synthetic", ["crop_size=64,64"])
    ckpt = load_checkpoint(build_model(cfg, pretrained=False), str(run_dir / "last.pth"))
    assert ckpt["iteration"] == 16 and ckpt["config"]["max_iter"] == 16
    # The last step ran at the schedule's lr for iteration 15 (poly after 2 warmup iterations), times each multiplier.
    lrs = {g["name"]: g["lr"] for g in ckpt["optimizer"]["param_groups"]}
    base = poly_lr(15, 0.01, 2, 16)
    assert lrs == pytest.approx({"base": base, "base_no_decay": base, "head": 10 * base, "head_no_decay": 10 * base})
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
        assert torch.equal(resumed[key], straight[key]), key  # bit for bit
    assert [r["iter"] for r in read_log(run_dir)] == [1, 2, 3, 4, 5, 6]


def nan_at_fifth_call(monkeypatch, poison):
    """Make the 5th loss computation return poison(total) instead of the loss total."""
    import loss

    forward, calls = loss.BiSeNetLoss.forward, []

    def forward_with_nan(self, outputs, target):
        calls.append(1)
        total, parts = forward(self, outputs, target)
        return (poison(total), parts) if len(calls) == 5 else (total, parts)

    monkeypatch.setattr(loss.BiSeNetLoss, "forward", forward_with_nan)


def assert_stopped_at_5_with_checkpoint_3(tmp_path, err, words):
    assert f"error: {words} at iteration 5" in err
    last = tmp_path / "synthetic" / "last.pth"
    assert f"{last} holds iteration 3, where the logged loss was " in err
    ckpt = load_checkpoint(build_model(get_config("synthetic"), pretrained=False), str(last))
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_non_finite_loss_stops_keeps_the_last_checkpoint_and_resumes(tiny_root, tmp_path, monkeypatch, capsys):
    nan_at_fifth_call(monkeypatch, lambda total: total * float("nan"))
    assert train.main(tiny_args(tiny_root, tmp_path)) == 1
    assert_stopped_at_5_with_checkpoint_3(tmp_path, capsys.readouterr().err, "the loss is not finite")
    run_dir = tmp_path / "synthetic"
    assert [r["iter"] for r in read_log(run_dir)] == [1, 2, 3, 4]  # logged past the checkpoint
    monkeypatch.undo()
    train_only([f"resume={run_dir / 'last.pth'}"])
    assert [r["iter"] for r in read_log(run_dir)] == [1, 2, 3, 4, 5, 6]  # iteration 4 once, from the resumed run


def test_non_finite_gradient_stops_before_the_update(tiny_root, tmp_path, monkeypatch, capsys):
    # A finite loss whose gradient is NaN: the update would write NaN into the weights of the next checkpoint.
    def nan_gradient(total):
        total.register_hook(lambda grad: grad * float("nan"))
        return total

    nan_at_fifth_call(monkeypatch, nan_gradient)
    assert train.main(tiny_args(tiny_root, tmp_path)) == 1
    err = capsys.readouterr().err
    assert_stopped_at_5_with_checkpoint_3(tmp_path, err, "the loss is finite but its gradients are not")


def test_finite_flags_leave_gradients_to_the_fp16_scaler():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    params[0].grad, params[1].grad = torch.tensor([1.0, -2.0, 2.0**40]), torch.tensor([0.5, 4.0])
    loss = torch.tensor(0.5)
    assert train.finite_flags(loss, params, check_grads=True).tolist() == [1.0, 1.0]
    assert params[0].grad.tolist() == [1.0, -2.0, 2.0**40] and params[1].grad.tolist() == [0.5, 4.0]  # untouched
    params[1].grad[0] = float("inf")
    assert train.finite_flags(loss, params, check_grads=True).tolist() == [1.0, 0.0]
    # fp16 with GradScaler: inf gradients are the scaler's business (it skips the step and lowers its scale)
    assert train.finite_flags(loss, params, check_grads=False).tolist() == [1.0, 1.0]
    assert train.finite_flags(torch.tensor(float("nan")), params, check_grads=False).tolist() == [0.0, 1.0]


def test_resume_applies_config_overrides_and_needs_no_imagenet_weights(tiny_run, tmp_path):
    last = copy_run(tiny_run, tmp_path) / "last.pth"
    # The ImageNet file is not read on resume (the checkpoint holds every weight): a missing one is no error.
    cfg, _ = train_only([f"resume={last}", "max_iter=4", "weight_decay=0.002", "momentum=0.5", "head_lr_mult=4",
                         "pretrained=/no/such/resnet18.pth"])
    assert cfg.momentum == 0.5
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["iteration"] == 4
    groups = {g["name"]: (g["lr_mult"], g["weight_decay"], g["momentum"]) for g in ckpt["optimizer"]["param_groups"]}
    assert groups == {"base": (1.0, 0.002, 0.5), "base_no_decay": (1.0, 0.0, 0.5), "head": (4.0, 0.002, 0.5),
                      "head_no_decay": (4.0, 0.0, 0.5)}
    base = poly_lr(3, 0.02, 2, 4)  # the synthetic preset's lr 0.02, iteration 3 of 4
    lrs = {g["name"]: g["lr"] for g in ckpt["optimizer"]["param_groups"]}
    assert lrs == pytest.approx({"base": base, "base_no_decay": base, "head": 4 * base, "head_no_decay": 4 * base})


def test_resume_into_fp16_with_a_disabled_scalers_state(tmp_path):
    # A run saved by an fp32 or bf16 run holds scaler {}; resumed with fp16 (an enabled scaler) it starts a fresh one.
    cfg = get_config("synthetic", ["crop_size=64,64"])
    model = build_model(cfg, pretrained=False)
    optimizer = build_optimizer(model, cfg)
    disabled = torch.amp.GradScaler("cuda", enabled=False)
    path = str(tmp_path / "last.pth")
    train.save_checkpoint(path, train.training_state(model, optimizer, disabled, 7, cfg, torch.device("cpu"),
                                                     train.NO_BEST))
    assert torch.load(path, weights_only=True)["scaler"] == {}
    enabled = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert train.restore(path, model, optimizer, enabled, torch.device("cpu")) == (7, train.NO_BEST)
    assert enabled.is_enabled() and enabled.get_scale() == 1024.0


def test_rng_state_is_this_process_gpus_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: f"state of {device}")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state, device)))
    gpu1 = torch.device("cuda", 1)
    state = checkpoint.rng_state(gpu1)
    assert state["cuda"] == "state of cuda:1" and torch.equal(state["torch"], torch.get_rng_state())
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    checkpoint.set_rng_state(state, gpu1)
    assert calls == [("state of cuda:1", gpu1)]
    # On the CPU nothing of CUDA is saved or restored, even where a GPU exists.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert set(checkpoint.rng_state(torch.device("cpu"))) == {"torch"}
    checkpoint.set_rng_state(state, torch.device("cpu"))
    assert len(calls) == 1


def test_a_failing_save_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    train.save_checkpoint(str(path), {"iteration": 3})

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train.save_checkpoint(str(path), {"iteration": 6})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"iteration": 3}
    assert os.listdir(tmp_path) == ["last.pth"]


def test_trim_log_keeps_the_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [json.dumps({"iter": i, "loss": 1.0 / i}) + "\n" for i in (10, 20, 30, 40)]
    path.write_text("".join(lines) + '{"iter": 50, "lo')  # the crash cut the last line short
    checkpoint.trim_log(str(path), 20)
    assert path.read_text() == "".join(lines[:2])
    assert os.listdir(tmp_path) == ["log.jsonl"]


def test_a_used_run_directory_is_never_overwritten(tiny_root, tmp_path):
    for _ in range(2):
        assert train.main(tiny_args(tiny_root, tmp_path, "max_iter=3", "ckpt_every=3")) == 0
    assert sorted(os.listdir(tmp_path)) == ["synthetic", "synthetic-1"]


def test_run_without_aux_heads_logs_the_main_head(tiny_root, tmp_path, capsys):
    _, run_dir = train_only(tiny_args(tiny_root, tmp_path, "max_iter=3", "aux_heads=false", "aux_weight=0.4"))
    assert "loss = main," in capsys.readouterr().out
    for r in read_log(run_dir):
        assert r["loss_sums"] == "main" and r["loss"] == pytest.approx(r["loss_main"], rel=1e-6)
        assert not any(key.startswith("loss_aux") for key in r)


def test_channels_last_run_writes_a_loadable_checkpoint(tiny_root, tmp_path):
    cfg, run_dir = train_only(tiny_args(tiny_root, tmp_path, "max_iter=3", "channels_last=true"))
    ckpt = load_checkpoint(build_model(cfg, pretrained=False), os.path.join(run_dir, "last.pth"))
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert all(r["loss"] == r["loss"] for r in read_log(run_dir))


@pytest.mark.parametrize("setting", ["pretrained", "init_from"])
def test_a_missing_weight_file_stops_the_run_before_data_generation(tmp_path, capsys, setting):
    data = tmp_path / "data"
    argv = ["--config", "synthetic", f"data_root={data}", f"out_dir={tmp_path}", f"{setting}={tmp_path / 'no.pth'}"]
    assert train.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: bad value for {setting}: {tmp_path / 'no.pth'} is not a file"
    assert not data.exists() and not (tmp_path / "synthetic").exists()


def test_a_short_summary_is_printed_before_anything_can_fail(tmp_path, capsys, monkeypatch):
    # A missing dataset fails after the config is resolved: what the run was asked to do is on the screen, in a few
    # lines (every setting goes to config.json)
    import plots

    monkeypatch.setattr(plots, "missing_note", lambda: None)
    assert train.main(["--config", "synthetic", f"data_root={tmp_path / 'none'}",
                       f"out_dir={tmp_path}", "lr=0.123"]) == 2
    out = capsys.readouterr().out
    assert out == ("train BiSeNetV1 (ResNet18) from scratch: 300 iterations, batch 8, crop 192x192, lr 0.123 "
                   f"(run synthetic)\ndata: cityscapes at {tmp_path / 'none'}, 19 classes; every setting goes to "
                   "the run folder's config.json\n")


def test_errors_shared_by_every_rank_are_printed_by_rank_0_only(monkeypatch, capsys, tmp_path):
    # the config is read before the process group exists (its timeout is a setting): torchrun's RANK says who speaks
    monkeypatch.setenv("RANK", "1")
    assert train.main(["--config", "nope"]) == 2
    assert capsys.readouterr().err == ""
    # Only rank 0 reads a resume= file (the others receive it): its missing file is one line, from rank 0.
    monkeypatch.setenv("RANK", "0")
    assert train.main([f"resume={tmp_path / 'last.pth'}"]) == 2
    assert capsys.readouterr().err == f"error: checkpoint not found: {tmp_path / 'last.pth'}\n"


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train.main(["--config", "synthetic"]) == 2
    assert capsys.readouterr().err.startswith("error: LOCAL_RANK=1 but this machine has 1 GPU(s)")


class OpenCVThreads(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        return cv2.getNumThreads()


def test_loader_workers_run_opencv_single_threaded(tiny_root):
    threads = cv2.getNumThreads()
    # OpenCV's pool running in this process first, as after generating the synthetic data set: a forked worker that
    # then changed the thread count would deadlock.
    cv2.setNumThreads(2)
    cv2.resize(np.zeros((512, 1024, 3), np.uint8), (2048, 1024))
    try:
        cfg = get_config("synthetic", [f"data_root={tiny_root}", "workers=1", "batch_size=2",
                                       "crop_size=64,64"])
        _, loader = train.train_loader(cfg, Distributed(), 0)
        images, labels = next(iter(loader))
        assert images.shape == (2, 64, 64, 3) and labels.shape == (2, 64, 64)  # uint8, normalized on the device
        counts = torch.utils.data.DataLoader(OpenCVThreads(), num_workers=1, worker_init_fn=loader.worker_init_fn)
        assert [int(n) for n in counts] == [1]
    finally:
        cv2.setNumThreads(threads)


@pytest.mark.parametrize("argv, words", [
    (["--config", "nope"], "unknown config 'nope'"),
    (["--config", "synthetic", "lr=fast"], "lr: 'fast'"),
    (["resume=/no/such/last.pth"], "/no/such/last.pth"),
    (["--config", "synthetic", "data_root=/no/such/root"], "python synthetic.py --root /no/such/root"),
    (["--config", "synthetic", "batch_size=1"], "batch_size=1 gives 1 image per process"),
    (["--config", "synthetic", "run_name=../elsewhere"], "run_name: '../elsewhere'; expected a folder name"),
    (["--config", "synthetic", "std=0.2,0,0.2"], "std: (0.2, 0.0, 0.2); expected three positive numbers"),
])
def test_bad_input_is_a_clear_error(argv, words, capsys, tmp_path):
    # The synthetic preset's data root goes to tmp_path too: a failing run must not write into the repository.
    root = [] if any(a.startswith("data_root=") for a in argv) else [f"data_root={tmp_path / 'data'}"]
    assert train.main([*argv, *root, f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and words in err
    assert not (tmp_path / "data").exists()  # the error comes before any data is generated


def test_torchrun_two_processes_keep_identical_weights_and_write_once(tiny_root, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import os, sys, torch\n"
        "import train\n"
        "from configs import get_config\n"
        "from distributed import Distributed\n"
        "cfg = get_config('synthetic', sys.argv[2:])\n"
        "proc = Distributed()\n"
        "save = train.save_checkpoint\n"
        "def save_and_mark(path, state):\n"
        "    open(os.path.join(sys.argv[1], f'saved_by_rank{proc.rank}'), 'a').close()\n"
        "    save(path, state)\n"
        "train.save_checkpoint = save_and_mark\n"
        "model, run_dir, _ = train.train(cfg, proc)\n"
        "torch.save(model.state_dict(), os.path.join(sys.argv[1], f'rank{proc.rank}.pt'))\n"
        "proc.close()\n")
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
    assert out.stdout.count("train BiSeNetV1") == 1
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("saved_by")) == ["saved_by_rank0"]
    log = read_log(tmp_path / "runs" / "synthetic")
    assert [r["iter"] for r in log] == [1, 2, 3, 4]


def test_a_stopped_rank_ends_the_torchrun_job_after_dist_timeout_with_one_line(tiny_root, tmp_path):
    # rank 1 is stopped (SIGSTOP) during its third step: rank 0 waits dist_timeout seconds in the step's all-reduce,
    # then says why it ends; torchrun then ends the job (SIGKILL reaches the stopped process)
    script = tmp_path / "stop_run.py"
    script.write_text(
        "import os, signal, sys\n"
        "import train\n"
        "step, calls = train.train_step, []\n"
        "def stop_in_third_step(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3 and os.environ['RANK'] == '1':\n"
        "        os.kill(os.getpid(), signal.SIGSTOP)\n"
        "    return step(*args, **kwargs)\n"
        "train.train_step = stop_in_third_step\n"
        "sys.exit(train.main(sys.argv[1:]))\n")
    args = tiny_args(tiny_root, tmp_path / "runs", "batch_size=4", "max_iter=50", "dist_timeout=5", "workers=0")
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *args], capture_output=True, text=True, env=env, timeout=240)  # no hang
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 0 waited more than dist_timeout=5 s for the other processes in a collective: one "
                      "of them is stuck, stopped or dead, so the job ends; the run directory's last.pth holds the last "
                      "checkpoint to resume from"], [line for line in out.stderr.splitlines() if "rror" in line][:20]


def test_the_synthetic_preset_learns_end_to_end(tmp_path, capsys):
    """The README's first command on a smaller problem: generate (24 + 8 images of 128x256), train the synthetic preset
    90 iterations on 128x128 crops, evaluate. About 30 s in bf16 and 50 s in fp32 on 2 CPU cores, where it reached
    mIoU 17.9 and 17.4 and pixel accuracy 66.8% and 65.9%; the untrained model scores 0.3. The full quick start
    (300 iterations, 21.7 in bf16 and 22.5 in fp32) is measured by hand (benchmarks/measured.md, README)."""
    data = tmp_path / "data"
    assert synthetic.main(["--root", str(data), "--train", "24", "--val", "8", "--size", "128", "256", "--quiet"]) \
        is None
    assert train.main(["--config", "synthetic", f"data_root={data}", f"out_dir={tmp_path}", "max_iter=90",
                       "crop_size=128,128", "eval_every=30"]) == 0
    with open(tmp_path / "synthetic" / "eval.json") as f:
        results = json.load(f)
    assert results["images"] == 8 and results["split"] == "val"
    assert results["miou"] > SYNTHETIC_MIOU_FLOOR and results["pixel_accuracy"] > 0.55
    assert "mIoU" in capsys.readouterr().out
    log = [r for r in read_log(tmp_path / "synthetic") if "loss" in r]
    assert log[-1]["iter"] == 90 and log[-1]["loss"] < 0.7 * log[0]["loss"]
    # validated every 30 iterations; the run directory holds the best weights and the two pictures
    val = [r for r in read_log(tmp_path / "synthetic") if "val_miou" in r]
    assert [r["iter"] for r in val] == [30, 60, 90] and val[-1]["val_miou"] == results["miou"]
    for name in ("model_best.pth", "curves.png", "confusion.png"):
        assert (tmp_path / "synthetic" / name).is_file(), name


def test_amp_dtype_per_device_and_setting(monkeypatch, recwarn):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def amp_dtype(amp, device):  # as train.py asks: no warning (fp16, the default, is fp32 on a CPU)
        return precision.autocast_dtype(amp, device, warn=False)

    # On this machine's CPU: bf16 exactly where precision.native_bf16 says it is native (its own test checks it
    # against the instruction-set flags); both answers are patched in below, so every CPU checks both branches.
    native = precision.native_bf16(cpu)
    assert amp_dtype("bf16", cpu) == (torch.bfloat16 if native else None)
    assert amp_dtype("fp16", cuda) == torch.float16
    assert amp_dtype("none", cuda) is None and amp_dtype("fp16", cpu) is None
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert amp_dtype("bf16", cpu) is None and amp_dtype("bf16", cuda) is None  # e.g. a V100: fp32
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert amp_dtype("bf16", cpu) == torch.bfloat16 and amp_dtype("bf16", cuda) == torch.bfloat16
    assert not recwarn.list
    dtype, autocast, scaler = precision.training_precision("bf16", cpu)
    assert dtype == torch.bfloat16 and isinstance(autocast, torch.autocast) and autocast.fast_dtype == torch.bfloat16
    assert not scaler.is_enabled()  # the scaler is for fp16 only (CUDA: not constructible without a GPU)
    dtype, autocast, scaler = precision.training_precision("fp16", cpu)  # fp16 is CUDA only: fp32 on the CPU
    assert dtype is None and not isinstance(autocast, torch.autocast) and not scaler.is_enabled()
    assert not recwarn.list


def test_bf16_without_hardware_support_trains_fp32_with_a_warning(tiny_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    train_only(tiny_args(tiny_root, tmp_path, "max_iter=1", "warmup_iters=0", "amp=bf16"))
    out, err = capsys.readouterr()
    assert "amp: none (fp32)" in out and "warning: amp=bf16 but cpu has no native bf16: training in fp32" in err


def test_cpu_bf16_training_runs_and_lowers_the_loss(tiny_root, tmp_path, monkeypatch, capsys):
    # bf16 autocast works on any CPU (emulated where not native): the loop, loss and checkpoint take bf16 logits
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert train.main(tiny_args(tiny_root, tmp_path, "max_iter=16", "lr=0.01", "amp=bf16")) == 0
    assert "amp: bfloat16" in capsys.readouterr().out
    log = read_log(tmp_path / "synthetic")
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert all(r["loss"] == r["loss"] for r in log) and last < 0.8 * first, (first, last)


# ---- folder datasets: class weights, fine-tuning, names in the results ----

def test_init_from_loads_the_fitting_tensors_and_reinitializes_the_classifiers(tmp_path):
    torch.manual_seed(0)
    camvid_parts = ["arm=false", "global_pool=false"]  # the camvid preset's V1, which the target has
    source = build_model(get_config("synthetic", camvid_parts), pretrained=False)  # 19 classes
    path = str(tmp_path / "source.pth")
    torch.save({"model": source.state_dict(), "config": get_config("synthetic", camvid_parts).to_dict()}, path)
    torch.manual_seed(1)
    target = build_model(get_config("camvid"), pretrained=False)  # 11 classes
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    loaded, skipped = checkpoint.load_fitting(target, path)
    classifiers = {f"{head}.cls.{p}" for head in ("head", "aux8", "aux16") for p in ("weight", "bias")}
    assert {name for name, _, _ in skipped} == classifiers
    assert ("head.cls.weight", (19, 256, 1, 1), (11, 256, 1, 1)) in skipped
    state, source_state = target.state_dict(), source.state_dict()
    assert set(loaded) == set(state) - classifiers
    for name in state:
        expected = fresh[name] if name in classifiers else source_state[name]
        assert torch.equal(state[name], expected), name


def test_init_from_another_architecture_is_still_an_error(tmp_path):
    path = str(tmp_path / "no_arm.pth")
    torch.save({"model": build_model(get_config("synthetic", ["arm=false"]), pretrained=False).state_dict()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="ablation switches"):
        checkpoint.load_fitting(build_model(get_config("camvid"), pretrained=False), path)


def folder_args(root, out, *extra):
    from conftest import FOLDER_OVERRIDES
    return ["--config", "camvid", *FOLDER_OVERRIDES, f"data_root={root}", f"out_dir={out}", "crop_size=24,32",
            "scales=1,1", "batch_size=2", "max_iter=3", "warmup_iters=1", "log_every=1", "ckpt_every=3", "workers=0",
            "eval_workers=0", "amp=none", "channels_last=false", *extra]


def test_a_folder_dataset_trains_with_median_weights_from_a_checkpoint_and_reports_its_class_names(
        tiny_folder, tmp_path, capsys):
    torch.manual_seed(0)
    source = str(tmp_path / "source.pth")
    model = build_model(get_config("synthetic", ["arm=false", "global_pool=false"]), pretrained=False)  # camvid's V1
    torch.save({"model": model.state_dict()}, source)
    assert train.main(folder_args(tiny_folder, tmp_path / "runs", "class_weights=median", f"init_from={source}")) == 0
    out = capsys.readouterr().out
    assert f"init_from {source}: loaded" in out and "6 re-initialized (shapes differ)" in out
    assert "head.cls.weight: checkpoint (19, 256, 1, 1), model (3, 256, 1, 1)" in out
    # the weights the run printed are those of the training labels' statistics
    from datasets import build_dataset, class_table, scan_labels
    cfg = get_config("camvid", folder_args(tiny_folder, tmp_path)[2:])
    scan = scan_labels(build_dataset(cfg, "train").samples, class_table(cfg), 3, progress=False)
    assert "class_weights=median: " + ",".join(f"{w:.4f}" for w in scan.median_frequency_weights()) in out
    with open(tmp_path / "runs" / "camvid" / "eval.json") as f:
        results = json.load(f)
    assert list(results["iou"]) == ["road", "tree", "car"]
    assert "road" in out and "car" in out  # the printed table


@pytest.mark.parametrize("workers", [0, 1])  # raised in this process, or in a loader worker
def test_a_label_outside_the_table_stops_training_with_one_line_naming_it(tiny_folder, tmp_path, capsys, workers):
    label_path = os.path.join(tiny_folder, "trainannot", "frame02.png")
    label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    label[5, 5] = 40
    cv2.imwrite(label_path, label)
    assert train.main(folder_args(tiny_folder, tmp_path, "max_iter=4", f"workers={workers}")) == 2
    err = capsys.readouterr().err  # the progress bar's lines, then the error
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"error: label {label_path} holds values outside the class table: 40 (1 px); ")


# ---- validation during training, pictures, gradient accumulation ----

def test_validation_records_and_the_best_checkpoint(tiny_root, tmp_path, capsys):
    assert train.main(tiny_args(tiny_root, tmp_path, "max_iter=6", "eval_every=2", "lr=0.05")) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "synthetic"
    val = [r for r in read_log(run_dir) if "val_miou" in r]
    assert [r["iter"] for r in val] == [2, 4, 6]
    assert all(set(r["val_iou"]) == set(val[0]["val_iou"]) and r["val_seconds"] > 0 for r in val)
    best = max(val, key=lambda r: r["val_miou"])  # the first of equal ones
    assert f"best val mIoU {100 * best['val_miou']:.2f} at iteration {best['iter']}" in out
    # model_best.pth re-evaluated gives the best record's mIoU
    cfg = get_config("synthetic", tiny_args(tiny_root, tmp_path)[2:])
    model = build_model(cfg, pretrained=False)
    ckpt = load_checkpoint(model, str(run_dir / "model_best.pth"))
    assert ckpt["iteration"] == best["iter"]
    results = train.evaluate(model, train.eval_dataset(cfg), cfg, Distributed())
    assert results["miou"] == pytest.approx(best["val_miou"], abs=1e-9)
    # eval.json is the last validation's
    with open(run_dir / "eval.json") as f:
        assert json.load(f)["miou"] == pytest.approx(val[-1]["val_miou"])
    for name in ("curves.png", "confusion.png"):
        assert cv2.imread(str(run_dir / name)) is not None, name


def test_resume_keeps_the_best_so_far(tiny_root, tmp_path, capsys):
    assert train.main(tiny_args(tiny_root, tmp_path, "max_iter=4", "eval_every=2", "ckpt_every=2")) == 0
    run_dir = tmp_path / "synthetic"
    first = [r for r in read_log(run_dir) if "val_miou" in r]
    best_first = max(first, key=lambda r: r["val_miou"])
    ckpt = torch.load(run_dir / "last.pth", weights_only=True)
    assert ckpt["best"] == {"iter": best_first["iter"], "miou": pytest.approx(best_first["val_miou"])}
    capsys.readouterr()
    assert train.main([f"resume={run_dir / 'last.pth'}", "max_iter=8"]) == 0
    out = capsys.readouterr().out
    val = [r for r in read_log(run_dir) if "val_miou" in r]
    assert [r["iter"] for r in val] == [2, 4, 6, 8]
    best = max(val, key=lambda r: r["val_miou"])
    assert f"best val mIoU {100 * best['val_miou']:.2f} at iteration {best['iter']}" in out
    assert torch.load(run_dir / "model_best.pth", weights_only=True)["iteration"] == best["iter"]


def test_pictures_have_the_expected_size_and_classes(tmp_path, monkeypatch):
    import plots
    log = tmp_path / "log.jsonl"
    records = [{"iter": i, "loss": 3.0 / i, "loss_sums": "main+aux8+aux16", "loss_main": 1.0 / i, "loss_aux8": 1.0 / i,
                "loss_aux16": 1.0 / i, "lr": 0.01, "images_per_s": 4.0, "eta_s": 0, "time": 0} for i in range(1, 5)]
    records.insert(2, {"iter": 2, "val_miou": 0.25, "val_pixel_accuracy": 0.5, "val_iou": {}, "val_seconds": 1})
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plots.plot_curves(str(log), str(tmp_path / "curves.png"))
    assert cv2.imread(str(tmp_path / "curves.png")).shape == (800, 1200, 3)
    names = ["road", "tree", "car"]
    results = {"split": "val", "mode": "ss", "miou": 0.5, "confusion": [[5, 1, 0], [2, 2, 0], [0, 0, 0]],
               "iou": {"road": 0.625, "tree": 0.4, "car": None}}
    drawn = {}
    save = plots.save

    def keep(fig, plt, path):
        ax = fig.axes[0]
        drawn["y"] = [t.get_text() for t in ax.get_yticklabels()]
        drawn["x"] = [t.get_text() for t in ax.get_xticklabels()]
        drawn["cells"] = ax.images[0].get_array().tolist()
        save(fig, plt, path)

    monkeypatch.setattr(plots, "save", keep)
    assert plots.plot_confusion(results, str(tmp_path / "confusion.png"))
    assert cv2.imread(str(tmp_path / "confusion.png")).shape == (600, 750, 3)  # 6x6 inches + colorbar, 100 dpi
    assert drawn["x"] == names and drawn["y"] == ["road (IoU 62.5)", "tree (IoU 40.0)", "car (IoU n/a)"]
    # row-normalized: each true class's pixels split over the predictions
    assert drawn["cells"] == [[5 / 6, 1 / 6, 0], [0.5, 0.5, 0], [0, 0, 0]]


def test_pictures_are_skipped_with_one_line_without_matplotlib(tmp_path, monkeypatch, capsys):
    import plots
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(plots, "_warned", False)
    (tmp_path / "log.jsonl").write_text(json.dumps({"iter": 1, "loss": 1.0, "lr": 0.1, "images_per_s": 1.0}) + "\n")
    results = {"split": "val", "mode": "ss", "miou": 1.0, "confusion": [[1]], "iou": {"a": 1.0}}
    train.draw_pictures(str(tmp_path), results)
    train.draw_pictures(str(tmp_path), results)
    assert capsys.readouterr().err == ("note: curves.png and confusion.png need matplotlib (pip install -r "
                                       "requirements-plot.txt); the run goes on without them\n")
    assert not (tmp_path / "curves.png").exists() and not (tmp_path / "confusion.png").exists()


def test_plots_cli_draws_a_run_and_names_the_missing_package(tmp_path, monkeypatch, capsys):
    import plots
    (tmp_path / "log.jsonl").write_text(json.dumps({"iter": 1, "loss": 1.0, "lr": 0.1, "images_per_s": 1.0}) + "\n")
    assert plots.main([str(tmp_path)]) == 0
    assert cv2.imread(str(tmp_path / "curves.png")) is not None
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text("")
    assert plots.main([str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err == (f"error: nothing drawn for {tmp_path / 'empty'}: it holds no training records "
                                       "or no labelled results\n")
    results = {"split": "val", "mode": "ss", "miou": 0.5, "confusion": [[3, 1], [1, 3]], "iou": {"a": 0.6, "b": 0.6}}
    (tmp_path / "eval.json").write_text(json.dumps(results))  # a run's final evaluation: its confusion is redrawn too
    assert plots.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'curves.png'}\nwrote {tmp_path / 'confusion.png'}\n"
    assert cv2.imread(str(tmp_path / "confusion.png")) is not None
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert plots.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: plots.py draws with matplotlib, which is not installed; "
                                       "pip install -r requirements-plot.txt\n")


def bn_eval_model(seed=0):
    torch.manual_seed(seed)
    model = build_model(get_config("synthetic"), pretrained=False).train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()  # running statistics: the output of an image does not depend on its batch
    return model


def test_two_micro_batches_make_the_same_update_as_one_batch():
    from contextlib import nullcontext

    from loss import build_loss
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 64, 64, 3), generator=g, dtype=torch.uint8)  # as the loader ships them
    labels = torch.randint(0, 19, (8, 64, 64), generator=g, dtype=torch.uint8)  # no ignored pixel: equal micro-batches
    # thresh 0.9999: every pixel is hard, so each loss is the mean over its pixels
    grads = []
    for accum in (1, 2):
        cfg = get_config("synthetic", ["batch_size=8", f"grad_accum={accum}", "ohem_thresh=0.9999"])
        model, criterion = bn_eval_model(), build_loss(cfg)
        micro = 8 // accum
        data = iter([(images[i:i + micro], labels[i:i + micro]) for i in range(0, 8, micro)])
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        loss, parts = train.accumulate_gradients(model, criterion, data, cfg, Distributed(), nullcontext(), scaler)
        grads.append(([p.grad.clone() for p in model.parameters()], loss.item(), parts))
        assert next(data, None) is None  # every micro-batch used
    (one, loss_one, parts_one), (two, loss_two, parts_two) = grads
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    assert {k: float(v) for k, v in parts_two.items()} == pytest.approx({k: float(v) for k, v in parts_one.items()})


def test_grad_accum_counts_optimizer_steps(tiny_root, tmp_path):
    assert train.main(tiny_args(tiny_root, tmp_path, "batch_size=4", "grad_accum=2", "max_iter=4")) == 0
    run_dir = tmp_path / "synthetic"
    assert [r["iter"] for r in read_log(run_dir)] == [1, 2, 3, 4]
    assert all(r["images_per_s"] > 0 for r in read_log(run_dir))
    ckpt = torch.load(run_dir / "last.pth", weights_only=True)
    lrs = {g["name"]: g["lr"] for g in ckpt["optimizer"]["param_groups"]}
    assert lrs["base"] == pytest.approx(poly_lr(3, 0.02, 2, 4))  # the synthetic preset's lr, step 3 of 4
    # a resumed run skips the samples of start x grad_accum micro-batches of 2
    cfg = get_config("synthetic", tiny_args(tiny_root, tmp_path, "batch_size=4", "grad_accum=2")[2:])
    assert train.train_loader(cfg, Distributed(), 3)[1].sampler.start == 3 * 2 * 2


def test_a_batch_that_does_not_split_into_micro_batches_is_a_config_error():
    with pytest.raises(train.ConfigError, match="does not split over 1 processes x 3 micro-batches"):
        configs.per_rank_batch(get_config("synthetic", ["batch_size=8", "grad_accum=3"]), 1)
    with pytest.raises(train.ConfigError, match="gives 1 image per process and micro-batch"):
        configs.per_rank_batch(get_config("synthetic", ["batch_size=8", "grad_accum=4"]), 2)
    assert configs.per_rank_batch(get_config("cityscapes_1gpu_accum"), 1) == 8  # the reference batch 16 in two


# ---- stopping and resuming ----

def process_group(pgid):
    """The pids of the processes in process group `pgid` (Linux's /proc)."""
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            continue  # ended meanwhile
        if int(fields[2]) == pgid:
            pids.append(int(name))
    return pids


STOP_SETTINGS = ("max_iter=40", "ckpt_every=1000", "workers=1", "eval_every=20", "eval_workers=1")


@pytest.fixture(scope="module")
def straight_run(tiny_root, tmp_path_factory):
    """The final weights of the stop-signal tests' run trained without a stop: one run for both signals."""
    out = tmp_path_factory.mktemp("straight")
    assert train.main(tiny_args(tiny_root, out, *STOP_SETTINGS)) == 0
    return final_state(out / "synthetic")


@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])  # SIGINT (Ctrl-C), SIGTERM (preemption)
def test_a_stop_signal_finishes_the_iteration_writes_last_pth_and_resumes(tiny_root, straight_run, tmp_path, signum,
                                                                           code):
    """The signal goes to every process of the run, loader workers included, as Ctrl-C (the terminal's process group)
    and a scheduler that preempts a job (SLURM: every process of the job) send it."""
    import signal
    proc = start_training(tiny_args(tiny_root, tmp_path, *STOP_SETTINGS), tmp_path / "synthetic" / "log.jsonl", 2)
    assert len(process_group(proc.pid)) >= 2  # the main process and its loader worker(s) get the signal
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err
    done = torch.load(tmp_path / "synthetic" / "last.pth", weights_only=True)["iteration"]
    assert 2 <= done < 40
    assert f"stopped by {signal.Signals(signum).name} after iteration {done}" in err and "Traceback" not in err
    assert [r["iter"] for r in read_log(tmp_path / "synthetic") if "loss" in r] == list(range(1, done + 1))
    assert train.main([f"resume={tmp_path / 'synthetic' / 'last.pth'}"]) == 0
    assert [r["iter"] for r in read_log(tmp_path / "synthetic") if "loss" in r] == list(range(1, 41))
    # the stopped and resumed run ends bit for bit where a run that was never stopped ends
    resumed = final_state(tmp_path / "synthetic")
    assert all(torch.equal(resumed[key], straight_run[key]) for key in straight_run)


def test_resume_removes_temp_files_of_a_killed_write(tiny_run, tmp_path, capsys):
    copy_run(tiny_run, tmp_path)
    stale = tmp_path / "synthetic" / "last.pth.tmp4242"
    stale.write_bytes(b"half a checkpoint")
    assert train.main([f"resume={tmp_path / 'synthetic' / 'last.pth'}", "max_iter=4"]) == 0
    assert not stale.exists() and f"removed {stale}" in capsys.readouterr().out


def test_resume_refuses_a_max_iter_it_has_reached(tiny_run, tmp_path, capsys):
    run_dir = copy_run(tiny_run, tmp_path)
    before = {n: (run_dir / n).read_bytes() for n in ("config.json", "model_final.pth")}
    capsys.readouterr()
    assert train.main([f"resume={run_dir / 'last.pth'}", "max_iter=3"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {run_dir / 'last.pth'} holds iteration 3: max_iter=3 leaves nothing to train; to train "
                   "longer pass max_iter above 3\n")
    assert before == {n: (run_dir / n).read_bytes() for n in before}


def test_an_unwritable_run_directory_is_one_line_before_anything_is_built(tiny_root, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(train, "build_training", lambda *a: pytest.fail("built before the run directory was made"))
    assert train.main(tiny_args(tiny_root, tmp_path / "file")) == 2
    err = capsys.readouterr().err
    run_dir = tmp_path / "file" / "synthetic"
    assert err == f"error: cannot create the run directory {run_dir}: Not a directory\n"
    assert "Traceback" not in err


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train.os, "fsync", full)
    with pytest.raises(OSError) as err:
        train.save_checkpoint(str(tmp_path / "last.pth"), {"iteration": 1})
    assert err.value.strerror == f"cannot write {tmp_path / 'last.pth'}: No space left on device"
    assert os.listdir(tmp_path) == []


def test_a_run_that_failed_at_start_leaves_its_folder_to_the_next(tiny_root, tmp_path):
    assert train.main(tiny_args(str(tmp_path / "missing"), tmp_path)) == 2
    assert not (tmp_path / "synthetic").exists()  # a wrong data_root leaves no run folder behind
    assert train.main(tiny_args(tiny_root, tmp_path, "max_iter=3")) == 0
    assert sorted(os.listdir(tmp_path)) == ["synthetic"]
    assert "last.pth" in os.listdir(tmp_path / "synthetic")


# ---- the GPU path, as far as the CPU can show it ----

def poison_calls(monkeypatch, calls_to_poison):
    """Make the loss computations numbered `calls_to_poison` (1-based) return NaN instead of the loss total."""
    import loss

    forward, calls = loss.BiSeNetLoss.forward, []

    def forward_with_nan(self, outputs, target):
        calls.append(1)
        total, parts = forward(self, outputs, target)
        return (total * float("nan"), parts) if len(calls) in calls_to_poison else (total, parts)

    monkeypatch.setattr(loss.BiSeNetLoss, "forward", forward_with_nan)


def fp16_scaler_on_the_cpu(monkeypatch):
    """fp16's precision as train.py gets it on CUDA: an enabled GradScaler (which runs on the CPU too), the autocast
    left out (the CPU has no fast fp16)."""
    from contextlib import nullcontext

    monkeypatch.setattr(train, "training_precision",
                        lambda amp, device: (torch.float16, nullcontext(), torch.amp.GradScaler("cpu", init_scale=8.0)))


def test_fp16_skips_a_non_finite_step_counts_it_and_goes_on(tiny_root, tmp_path, monkeypatch):
    fp16_scaler_on_the_cpu(monkeypatch)
    poison_calls(monkeypatch, {3, 5})
    assert train.main(tiny_args(tiny_root, tmp_path, "log_every=2")) == 0
    run_dir = tmp_path / "synthetic"
    log = [r for r in read_log(run_dir) if "loss" in r]
    # steps 3 and 5 skipped: one in the record of iterations 3-4, one in that of 5-6
    assert [(r["iter"], r["skipped_steps"]) for r in log] == [(2, 0), (4, 1), (6, 1)]
    ckpt = torch.load(run_dir / "last.pth", weights_only=True)
    assert ckpt["scaler"]["scale"] == 8.0 * 0.5 * 0.5  # backed off once per skipped step (growth needs 2000 steps)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_fp16_stops_after_max_skipped_steps_in_a_row(tiny_root, tmp_path, monkeypatch, capsys):
    fp16_scaler_on_the_cpu(monkeypatch)
    poison_calls(monkeypatch, {2, 4, 5})
    assert train.main(tiny_args(tiny_root, tmp_path, "max_skipped_steps=2")) == 1
    err = capsys.readouterr().err
    assert "error: 2 steps in a row had non-finite values under fp16 (max_skipped_steps=2; the GradScaler skipped " \
           "each and lowered its scale) at iteration 5" in err
    assert "Traceback" not in err


def test_a_stop_request_saves_last_pth_first_and_does_not_validate(tiny_root, tmp_path, monkeypatch, capsys):
    """A stop that arrives in the step of a validation: last.pth is written and the run ends, without the validation
    (torchrun's agent kills the processes 30 s after its SIGTERM)."""
    import signal

    step, calls, validated = train.train_step, [], []

    def sigterm_in_fourth_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGTERM)  # caught by the run's StopRequest: the step runs to its end
            args = (*args[:9], True, *args[10:])  # what the handler's flag gives the step
        return step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", sigterm_in_fourth_step)
    monkeypatch.setattr(train.Validator, "__call__", lambda self, *args: validated.append(args[1]))
    assert train.main(tiny_args(tiny_root, tmp_path, "eval_every=4", "ckpt_every=100")) == 143
    assert validated == []
    assert torch.load(tmp_path / "synthetic" / "last.pth", weights_only=True)["iteration"] == 4
    assert "stopped by SIGTERM after iteration 4" in capsys.readouterr().err


def test_resume_where_only_rank_0_has_the_checkpoint(tiny_run, tmp_path):
    """Two gloo processes; rank 1's machine has no copy of last.pth (node-local disks): rank 0 reads it and sends the
    state."""
    run_dir = copy_run(tiny_run, tmp_path)
    script = tmp_path / "rank0_only.py"
    script.write_text(
        "import os, sys\n"
        "import checkpoint, train\n"
        "if os.environ['RANK'] != '0':\n"
        "    def missing(path, *args, **kwargs):\n"
        "        raise checkpoint.CheckpointError(f'checkpoint not found: {path} (not on this machine)')\n"
        "    checkpoint.read_checkpoint = train.read_checkpoint = missing\n"
        "sys.exit(train.main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), f"resume={run_dir / 'last.pth'}", "max_iter=5", "batch_size=4"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stdout and "processes: 2" in out.stdout
    assert [r["iter"] for r in read_log(run_dir) if "loss" in r] == [1, 2, 3, 4, 5]
    assert torch.load(run_dir / "last.pth", weights_only=True)["iteration"] == 5


def test_channels_last_auto_is_on_for_cuda_under_autocast_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [precision.use_channels_last("auto", gpu, dtype) for dtype in (torch.float16, torch.bfloat16, None)] == \
        [True, True, False]
    assert [precision.use_channels_last("auto", cpu, dtype) for dtype in (torch.bfloat16, None)] == [False, False]
    assert precision.use_channels_last("false", gpu, torch.float16) is False
    assert precision.use_channels_last("true", cpu, None) is True
    # a config saved when the key was a bool reads as the same setting
    assert get_config(base={**get_config("synthetic").to_dict(), "channels_last": True}).channels_last == "true"
    assert get_config(base={**get_config("synthetic").to_dict(), "channels_last": False}).channels_last == "false"


def test_the_loaders_samples_are_uint8_and_the_step_gets_normalized_float32(tiny_root):
    cfg = get_config("synthetic", [f"data_root={tiny_root}", "crop_size=64,64", "batch_size=2",
                                   "workers=0"])
    _, loader = train.train_loader(cfg, Distributed(), 0)
    images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (2, 64, 64, 3)
    assert labels.dtype == torch.uint8 and labels.shape == (2, 64, 64)
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            seen.append(x)
            return x * self.w

    def criterion(outputs, target):
        seen.append(target)
        return outputs.sum(), {}

    from contextlib import nullcontext
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.accumulate_gradients(Recorder(), criterion, iter([(images, labels)]), cfg, Distributed(), nullcontext(),
                               scaler, channels_last=True)
    x, target = seen
    assert x.dtype == torch.float32 and x.shape == (2, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)
    expected = (images.permute(0, 3, 1, 2).double() / 255 - torch.tensor(cfg.mean)[:, None, None]) \
        / torch.tensor(cfg.std)[:, None, None]
    torch.testing.assert_close(x.double(), expected, atol=1e-5, rtol=0)
    assert target.dtype == torch.int64 and torch.equal(target, labels.long())


# ---- a stop request at any point ----

def sigterm_in_step(monkeypatch, number):
    """SIGTERM raised in the `number`-th training step (1-based), as a scheduler would send it then."""
    import signal

    step, calls = train.train_step, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            signal.raise_signal(signal.SIGTERM)  # caught by the run's StopRequest: the step runs to its end
            args = (*args[:9], True, *args[10:])  # the stop flag the handler gives the step
        return step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", signalled)


def test_a_stop_in_the_last_iteration_saves_the_final_weights_and_ends_with_143(tiny_root, tmp_path, monkeypatch,
                                                                                capsys):
    sigterm_in_step(monkeypatch, 6)  # max_iter=6: the last one
    assert train.main(tiny_args(tiny_root, tmp_path, "eval_every=6")) == 143
    run_dir = tmp_path / "synthetic"
    final = run_dir / "model_final.pth"
    assert f"stopped by SIGTERM after the last iteration (6), before the final evaluation; {final} holds the final " \
           f"weights: score them with python evaluate.py --ckpt {final}" in capsys.readouterr().err
    assert torch.load(run_dir / "last.pth", weights_only=True)["iteration"] == 6 and final.is_file()
    assert not (run_dir / "eval.json").exists() and not [r for r in read_log(run_dir) if "val_miou" in r]


def test_a_stop_during_the_final_evaluation_ends_it_at_once_with_143(tiny_root, tmp_path, monkeypatch, capsys):
    import signal

    evaluate, calls = train.evaluate, []

    def signalled(*args, **kwargs):
        calls.append(1)
        signal.raise_signal(signal.SIGTERM)  # the final weights are saved: the handler ends the run here
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", signalled)
    assert train.main(tiny_args(tiny_root, tmp_path)) == 143
    run_dir = tmp_path / "synthetic"
    assert calls == [1] and (run_dir / "model_final.pth").is_file() and not (run_dir / "eval.json").exists()
    assert "stopped by SIGTERM after the last iteration (6)" in capsys.readouterr().err


def test_a_refused_resume_leaves_the_run_folder_as_it_was(tiny_run, tmp_path, capsys):
    run_dir = copy_run(tiny_run, tmp_path)
    before = {n: (run_dir / n).read_bytes() for n in os.listdir(run_dir)}
    assert train.main([f"resume={run_dir / 'last.pth'}", "num_classes=11", "max_iter=5"]) == 2
    assert "num_classes" in capsys.readouterr().err
    assert {n: (run_dir / n).read_bytes() for n in os.listdir(run_dir)} == before  # config.json still says 19


def test_a_pickle_given_as_pretrained_weights_is_one_line_without_torchs_advice(tiny_root, tmp_path, capsys):
    import datetime

    path = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(1), "made": datetime.date(2026, 1, 1)}, path)
    assert train.main(tiny_args(tiny_root, tmp_path, f"pretrained={path}")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read pretrained weights {path}: it holds Python objects other than tensors")
    assert "weights_only" not in err and err.count("\n") == 1, err


def test_trim_log_stops_at_a_line_edited_by_hand(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"iter": 1}\n{"iter": 2}\nnull\n{"iter": 3}\n')
    checkpoint.trim_log(str(path), 5)
    assert path.read_text() == '{"iter": 1}\n{"iter": 2}\n'


def test_a_short_trial_run_of_a_preset_runs_and_says_its_warmup_was_shortened(tiny_root, tmp_path, capsys):
    args = [a for a in tiny_args(tiny_root, tmp_path, "max_iter=3") if not a.startswith("warmup_iters=")]
    assert train.main(args) == 0  # the synthetic preset warms up for 30 iterations
    assert "note: max_iter=3 leaves no room for the preset's warmup (30 iterations): warmup_iters=0" in \
        capsys.readouterr().out


def test_without_matplotlib_the_run_says_so_once_at_start_and_warns_no_more(tiny_root, tmp_path, monkeypatch, capsys,
                                                                          recwarn):
    import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(plots, "_warned", False)
    assert train.main(tiny_args(tiny_root, tmp_path, "eval_every=3")) == 0
    out = capsys.readouterr().out
    assert out.count("note: curves.png and confusion.png need matplotlib (pip install -r requirements-plot.txt); "
                     "the run goes on without them") == 1
    assert not [w for w in recwarn if "matplotlib" in str(w.message)]


def test_show_prints_the_resolved_config_and_what_it_changes_and_writes_nothing(tmp_path, capsys):
    assert train.main(["--config", "camvid", "--show", "max_iter=40", f"out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out.split("\nchanged from the defaults")[0])
    assert shown == json.loads(format_config(get_config("camvid", ["max_iter=40", f"out_dir={tmp_path}"])))
    changed = out.split("changed from the defaults")[1].splitlines()[1:]
    assert "  max_iter=40" in changed and "  warmup_iters=4" in changed and '  dataset="folder"' in changed
    assert "  lr=0.02" in changed and not [line for line in changed if line.startswith("  momentum=")]  # unchanged
    assert os.listdir(tmp_path) == []


def inside_figure(fig, texts):
    """Whether every text artist lies within the figure's canvas once drawn."""
    fig.canvas.draw()
    box = fig.bbox
    extents = [t.get_window_extent() for t in texts if t.get_text()]
    return all(e.x0 >= box.x0 - 1 and e.x1 <= box.x1 + 1 and e.y0 >= box.y0 - 1 and e.y1 <= box.y1 + 1
               for e in extents)


def test_curves_show_a_single_point_share_one_axis_and_keep_the_best_label_inside(tmp_path, monkeypatch):
    import plots

    pytest.importorskip("matplotlib")
    drawn = {}
    monkeypatch.setattr(plots, "save", lambda fig, plt, path: drawn.setdefault("fig", fig))
    log = tmp_path / "log.jsonl"
    records = [{"iter": 10, "loss": 3.0, "loss_main": 1.0, "lr": 0.01, "images_per_s": 4.0},
               {"iter": 10, "val_miou": 0.2, "val_iou": {}}, {"iter": 20, "val_miou": 0.3, "val_iou": {}}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    plots.plot_curves(str(log), str(tmp_path / "curves.png"))
    fig = drawn["fig"]
    loss_ax, lr_ax, speed_ax, miou_ax = fig.axes
    assert all(line.get_marker() == "o" for line in loss_ax.lines)  # one logged point: a dot, not nothing
    assert len({ax.get_xlim() for ax in fig.axes}) == 1 and loss_ax.get_xlim()[0] > 0  # from the first record
    [best] = [t for t in miou_ax.texts if t.get_text().startswith("best")]
    assert best.get_text() == "best 30.0 @ 20" and best.get_ha() == "right"  # at the right edge: drawn leftwards
    assert inside_figure(fig, [best]) and best.get_window_extent().x1 <= miou_ax.get_window_extent().x1


def test_the_confusion_picture_names_its_run_and_backend_and_keeps_long_names_inside(tmp_path, monkeypatch):
    import plots

    pytest.importorskip("matplotlib")
    drawn = {}
    monkeypatch.setattr(plots, "save", lambda fig, plt, path: drawn.setdefault("fig", fig))
    names = ["road", "a class name as long as a sentence: stuff that nobody expects to read here", "car"]
    results = {"split": "val", "mode": "ss", "miou": 0.5, "confusion": [[5, 1, 0], [2, 2, 0], [0, 0, 1]],
               "iou": dict(zip(names, [0.6, 0.4, 1.0], strict=True)), "scored_by": "openvino model_int8.xml",
               "config": {"run_name": "camvid"}}
    plots.plot_confusion(results, str(tmp_path / "confusion.png"))
    fig = drawn["fig"]
    ax = fig.axes[0]
    assert ax.get_title() == "camvid, val split, ss, openvino model_int8.xml: mIoU 50.00"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Tight layout not applied": the labels would be cut
        assert inside_figure(fig, [*ax.get_yticklabels(), *ax.get_xticklabels(), ax.title])
