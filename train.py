"""Train BiSeNet.

    python train.py [--config NAME] [key=value ...]                    # one GPU, or the CPU
    torchrun --nproc_per_node=N train.py [--config NAME] [key=value]    # N processes (DDP), one node
    python train.py resume=runs/NAME/last.pth                           # continue a stopped run

Distributed training is detected from torchrun's RANK variable; rank 0 prints and writes files.
"""

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from cityscapes import Cityscapes, DatasetError
from configs import ConfigError, add_config_args, format_config, get_config
from distributed import Distributed
from evaluate import evaluate, format_results
from loss import build_loss
from model import CheckpointError, build_model, load_checkpoint, native_bf16, read_checkpoint
from optimizer import build_optimizer, lr_at, set_lr
from resnet import PretrainedError
from synthetic import prepare_data
from transform import TrainTransform


class InfiniteSampler(torch.utils.data.Sampler):
    """An endless stream of (index, augmentation seed) for this rank, resumable at any position.

    The global stream is a fresh permutation of the dataset per epoch (seeded by seed and epoch); rank r
    takes stream positions r, r + world, r + 2 world, ... as DistributedSampler does. Each sample's
    augmentation seed is (seed, stream position), so the data a run sees depends only on the seed and
    the iteration: not on the number of loader workers, and not on whether the run was resumed.
    """

    def __init__(self, size, seed=0, rank=0, world=1, start=0):
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world, start

    def permutation(self, epoch):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        position, epoch, order = self.start * self.world + self.rank, -1, None
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                order = self.permutation(epoch)
            yield order[position % self.size], (self.seed, position)
            position += self.world


def per_rank_batch(cfg, world):
    """The batch each process trains on; a ConfigError when the global batch does not split into >= 2 per rank."""
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} does not split over {world} processes; "
                          f"use a multiple of {world}")
    per_rank = cfg.batch_size // world
    if per_rank < 2:
        raise ConfigError(f"batch_size={cfg.batch_size} gives {per_rank} image per process; BiSeNet needs at least 2 "
                          "(BatchNorm after global pooling has one value per channel otherwise)")
    return per_rank


def train_loader(cfg, ddp, start_iter):
    per_rank = per_rank_batch(cfg, ddp.world)
    dataset = Cityscapes(cfg.data_root, cfg.train_split, TrainTransform.from_config(cfg))
    # The sampler counts samples: this rank has consumed start_iter * per_rank of them already.
    sampler = InfiniteSampler(len(dataset), cfg.seed, ddp.rank, ddp.world, start_iter * per_rank)
    cuda = ddp.device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset, per_rank, sampler=sampler, num_workers=cfg.workers, pin_memory=cuda, drop_last=True,
        persistent_workers=cuda and cfg.workers > 0)
    return dataset, loader


def amp_dtype(amp, device):
    """The autocast dtype of config value `amp` on `device`, None for fp32: on CUDA fp16 or bf16 as asked; on the CPU
    bf16 only where it is native (AVX512-BF16 or AMX), else fp32 (the CPU has no fast fp16)."""
    if amp == "none":
        return None
    if device.type == "cuda":
        return torch.float16 if amp == "fp16" else torch.bfloat16
    if device.type == "cpu" and amp == "bf16" and native_bf16(device):
        return torch.bfloat16
    return None


def amp_settings(cfg, device):
    """(autocast context, GradScaler) for cfg.amp on `device`; the scaler is only enabled for fp16."""
    dtype = amp_dtype(cfg.amp, device)
    if dtype is None:
        return nullcontext(), torch.amp.GradScaler("cuda", enabled=False)
    return torch.autocast(device.type, dtype=dtype), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def save_checkpoint(path, state):
    """torch.save through a temporary file and a rename, so a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def resolve_run_dir(cfg):
    """runs/NAME, or the resumed checkpoint's folder; a used folder is never overwritten (NAME-1, -2...)."""
    if cfg.resume:
        return os.path.dirname(os.path.abspath(cfg.resume))
    base = os.path.join(cfg.out_dir, cfg.run_name)
    run_dir, n = base, 0
    while os.path.isdir(run_dir) and os.listdir(run_dir):
        n += 1
        run_dir = f"{base}-{n}"
    return run_dir


def read_config(args):
    """The config from --config and overrides; a resumed run starts from the config it was started with."""
    resume = [o.split("=", 1)[1] for o in args.overrides if o.startswith("resume=")]
    if resume and resume[-1]:
        ckpt = load_training_state(resume[-1])
        return get_config(ckpt["config"]["run_name"], args.overrides, base=ckpt["config"])
    return get_config(args.config or "cityscapes", args.overrides)


def load_training_state(path):
    ckpt = read_checkpoint(path)
    missing = [k for k in ("optimizer", "scaler", "iteration", "config", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (no {', '.join(missing)}); "
                              "resume takes a run's last.pth, not the final weights")
    return ckpt


def build_training(cfg, ddp):
    """Model (DDP-wrapped when distributed), its bare module, optimizer, loss."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg).to(ddp.device)
    if ddp.enabled and ddp.device.type == "cuda" and cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)  # on the bare model: group names must not carry "module."
    bare = model
    if ddp.enabled:
        ids = [ddp.device.index] if ddp.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model, bare, optimizer, build_loss(cfg).to(ddp.device)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def training_state(bare, optimizer, scaler, iteration, cfg):
    return {"model": bare.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "iteration": iteration, "config": cfg.to_dict(), "rng": rng_state()}


def restore(ckpt_path, bare, optimizer, scaler):
    ckpt = load_checkpoint(bare, ckpt_path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["iteration"]


class Log:
    """Per-head loss sums over the last log_every iterations (kept on the device: no sync per step),
    written as one JSON line at each flush."""

    def __init__(self, path, enabled, batch_size):
        self.path, self.enabled, self.batch_size = path, enabled, batch_size
        self.names, self.sums, self.count, self.t0 = None, None, 0, time.perf_counter()

    def add(self, parts):
        if self.names is None:
            self.names = list(parts)
        values = torch.stack([parts[n].float() for n in self.names])
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1

    def flush(self, ddp, iteration, lr, eta_s):
        totals = ddp.all_sum(torch.cat([self.sums, self.sums.new_tensor([self.count])]).double()).tolist()
        heads = {n: totals[i] / totals[-1] for i, n in enumerate(self.names)}
        record = {"iter": iteration, "loss": sum(heads.values()), "loss_sums": "+".join(self.names),
                  **{f"loss_{n}": v for n, v in heads.items()}, "lr": lr,
                  "images_per_s": self.count * self.batch_size / (time.perf_counter() - self.t0),
                  "eta_s": eta_s, "time": time.time()}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.sums, self.count, self.t0 = None, 0, time.perf_counter()
        return record


def train(cfg, ddp):
    per_rank_batch(cfg, ddp.world)  # fail on a bad batch before generating data or building anything
    prepare_data(cfg, ddp)
    run_dir = ddp.broadcast(resolve_run_dir(cfg) if ddp.main else None)
    model, bare, optimizer, criterion = build_training(cfg, ddp)
    autocast, scaler = amp_settings(cfg, ddp.device)
    start = restore(cfg.resume, bare, optimizer, scaler) if cfg.resume else 0
    if ddp.rank or not start:  # a per-rank stream for anything random in the model; rank 0 resumes its own
        torch.manual_seed(cfg.seed + ddp.rank + start)
    _, loader = train_loader(cfg, ddp, start)
    if ddp.main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            f.write(format_config(cfg))
        print(f"config:\n{format_config(cfg)}\nrun directory: {run_dir}  (log.jsonl, last.pth, model_final.pth)")
        print(f"device: {ddp.device}, processes: {ddp.world}, batch per process: {cfg.batch_size // ddp.world}, "
              f"amp: {str(amp_dtype(cfg.amp, ddp.device) or 'none (fp32)').replace('torch.', '')}")
        print(f"loss = OHEM(main) + {cfg.aux_weight} x (OHEM(aux8) + OHEM(aux16)): the logged loss is this sum")
        if start:
            print(f"resuming from {cfg.resume} at iteration {start}")
    last_path = os.path.join(run_dir, "last.pth")
    log = Log(os.path.join(run_dir, "log.jsonl"), ddp.main, cfg.batch_size)
    model.train()
    bar = tqdm(range(start, cfg.max_iter), initial=start, total=cfg.max_iter, disable=not ddp.main,
               dynamic_ncols=True, desc="train")
    data = iter(loader)
    t_start = time.perf_counter()
    for it in bar:
        images, labels = next(data)
        images = images.to(ddp.device, non_blocking=True)
        labels = labels.to(ddp.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        lr = lr_at(it, cfg)
        set_lr(optimizer, lr)
        with autocast:
            outputs = model(images)
        loss, parts = criterion(outputs, labels)
        finite = ddp.all_sum(torch.isfinite(loss.detach()).float().reshape(1))
        if finite.item() < ddp.world:
            raise SystemExit(f"error: the loss is not finite at iteration {it + 1} (lr {lr:.3g}); stopping. "
                             f"The last good checkpoint, {last_path}, is intact: lower lr or check the labels "
                             f"(num_classes={cfg.num_classes}, ignore_index={cfg.ignore_index}) and resume.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        log.add(parts)
        done = it + 1
        if done % cfg.log_every == 0 or done == cfg.max_iter:
            eta = (cfg.max_iter - done) * (time.perf_counter() - t_start) / (done - start)
            record = log.flush(ddp, done, lr, eta)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.1f}")
        if ddp.main and (done % cfg.ckpt_every == 0 or done == cfg.max_iter):
            save_checkpoint(last_path, training_state(bare, optimizer, scaler, done, cfg))
    bar.close()
    ddp.sync_buffers(bare)
    final_path = os.path.join(run_dir, "model_final.pth")
    if ddp.main:
        save_checkpoint(final_path, {"model": bare.state_dict(), "config": cfg.to_dict()})
        print(f"trained {cfg.max_iter} iterations; final weights: {final_path}; training checkpoint: {last_path}")
    ddp.barrier()
    return bare, run_dir


def final_evaluation(cfg, ddp, model, run_dir):
    """Evaluate on the val split with the same function evaluate.py runs, and write eval.json."""
    dataset = Cityscapes(cfg.data_root, cfg.val_split)
    results = evaluate(model, dataset, cfg, ddp)
    if ddp.main:
        print(format_results(results))
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(argv=None):
    parser = add_config_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawTextHelpFormatter))
    args = parser.parse_args(argv)
    ddp = Distributed()
    try:
        cfg = read_config(args)
        if ddp.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick the fastest kernels
        model, run_dir = train(cfg, ddp)
        final_evaluation(cfg, ddp, model, run_dir)
    except (ConfigError, CheckpointError, DatasetError, PretrainedError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        ddp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
