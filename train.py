"""Train BiSeNet.

    python train.py [--config NAME] [key=value ...]                    # one GPU, or the CPU
    torchrun --nproc_per_node=N train.py [--config NAME] [key=value]    # N processes (DDP), one node
    python train.py resume=runs/NAME/last.pth                           # continue a stopped run
    python train.py --config camvid --show                              # the settings a run would use, and exit

Distributed training is detected from torchrun's RANK variable; rank 0 prints and writes files.
"""

import argparse
import json
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import plots
from checkpoint import (
    NO_BEST,
    CheckpointError,
    load_fitting,
    load_training_state,
    make_run_dir,
    prepare_run_dir,
    restore,
    save_checkpoint,
    training_state,
)
from configs import (
    Config,
    ConfigError,
    add_config_args,
    check_weight_files,
    describe,
    get_config,
    parse_value,
    per_rank_batch,
    show_config,
)
from datasets import IGNORE, DatasetError, InfiniteSampler, build_dataset, class_weights, loader_workers
from distributed import Distributed, LaunchError, Stopped, StopRequest, launched_rank, timeout_message
from evaluate import Validator, draw_pictures, eval_dataset, evaluate, format_results, write_results
from loss import build_loss
from model import PretrainedError, build_model
from optimizer import build_optimizer, lr_at, set_lr
from precision import training_precision, use_channels_last
from transform import TrainTransform, normalize


class NonFiniteError(RuntimeError):
    """The loss or the gradients of a step are not finite: the run stops before the update."""


def train_loader(cfg, proc, start_iter):
    per_rank = per_rank_batch(cfg, proc.world)
    dataset = build_dataset(cfg, cfg.train_split, TrainTransform.from_config(cfg))
    # The sampler counts samples: this rank has consumed start_iter * grad_accum micro-batches already.
    sampler = InfiniteSampler(len(dataset), cfg.seed, proc.rank, proc.world, start_iter * cfg.grad_accum * per_rank)
    cuda = proc.device.type == "cuda"
    # with workers, this process does no augmentation itself: its OpenCV goes single-threaded (loader_workers)
    loader = torch.utils.data.DataLoader(dataset, per_rank, sampler=sampler, pin_memory=cuda, drop_last=True,
                                         persistent_workers=cuda and cfg.workers > 0, **loader_workers(cfg.workers))
    return dataset, loader


def override(args, key):
    """The value of the last `key`=value override, or None (the last one given wins, as for every override)."""
    values = [o.split("=", 1)[1] for o in args.overrides if o.startswith(f"{key}=")]
    return values[-1] if values else None


def read_config(args, ckpt=None, notes=None):
    """The config from --config and overrides, a resumed run's from the one stored in its checkpoint `ckpt`."""
    path = override(args, "resume")
    if not path:
        return get_config(args.config or "cityscapes", args.overrides, notes=notes)
    ckpt = ckpt or load_training_state(path)
    cfg = get_config(ckpt["config"].get("run_name", "cityscapes"), args.overrides, base=ckpt["config"], notes=notes)
    if ckpt["iteration"] >= cfg.max_iter:
        raise ConfigError(f"{path} holds iteration {ckpt['iteration']}: max_iter={cfg.max_iter} leaves "
                          f"nothing to train; to train longer pass max_iter above {ckpt['iteration']}")
    return cfg


def read_resume(args, rank):
    """(resume= checkpoint's contents or None, process group timeout). Only rank 0 reads the file (a node-local disk may
    hold it) and sends it on (train); the others' timeout is a dist_timeout= override or the default, not the file's."""
    path = override(args, "resume")
    if path and rank:
        timeout = override(args, "dist_timeout")
        return None, parse_value("dist_timeout", timeout, Config.dist_timeout) if timeout else Config.dist_timeout
    ckpt = load_training_state(path) if path else None
    return ckpt, read_config(args, ckpt).dist_timeout


def build_training(cfg, proc, channels_last=False):
    """(model to train: DDP-wrapped when distributed, the raw model inside it, optimizer, loss)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    # only a new run reads the ImageNet file: each machine's first process fetches it for the others, not racing them
    with proc.local_main_first():
        model = build_model(cfg, pretrained=not cfg.resume and not cfg.init_from)
    if cfg.init_from and not cfg.resume:  # fine-tuning: the tensors that fit, and what was left new
        loaded, skipped = load_fitting(model, cfg.init_from)
        if proc.main:
            print(f"init_from {cfg.init_from}: loaded {len(loaded)} tensors; {len(skipped)} re-initialized (shapes "
                  "differ)" + "".join(f"\n    {name}: checkpoint {old}, model {new}" for name, old, new in skipped))
    model = model.to(proc.device)
    if proc.enabled and proc.device.type == "cuda" and cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)  # on the raw model: group names must not carry "module."
    raw_model = model
    if proc.enabled:
        ids = [proc.device.index] if proc.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model, raw_model, optimizer, build_loss(cfg, proc.broadcast(class_weights(cfg) if proc.main else None),
                                                   raw_model.AUX_MODULES).to(proc.device)


def finite_flags(loss, params, check_grads):
    """[loss is finite, gradients are finite] as 0/1 floats, to all-reduce in one call. fp16's GradScaler checks the
    gradients itself; otherwise the norm of all of them (fused kernels, no sync) is finite exactly when each one is."""
    grads_finite = torch.ones((), device=loss.device)
    if check_grads:
        # max_norm=inf: the norm only, the gradients are left as they are (scaled by exactly 1)
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        grads_finite = torch.isfinite(norm).float().to(loss.device)
    return torch.stack([torch.isfinite(loss.detach()).float(), grads_finite])


class Log:
    """The losses summed over log_every iterations on the device (no sync per step), one JSON line a flush."""

    def __init__(self, path, enabled, batch_size, formula):
        self.path, self.enabled, self.batch_size, self.formula = path, enabled, batch_size, formula
        self.names, self.sums, self.count, self.skipped, self.t0 = None, None, 0, 0, time.perf_counter()

    def add(self, loss, parts, skipped=False):
        if self.names is None:
            self.names = list(parts)
        values = torch.stack([loss.detach().float(), *(parts[n].float() for n in self.names)])
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1
        self.skipped += int(skipped)

    def flush(self, proc, iteration, lr, eta_s, scaled=False):
        totals = proc.all_sum(torch.cat([self.sums, self.sums.new_tensor([self.count])]).double()).tolist()
        loss, *heads = (total / totals[-1] for total in totals[:-1])
        record = {"iter": iteration, "loss": loss, "loss_sums": self.formula,
                  **{f"loss_{n}": v for n, v in zip(self.names, heads, strict=True)}, "lr": lr,
                  "images_per_s": self.count * self.batch_size / (time.perf_counter() - self.t0),
                  "eta_s": eta_s, "time": time.time()}
        if scaled:
            record["skipped_steps"] = self.skipped  # of the steps since the previous record
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.sums, self.count, self.skipped, self.t0 = None, 0, 0, time.perf_counter()
        return record


def non_finite_message(flags, world, it, lr, last_path, cfg, saved, skipped_in_a_row=0):
    """What stopped the run, and what last.pth holds: `saved` is (its iteration, the loss logged last by then)."""
    if skipped_in_a_row:
        problem = (f"{skipped_in_a_row} steps in a row had non-finite values under fp16 (max_skipped_steps="
                   f"{cfg.max_skipped_steps}; the GradScaler skipped each and lowered its scale)")
    else:
        problem = "the loss is not finite" if flags[0] < world else "the loss is finite but its gradients are not"
    if saved is None:
        kept = "No checkpoint had been saved yet"
    else:
        loss = "" if saved[1] is None else f", where the logged loss was {saved[1]:.4g}"
        kept = (f"{last_path} holds iteration {saved[0]}{loss}; if the loss was already climbing then, its weights "
                "may be diverging too")
    return (f"{problem} at iteration {it + 1} (lr {lr:.3g}); stopped before the update. {kept}. Lower lr or check "
            f"the labels (num_classes={cfg.num_classes}, ignored label {IGNORE}), then resume or restart.")


def train(cfg, proc, ckpt=None, stop=None):
    """Train; returns (raw model, run directory, last validation's results or None). `ckpt`: rank 0's read_resume, sent
    to the others; `stop`: main's entered StopRequest, which also covers the final evaluation (None: none caught)."""
    if proc.main:  # first of all, so that a run failing early still shows what it was asked to do
        print("\n".join(filter(None, [describe(cfg), plots.missing_note()])), flush=True)
    # the checks that need the number of processes or the file system, before building anything
    micro = per_rank_batch(cfg, proc.world)
    check_weight_files(cfg)
    val_set = eval_dataset(cfg)  # a missing or empty val split (a wrong data_root) fails now, leaving no run folder
    # before anything is built: a run directory that cannot be written is a one-line error now
    run_dir = proc.broadcast(make_run_dir(cfg) if proc.main else None)
    dtype, autocast, scaler = training_precision(cfg.amp, proc.device)  # fp32 where the hardware lacks it: warned below
    channels_last = use_channels_last(cfg.channels_last, proc.device, dtype)
    model, raw_model, optimizer, criterion = build_training(cfg, proc, channels_last)
    start, best = 0, NO_BEST
    if cfg.resume:  # rank 0 reads the file and sends it: the others' machines need not have it
        ckpt = proc.broadcast(load_training_state(cfg.resume) if proc.main and ckpt is None else ckpt)
        start, best = restore(cfg.resume, raw_model, optimizer, scaler, proc.device, ckpt)
        del ckpt
    if proc.rank or not start:  # a per-rank stream for anything random in the model; rank 0 resumes its own
        torch.manual_seed(cfg.seed + proc.rank + start)
    _, loader = train_loader(cfg, proc, start)
    validate = Validator(cfg, proc, run_dir, best, val_set) if cfg.eval_every else None
    last_path, log_path = os.path.join(run_dir, "last.pth"), os.path.join(run_dir, "log.jsonl")
    formula = criterion.formula(cfg.aux_heads)
    if proc.main:
        prepare_run_dir(run_dir, cfg, start)  # only now, everything checked: a refused resume leaves it as it was
        accum = f" x {cfg.grad_accum} micro-batches per step" if cfg.grad_accum > 1 else ""
        print(f"run directory: {run_dir}" + (f", resuming from {cfg.resume} at iteration {start}" if start else "")
              + f"\ndevice: {proc.device}, processes: {proc.world}, batch per process: {micro}{accum}, amp: "
              f"{str(dtype or 'none (fp32)').replace('torch.', '')}, channels_last: {channels_last}\nloss = {formula}, "
              "each head's OHEM cross-entropy (log.jsonl: loss is this total, loss_<head> each head's)")
        if cfg.amp == "bf16" and dtype is None:
            print(f"warning: amp=bf16 but {proc.device} has no native bf16: training in fp32", file=sys.stderr)
    log = Log(log_path, proc.main, cfg.batch_size, formula)
    model.train()
    bar = tqdm(range(start, cfg.max_iter), initial=start, total=cfg.max_iter, disable=not proc.main,
               dynamic_ncols=True, desc="train")
    data = iter(loader)
    t_start = time.perf_counter()
    results, saved, logged_loss = None, (start, None) if start else None, None
    scaled, in_a_row, skipped_total = scaler.is_enabled(), 0, 0  # fp16: steps the GradScaler skipped
    stop, stopping = stop or StopRequest(), False  # a StopRequest not entered is never asked to stop
    for it in bar:
        lr = lr_at(it, cfg)  # the schedule counts optimizer steps
        loss, parts, flags, skipped = train_step(model, criterion, optimizer, scaler, autocast, data, cfg, proc,
                                                 lr, stop.signum is not None, channels_last)
        # fp16 skips a step with inf/NaN and lowers its scale, stopping when that keeps on; fp32 and bf16 stop at once
        in_a_row, skipped_total = (in_a_row + 1 if skipped else 0), skipped_total + skipped
        if (in_a_row >= cfg.max_skipped_steps) if scaled else min(flags[:2]) < proc.world:
            raise NonFiniteError(non_finite_message(flags, proc.world, it, lr, last_path, cfg, saved,
                                                    in_a_row if scaled else 0))
        log.add(loss, parts, skipped)
        done = it + 1
        if done % cfg.log_every == 0 or done == cfg.max_iter:
            eta = (cfg.max_iter - done) * (time.perf_counter() - t_start) / (done - start)
            record = log.flush(proc, done, lr, eta, scaled)
            logged_loss = record["loss"]
            extra = {"skipped": skipped_total} if scaled else {}
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.1f}",
                            **extra)
        # a stop request saves last.pth first and ends without validating: torchrun's agent kills the processes
        # 30 s after its SIGTERM, and a validation could take longer than that
        stopping = flags[2] > 0
        if validate and not stopping and (done % cfg.eval_every == 0 or done == cfg.max_iter):
            results = validate(raw_model, done, log_path)
        if done % cfg.ckpt_every == 0 or done == cfg.max_iter or stopping:
            if proc.main:
                best = validate.best if validate else NO_BEST
                save_checkpoint(last_path, training_state(raw_model, optimizer, scaler, done, cfg, proc.device,
                                                          best))
            saved = (done, logged_loss)
        if stopping and done < cfg.max_iter:
            bar.close()
            proc.barrier()
            raise Stopped(stop.signum or signal.SIGTERM, done, last_path)  # a rank not signalled: as SIGTERM
    bar.close()
    proc.sync_buffers(raw_model)
    final_path = os.path.join(run_dir, "model_final.pth")
    if proc.main:
        save_checkpoint(final_path, {"model": raw_model.state_dict(), "config": cfg.to_dict()})
    # asked to stop in the last iteration or its validation, on any rank: every rank skips the final evaluation
    asked = proc.all_sum(torch.tensor([float(stopping or stop.signum is not None)], device=proc.device)).item()
    if asked:
        stop.signum = stop.signum or signal.SIGTERM
    stop.saved_final(cfg.max_iter, final_path)
    if proc.main:
        print(f"trained {cfg.max_iter} iterations; final weights: {final_path}; training checkpoint: {last_path}")
        if validate and validate.best["miou"] is not None:
            print(f"best val mIoU {100 * validate.best['miou']:.2f} at iteration {validate.best['iter']}: "
                  f"{validate.best_path}")
    proc.barrier()
    return raw_model, run_dir, results


def train_step(model, criterion, optimizer, scaler, autocast, data, cfg, proc, lr, stop_requested=False,
               channels_last=False):
    """One optimizer step (benchmark.py times it): (loss, each head's, flags, skipped). Its one sync all-reduces [loss
    finite, gradients finite, asked to stop], so every rank stops after the same iteration. Without a GradScaler only
    a step finite on every rank updates; fp16's scaler skips one with inf/NaN and lowers its scale, as the reference."""
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    loss, parts = accumulate_gradients(model, criterion, data, cfg, proc, autocast, scaler, channels_last)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stop_flag = torch.tensor([float(stop_requested)], device=loss.device)
    flags = proc.all_sum(torch.cat([finite_flags(loss, params, not scaler.is_enabled()), stop_flag])).tolist()
    skipped = False
    if scaler.is_enabled():
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale  # update() backs the scale off exactly when step() found inf or NaN
    elif min(flags[:2]) == proc.world:
        scaler.step(optimizer)
        scaler.update()
    return loss, parts, flags, skipped


def accumulate_gradients(model, criterion, data, cfg, proc, autocast, scaler, channels_last=False):
    """Forward and backward of cfg.grad_accum micro-batches, losses divided by grad_accum (OHEM selects per
    micro-batch, as per GPU under torchrun; DDP syncs at the last only): (loss, each head's), means over them."""
    total, heads = 0, {}
    for k in range(cfg.grad_accum):
        images, labels = next(data)
        images = normalize(images.to(proc.device, non_blocking=True), cfg.mean, cfg.std, channels_last)
        labels = labels.to(proc.device, non_blocking=True).long()
        last = k == cfg.grad_accum - 1
        with nullcontext() if last or not proc.enabled else model.no_sync():
            with autocast:
                outputs = model(images)
            loss, parts = criterion(outputs, labels)
            scaler.scale(loss / cfg.grad_accum).backward()  # exact for grad_accum=1: x / 1 == x in IEEE floats
        total = total + loss.detach() / cfg.grad_accum
        heads = {n: heads.get(n, 0) + v / cfg.grad_accum for n, v in parts.items()}
    return total, heads


def final_evaluation(cfg, proc, model, run_dir, results=None):
    """eval.json and the pictures from evaluate.py's function on the val split (or the last validation's `results`)."""
    if results is None:
        results = evaluate(model, eval_dataset(cfg), cfg, proc)
    if proc.main:
        print(format_results(results))
        write_results(results, os.path.join(run_dir, "eval.json"))
        draw_pictures(run_dir, results)
    return results


def failure(exc, proc, timeout):
    """The exit status of an exception that ends the run, its one line printed; None for a bug (a traceback)."""
    if isinstance(exc, Stopped):
        line, code = str(exc), 128 + exc.signum  # the shell's code for that signal: 143 SIGTERM, 130 SIGINT
    elif isinstance(exc, KeyboardInterrupt):  # before training started, or a second Ctrl-C (StopRequest)
        line, code = "interrupted (Ctrl-C): nothing saved since the last checkpoint", 130
    elif isinstance(exc, (ConfigError, NonFiniteError, LaunchError, CheckpointError, DatasetError, PretrainedError,
                          OSError)):
        line = f"error: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
        code = 1 if isinstance(exc, NonFiniteError) else 2
    elif (message := timeout_message(exc, proc, timeout)) is not None:
        line, code = f"error: {message}; the run directory's last.pth holds the last checkpoint to resume from", 1
    else:
        return None
    # a config, a non-finite step and a stop are the same on every rank: said once; a file or disk problem by each
    if launched_rank() == 0 or not isinstance(exc, (ConfigError, NonFiniteError, Stopped)):
        print(line, file=sys.stderr)
    return code


def main(argv=None):
    parser = add_config_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawTextHelpFormatter))
    parser.add_argument("--show", action="store_true", help="print the resolved config and what it changes from the "
                                                               "defaults, then exit")
    args = parser.parse_args(argv)
    proc, timeout = None, Config.dist_timeout
    try:
        if args.show:
            print(show_config(read_config(args)))
            return 0
        # before the process group, whose timeout is a setting; with resume=, rank 0 alone reads the checkpoint
        ckpt, timeout = read_resume(args, launched_rank())
        proc = Distributed(timeout)
        with proc, StopRequest() as stop:
            notes = []
            cfg = proc.broadcast(read_config(args, ckpt, notes) if proc.main else None)
            for note in notes:
                print(note, flush=True)
            if proc.device.type == "cuda":
                torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick the fastest kernels
            model, run_dir, results = train(cfg, proc, ckpt, stop)
            del ckpt
            final_evaluation(cfg, proc, model, run_dir, results)  # a signal now stops at once (saved_final)
        return 0
    except (Exception, KeyboardInterrupt) as exc:
        code = failure(exc, proc, timeout)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
