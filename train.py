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
import re
import signal
import sys
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import plots
from checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_fitting,
    read_checkpoint,
    save_checkpoint,
    write_atomically,
)
from cityscapes import IGNORE, DatasetError
from configs import Config, ConfigError, add_config_args, format_config, get_config, parse_value
from datasets import InfiniteSampler, build_dataset, class_table, loader_workers, scan_labels
from distributed import Distributed, LaunchError, Stopped, StopRequest, launched_rank, timeout_message
from evaluate import eval_dataset, evaluate, format_results, write_results
from loss import build_loss
from model import PretrainedError, build_model
from optimizer import build_optimizer, load_optimizer_state, lr_at, set_lr
from precision import training_precision, use_channels_last
from transform import TrainTransform, normalize


class NonFiniteError(RuntimeError):
    """The loss or the gradients of a step are not finite: the run stops before the update."""


NO_BEST = {"iter": None, "miou": None}  # no validation yet: the best {"iter", "miou"} so far


def per_rank_batch(cfg, world):
    """The micro-batch each process runs at a time (batch_size / (world x grad_accum)); a ConfigError when the global
    batch does not split into micro-batches of >= 2."""
    parts = world * cfg.grad_accum
    if cfg.batch_size % parts:
        split = f"{world} processes" + (f" x {cfg.grad_accum} micro-batches" if cfg.grad_accum > 1 else "")
        raise ConfigError(f"batch_size={cfg.batch_size} does not split over {split}; use a multiple of {parts}")
    per_rank = cfg.batch_size // parts
    if per_rank < 2:
        raise ConfigError(f"batch_size={cfg.batch_size} gives {per_rank} image per process and micro-batch; BiSeNet "
                          "needs at least 2 (BatchNorm after global pooling has one value per channel otherwise)")
    return per_rank


def check_weight_files(cfg):
    """The weight file a new run reads exists: init_from=PATH, else pretrained=PATH (build_training reads one of
    them); a resumed run reads neither."""
    if cfg.resume:
        return
    for key in ("init_from",) if cfg.init_from else ("pretrained",):
        path = getattr(cfg, key)
        if path not in ("", "none", "torchvision") and not os.path.isfile(path):
            raise ConfigError(f"bad value for {key}: {path} is not a file")


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


def trim_log(path, iteration):
    """Drop the records after `iteration` from the JSON-lines log at `path`: a resumed run logs them again."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:  # in iteration order: one process appends them
            try:
                if json.loads(line)["iter"] > iteration:
                    break
            except (ValueError, TypeError, KeyError):  # a line cut short by a crash, or edited by hand: the end
                break
            kept.append(line)
    write_atomically(path, lambda f: f.write("".join(kept).encode()))


def resolve_run_dir(cfg):
    """runs/NAME, or the resumed checkpoint's folder; a used folder is never overwritten (NAME-1, -2...). A folder
    holding only config.json is a run that failed at start: it is used again."""
    if cfg.resume:
        return os.path.dirname(os.path.abspath(cfg.resume))
    base = os.path.join(cfg.out_dir, cfg.run_name)
    run_dir, n = base, 0
    while os.path.isdir(run_dir) and os.listdir(run_dir) not in ([], ["config.json"]):
        n += 1
        run_dir = f"{base}-{n}"
    return run_dir


def resume_path(args):
    """The resume= override's path, or "" (the last one given wins, as for every override)."""
    resume = [o.split("=", 1)[1] for o in args.overrides if o.startswith("resume=")]
    return resume[-1] if resume else ""


def read_config(args, ckpt=None, notes=None):
    """The config from --config and overrides; a resumed run starts from the config it was started with, stored in
    its checkpoint (`ckpt`: the resume= file's contents where they have been read already). `notes`: see
    configs.get_config."""
    path = resume_path(args)
    if path:
        ckpt = load_training_state(path) if ckpt is None else ckpt
        cfg = get_config(ckpt["config"].get("run_name", "cityscapes"), args.overrides, base=ckpt["config"],
                         notes=notes)
        if ckpt["iteration"] >= cfg.max_iter:
            raise ConfigError(f"{path} holds iteration {ckpt['iteration']}: max_iter={cfg.max_iter} leaves "
                              f"nothing to train; to train longer pass max_iter above {ckpt['iteration']}")
        return cfg
    return get_config(args.config or "cityscapes", args.overrides, notes=notes)


def read_resume(args, rank):
    """(the resume= checkpoint's contents or None, the process group's timeout). Only rank 0 reads the file (machines
    with node-local disks have it on the first machine alone) and sends it to the others once the process group
    exists (train); they take the timeout from a dist_timeout= override, else its default: the checkpoint's config
    cannot set it for them."""
    path = resume_path(args)
    if not path:
        return None, read_config(args).dist_timeout
    if rank == 0:
        ckpt = load_training_state(path)
        return ckpt, read_config(args, ckpt).dist_timeout
    timeouts = [o.split("=", 1)[1] for o in args.overrides if o.startswith("dist_timeout=")]
    return None, parse_value("dist_timeout", timeouts[-1], Config.dist_timeout) if timeouts else Config.dist_timeout


TEMP_FILE = re.compile(r".+\.tmp\d+(\.png)?$")  # write_atomically's and plots.save's temporary names


def remove_stale_temp_files(run_dir):
    """Temporary files left by a run killed while writing (kill -9, power loss): nothing else removes them."""
    if not os.path.isdir(run_dir):
        return []
    stale = [os.path.join(run_dir, n) for n in sorted(os.listdir(run_dir)) if TEMP_FILE.fullmatch(n)]
    for path in stale:
        os.remove(path)
    return stale


def load_training_state(path):
    ckpt = read_checkpoint(path)
    missing = [k for k in ("optimizer", "scaler", "iteration", "config", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (no {', '.join(missing)}); "
                              "resume takes a run's last.pth, not the final weights")
    return ckpt


def resolve_class_weights(cfg, proc):
    """The loss's class weights: None, the configured numbers, or (class_weights=median) the median-frequency
    weights of the training split's labels, computed by the main process and sent to the others."""
    if not cfg.class_weights:
        return None
    if tuple(cfg.class_weights) != ("median",):
        return [float(w) for w in cfg.class_weights]
    weights = None
    if proc.main:
        samples = build_dataset(cfg, cfg.train_split).samples
        scan = scan_labels(samples, class_table(cfg), cfg.num_classes, desc="class weights", check_images=False)
        if scan.problems:
            raise DatasetError(scan.problems[0])
        weights = scan.median_frequency_weights().tolist()
        print("class_weights=median: " + ",".join(f"{w:.4f}" for w in weights), flush=True)
    return proc.broadcast(weights)


def init_from(model, cfg, proc):
    """Fine-tuning: the tensors of cfg.init_from that fit; says what was loaded and what was left new."""
    loaded, skipped = load_fitting(model, cfg.init_from)
    if proc.main:
        print(f"init_from {cfg.init_from}: loaded {len(loaded)} tensors; {len(skipped)} re-initialized (shapes differ)"
              + "".join(f"\n    {name}: checkpoint {old}, model {new}" for name, old, new in skipped))


def build_training(cfg, proc, channels_last=False):
    """(model to train: DDP-wrapped when distributed, the raw model inside it, optimizer, loss)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    # A resumed or fine-tuned run takes its weights from a checkpoint: no ImageNet file needed. Otherwise the first
    # process of each machine fetches the file into the torch hub cache, which the others then read instead of racing
    # on it.
    with proc.local_main_first():
        model = build_model(cfg, pretrained=not cfg.resume and not cfg.init_from)
    if cfg.init_from and not cfg.resume:
        init_from(model, cfg, proc)
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
    return model, raw_model, optimizer, build_loss(cfg, resolve_class_weights(cfg, proc)).to(proc.device)


def rng_state(device):
    """The random states a resumed run restores: the CPU generator, and this process's GPU's."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def training_state(raw_model, optimizer, scaler, iteration, cfg, device, best):
    return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "iteration": iteration, "config": cfg.to_dict(), "rng": rng_state(device), "best": dict(best)}


def restore(ckpt_path, raw_model, optimizer, scaler, device, ckpt=None):
    """Load a training checkpoint (`ckpt`: its contents where they have been read already) into the built model,
    optimizer and scaler; returns (its iteration, the best validation so far: {"iter", "miou"}).

    The optimizer keeps the settings of the current config (overrides given on resume apply). A disabled scaler
    saves {}: then an fp16 run starts a fresh scaler (and a scaler that is disabled now ignores a saved state).
    """
    ckpt = load_checkpoint(raw_model, ckpt_path, ckpt)
    load_optimizer_state(optimizer, ckpt["optimizer"])
    if ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], device)
    return ckpt["iteration"], ckpt.get("best", NO_BEST)


def finite_flags(loss, params, check_grads):
    """[loss is finite, gradients are finite] as 0/1 floats, to all-reduce in one call.

    With fp16's GradScaler the gradients are not checked: inf there is expected, and the scaler skips that step.
    Otherwise the norm of all gradients together (fused kernels, no sync) is finite exactly when every one is.
    """
    grads_finite = torch.ones((), device=loss.device)
    if check_grads:
        # max_norm=inf: the norm only, the gradients are left as they are (scaled by exactly 1)
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        grads_finite = torch.isfinite(norm).float().to(loss.device)
    return torch.stack([torch.isfinite(loss.detach()).float(), grads_finite])


class Log:
    """Sums of the optimized loss and of each head's loss over the last log_every iterations (kept on the device:
    no sync per step), written as one JSON line at each flush. `formula` says how the loss is made of the heads."""

    def __init__(self, path, enabled, batch_size, formula):
        self.path, self.enabled, self.batch_size, self.formula = path, enabled, batch_size, formula
        self.names, self.sums, self.count, self.skipped, self.t0 = None, None, 0, 0, time.perf_counter()

    def add(self, loss, parts, skipped=False):
        """One step's losses; `skipped`: fp16's GradScaler skipped its update (the same on every rank)."""
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
    """What stopped the run, and what last.pth holds: `saved` is (its iteration, the loss logged last up to then);
    `skipped_in_a_row`: fp16's consecutive steps skipped by the GradScaler, where that is what stopped it."""
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


class Validator:
    """Validation during training (eval_every): the val split scored with evaluate.py's evaluate(), a record per
    validation in log.jsonl, model_best.pth for the best mIoU so far, and the run's pictures redrawn."""

    def __init__(self, cfg, proc, run_dir, best, dataset):
        self.cfg, self.proc, self.run_dir, self.best, self.dataset = cfg, proc, run_dir, dict(best), dataset
        self.best_path = os.path.join(run_dir, "model_best.pth")

    def __call__(self, raw_model, iteration, log_path):
        """Validate; returns the evaluate() results. The model is left in training mode."""
        self.proc.sync_buffers(raw_model)  # BatchNorm statistics as one model, under torchrun
        t0 = time.perf_counter()
        results = evaluate(raw_model, self.dataset, self.cfg, self.proc)
        raw_model.train()
        miou = results["miou"]
        record = {"iter": iteration, "val_miou": miou, "val_pixel_accuracy": results["pixel_accuracy"],
                  "val_iou": results["iou"], "val_seconds": time.perf_counter() - t0, "time": time.time()}
        improved = miou is not None and (self.best["miou"] is None or miou > self.best["miou"])
        if improved:
            self.best = {"iter": iteration, "miou": miou}
        if self.proc.main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if improved:
                save_checkpoint(self.best_path, {"model": raw_model.state_dict(), "config": self.cfg.to_dict(),
                                                 "iteration": iteration, "miou": miou})
            best = "" if self.best["miou"] is None else f"; best {100 * self.best['miou']:.2f} at {self.best['iter']}"
            tqdm.write(f"iteration {iteration}: val mIoU {100 * (miou or 0):.2f} "
                       f"({record['val_seconds']:.0f} s){best}")
            draw_pictures(self.run_dir, results)
        return results


def draw_pictures(run_dir, results=None):
    """curves.png from log.jsonl and, given evaluation results, confusion.png (skipped without matplotlib)."""
    plots.plot_curves(os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "curves.png"))
    if results is not None:
        plots.plot_confusion(results, os.path.join(run_dir, "confusion.png"))


def show_config(cfg):
    """train.py --show: every setting (as config.json holds them), then the ones the preset and overrides change."""
    defaults = Config().to_dict()
    changed = [f"  {k}={json.dumps(v)}" for k, v in cfg.to_dict().items() if v != defaults[k]]
    return f"{format_config(cfg)}\nchanged from the defaults ({len(changed)}):\n" + "\n".join(changed)


def startup_summary(cfg):
    """What the run trains, on what, and where it writes: a few lines instead of the whole config (config.json)."""
    what = {"bisenetv1": "BiSeNetV1 (ResNet18)", "bisenetv2": "BiSeNetV2"}[cfg.arch]
    start = "from scratch" if cfg.pretrained == "none" else f"from ImageNet weights ({cfg.pretrained})"
    if cfg.init_from:
        start = f"from {cfg.init_from}"
    if cfg.resume:
        start = f"resuming {cfg.resume}"
    lines = [f"train {what} {start}: {cfg.max_iter} iterations, batch {cfg.batch_size}, crop "
             f"{cfg.crop_size[0]}x{cfg.crop_size[1]}, lr {cfg.lr:g} (run {cfg.run_name})",
             f"data: {cfg.dataset} at {cfg.data_root}, {cfg.num_classes} classes; every setting goes to the run "
             "folder's config.json"]
    note = plots.missing_note()
    if note:
        lines.append(note)
    return "\n".join(lines)


def train(cfg, proc, ckpt=None, stop=None):
    """Train; returns (the raw model, its run directory, the last validation's results or None). `ckpt`: the resume=
    file's contents where rank 0 has read them already (read_resume); the other ranks receive them from it. `stop`:
    the entered StopRequest of main, which also covers the final evaluation (None: signals are not caught)."""
    if proc.main:  # first of all, so that a run failing early still shows what it was asked to do
        print(startup_summary(cfg), flush=True)
    # the checks that need the number of processes or the file system, before building anything
    micro = per_rank_batch(cfg, proc.world)
    check_weight_files(cfg)
    val_set = eval_dataset(cfg)  # a missing or empty val split (a wrong data_root) fails now, leaving no run folder
    run_dir = proc.broadcast(resolve_run_dir(cfg) if proc.main else None)
    if proc.main:  # before anything is built: a run directory that cannot be written is a one-line error now
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as err:
            raise OSError(err.errno, f"cannot create the run directory {run_dir}: {err.strerror or err}") from None
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
        # the run folder changes only now, everything checked: a refused resume leaves its config.json as it was
        for path in remove_stale_temp_files(run_dir):
            print(f"removed {path}, left by a run killed while writing it")
        write_atomically(os.path.join(run_dir, "config.json"), lambda f: f.write(format_config(cfg).encode()))
        if start:
            trim_log(log_path, start)  # the records after the checkpoint are logged again
        best_file = ", model_best.pth" if cfg.eval_every else ""
        print(f"run directory: {run_dir}  (config.json, log.jsonl, last.pth, model_final.pth{best_file}, curves.png, "
              "confusion.png)")
        accum = f" x {cfg.grad_accum} micro-batches per step" if cfg.grad_accum > 1 else ""
        print(f"device: {proc.device}, processes: {proc.world}, batch per process: {micro}{accum}, "
              f"amp: {str(dtype or 'none (fp32)').replace('torch.', '')}, channels_last: {channels_last}")
        if cfg.amp == "bf16" and dtype is None:
            print(f"warning: amp=bf16 but {proc.device} has no native bf16: training in fp32", file=sys.stderr)
        print(f"loss = {formula}, each head's OHEM cross-entropy: the logged loss is this weighted total, the value "
              "optimized; loss_<head> are the heads' own")
        if start:
            print(f"resuming from {cfg.resume} at iteration {start}")
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
        # fp16: a step with inf or NaN is skipped and the scale lowered; the run stops only when that keeps on.
        # fp32 and bf16 have no scale to lower: they stop at once.
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
    # asked to stop during the last iteration or its validation, on any rank: every rank ends without the final
    # evaluation (a rank not signalled: as SIGTERM)
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
    """One optimizer step as training takes it (benchmark.py times this function): the lr set, the gradients of
    cfg.grad_accum micro-batches from `data` (accumulate_gradients), the step's one sync, and the update.

    The sync all-reduces [loss finite, gradients finite, asked to stop] of every rank, so that every rank learns
    whether any rank went non-finite or was asked to stop (SIGTERM, SIGINT) and all stop after the same iteration.
    Without a GradScaler the update is made only where the first two flags equal the number of processes. With
    fp16's GradScaler the scaler decides, as in the reference recipe: it skips a step whose gradients hold inf or NaN
    (a non-finite loss gives such gradients; DDP's all-reduce gives every rank the same) and lowers its scale.
    Returns (the loss, each head's loss, the flags summed over ranks, whether the scaler skipped the update).
    """
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
    """Forward and backward of cfg.grad_accum micro-batches from `data`, their gradients summed as one step's:
    each micro-batch's loss is divided by grad_accum, so the step equals one over the whole batch where the loss is
    a mean over equal micro-batches (OHEM selects per micro-batch, as it does per GPU under torchrun). DDP averages
    the gradients at the last micro-batch only. Returns (the step's loss, each head's), means over micro-batches.
    The loader's uint8 batch is copied to the device as it is and normalized there (transform.normalize)."""
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
    """The val split scored with the same function evaluate.py runs (or the last validation's `results`, of the
    same model), eval.json written and the pictures drawn."""
    if results is None:
        results = evaluate(model, eval_dataset(cfg), cfg, proc)
    if proc.main:
        print(format_results(results))
        write_results(results, os.path.join(run_dir, "eval.json"))
        draw_pictures(run_dir, results)
    return results


def main(argv=None):
    parser = add_config_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawTextHelpFormatter))
    parser.add_argument("--show", action="store_true", help="print the resolved config and what it changes from the "
                                                               "defaults, then exit")
    args = parser.parse_args(argv)
    if args.show:
        try:
            cfg = read_config(args)
        except (ConfigError, CheckpointError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(show_config(cfg))
        return 0
    try:
        # before the process group, whose timeout is a setting; with resume=, rank 0 alone reads the checkpoint
        ckpt, timeout = read_resume(args, launched_rank())
        proc = Distributed(timeout)
    except ConfigError as exc:
        if launched_rank() == 0:  # the same on every rank: said once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except (LaunchError, CheckpointError) as exc:  # CheckpointError: rank 0's resume= file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with proc, StopRequest() as stop:
        try:
            notes = []
            cfg = proc.broadcast(read_config(args, ckpt, notes) if proc.main else None)
            for note in notes:
                print(note, flush=True)
            if proc.device.type == "cuda":
                torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick the fastest kernels
            model, run_dir, results = train(cfg, proc, ckpt, stop)
            del ckpt
            final_evaluation(cfg, proc, model, run_dir, results)  # a signal now stops at once (saved_final)
        except (ConfigError, NonFiniteError, Stopped) as exc:
            # The same on every rank (one config; an all-reduced check): said once.
            if proc.main:
                print(f"{'' if isinstance(exc, Stopped) else 'error: '}{exc}", file=sys.stderr)
            if isinstance(exc, Stopped):
                return 128 + exc.signum  # the shell's code for a process ended by that signal: 143 SIGTERM, 130 SIGINT
            return 2 if isinstance(exc, ConfigError) else 1
        except (CheckpointError, DatasetError, PretrainedError, OSError) as exc:
            # Possibly one machine's own problem (a file missing there, a full disk): every rank says it.
            print(f"error: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:
            message = timeout_message(exc, proc, cfg.dist_timeout)
            if message is None:
                raise
            print(f"error: {message}; the run directory's last.pth holds the last checkpoint to resume from",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # before training started, or a second Ctrl-C (StopRequest): stopped at once
            print("interrupted (Ctrl-C): nothing saved since the last checkpoint", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
