"""Files written safely (write_atomically: every file the project writes), checkpoints read into a model
(load_checkpoint, load_fitting, load_for_inference) and the run folder a training run resumes from."""

import dataclasses
import io
import json
import os
import re
import sys

import torch

from configs import CITYSCAPES_MEAN, CITYSCAPES_STD, IMAGENET_MEAN, IMAGENET_STD, MODEL_KEYS, format_config, get_config
from model import build_model, load_failure, state_dict_problems
from optimizer import load_optimizer_state

# Settings a model was trained with that no weight records: a checkpoint loads whatever their value, and its
# predictions change with them (upsample is the one architecture switch that shapes no parameter).
UNRECORDED_KEYS = ("upsample", "mean", "std")
# A tensor name only one architecture has: what a bare state dict (no config) was trained as
ARCH_MARKS = {"bisenetv1": "backbone.", "bisenetv2": "detail."}
ARCH_NAMES = {"bisenetv1": "BiSeNetV1", "bisenetv2": "BiSeNetV2"}
NO_BEST = {"iter": None, "miou": None}  # no validation yet: the best {"iter", "miou"} so far
TEMP_FILE = re.compile(r".+\.tmp\d+(\.png)?$")  # write_atomically's and plots.save's temporary names


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model it is loaded into."""


def write_atomically(path, write):
    """write(file) into a temporary file renamed to `path`: a crash, or with the fsyncs a power loss, leaves the old
    file or the new one, never a half-written one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):  # a full disk, a read-only or vanished folder: one line naming the file
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename made durable; Windows cannot open a folder and needs none
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path, state):
    """torch.save into memory first, so that a full disk is an OSError of the file write (ENOSPC), not torch's
    "unexpected pos" from inside its zip writer."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(model, path, ckpt=None):
    """The one place that loads a checkpoint's weights into a built model: ours, or a bare state dict (such as
    CoinCheung/BiSeNet's released BiSeNetV2 weights). Returns the checkpoint dict (a bare one as {"model": state})."""
    ckpt, state = _fitting_state(model, path, ckpt)
    model.load_state_dict(state)
    return ckpt


def load_for_inference(path, config=None, overrides=()):
    """(eval-mode model on the CPU without aux heads, cfg) of the checkpoint at `path`, read once: what evaluate.py,
    demo.py and export.py run. cfg: see inference_config."""
    ckpt = read_checkpoint(path)
    cfg = inference_config(ckpt.get("config"), config, overrides)
    model = build_model(dataclasses.replace(cfg, aux_heads=False), pretrained=False)
    load_checkpoint(model, path, ckpt)
    return model.eval(), cfg


def inference_config(ckpt_config, config=None, overrides=()):
    """Preset `config` if given, else the checkpoint's stored config, with the overrides (mode=X: eval_mode=X) on top;
    warns where it differs from the checkpoint's in a setting no weight records (UNRECORDED_KEYS)."""
    overrides = [("eval_" + o) if o.startswith("mode=") else o for o in overrides]
    if config or ckpt_config is None:
        cfg = get_config(config or "cityscapes", overrides)
    else:
        cfg = get_config(ckpt_config.get("run_name", "cityscapes"), overrides, base=ckpt_config)
    trained = _trained_config(ckpt_config)
    wrong = [k for k in MODEL_KEYS if k != "aux_heads" and k in trained and trained[k] != getattr(cfg, k)]
    if config and wrong:  # the preset builds another model than the one the checkpoint holds, with its own config
        raise CheckpointError(f"the checkpoint was trained with {', '.join(f'{k}={trained[k]!r}' for k in wrong)}; "
                              f"--config {config} builds {', '.join(f'{k}={getattr(cfg, k)!r}' for k in wrong)}: leave "
                              "out --config, the checkpoint's own config is used")
    differ = [f"{key}={_plain(getattr(cfg, key))!r} (trained with {_plain(ckpt_config[key])!r})"
              for key in UNRECORDED_KEYS
              if isinstance(ckpt_config, dict) and key in ckpt_config
              and _plain(ckpt_config[key]) != _plain(getattr(cfg, key))]
    if differ:
        print(f"warning: {', '.join(differ)}: the checkpoint loads, but its predictions change; to use the values "
              "it was trained with, leave out --config or override them", file=sys.stderr)
    if ckpt_config is None:  # nothing in the file says what its input was normalized with: say what is used
        print(_normalization_note(cfg, config), file=sys.stderr)
    return cfg


def _normalization_note(cfg, config):
    known = {(IMAGENET_MEAN, IMAGENET_STD): "ImageNet's", (CITYSCAPES_MEAN, CITYSCAPES_STD): "CoinCheung's Cityscapes"}
    whose = known.get((tuple(cfg.mean), tuple(cfg.std)), "set in the config")
    mean, std = ",".join(f"{v:g}" for v in cfg.mean), ",".join(f"{v:g}" for v in cfg.std)
    return (f"note: a bare state dict records no normalization: scored with mean={mean} std={std} ({whose}, from "
            f"--config {config or 'cityscapes'}); override mean= and std= if it was trained with others")


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def load_fitting(model, path):
    """Fine-tuning (init_from): load the tensors whose shape fits `model`; the others (classifiers of other classes)
    stay new. Another architecture (missing or unexpected tensors) is still a CheckpointError. Returns (loaded names,
    [(name, checkpoint shape, model shape)] of the tensors left new)."""
    _, state = _fitting_state(model, path, shapes=False)
    expected = model.state_dict()
    fitting = {k: v for k, v in state.items() if v.shape == expected[k].shape}
    skipped = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if k not in fitting]
    model.load_state_dict(fitting, strict=False)
    return sorted(fitting), skipped


def _fitting_state(model, path, ckpt=None, shapes=True):
    """(checkpoint, its state dict less DDP / torch.compile prefixes and aux heads `model` lacks); a CheckpointError
    where it does not fit `model` (shapes=False, for fine-tuning: only missing and unexpected tensors count)."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    state = {_strip_prefixes(k): v for k, v in ckpt["model"].items()}
    if not model.arch["aux_heads"]:
        state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{m}." for m in model.AUX_MODULES))}
    # the architecture of the weights: told by a tensor name only it has, else by the stored config
    trained = next((arch for arch, mark in ARCH_MARKS.items() if any(k.startswith(mark) for k in state)),
                   _trained_config(ckpt.get("config")).get("arch"))
    built = model.arch["arch"]
    if trained not in (None, built):
        fix = f"arch={trained}" + (" pretrained=none (the _v2 presets set both)" if trained == "bisenetv2" else "")
        raise CheckpointError(f"checkpoint {path} does not fit this model: it looks like a {ARCH_NAMES[trained]} "
                              f"checkpoint and the model is a {ARCH_NAMES[built]} (arch={built}): set {fix}")
    expected, problems = model.state_dict(), []
    cls = state.get(f"{model.CLASSIFIER}.weight")
    if shapes and cls is not None and cls.shape[0] != model.arch["num_classes"]:
        problems.append(f"checkpoint has {cls.shape[0]} classes, config has {model.arch['num_classes']} (num_classes); "
                        "to fine-tune it on other classes use init_from=PATH")
    problems += state_dict_problems(expected, state, shapes)
    if set(expected) != set(state):
        problems.append(_layout_hint(model, set(expected) - set(state), set(state) - set(expected)))
    if problems:
        hint = _config_hint(model, ckpt.get("config"), shapes)
        raise CheckpointError(f"checkpoint {path} does not fit this model: " + "; ".join(problems) + hint)
    return ckpt, state


def _trained_config(config):
    """A checkpoint's stored config dict ({} for none), with the values of keys added since it was written."""
    if not isinstance(config, dict):
        return {}
    return {"arch": "bisenetv1", **config}  # checkpoints from before BiSeNetV2 hold BiSeNetV1


def read_checkpoint(path):
    if os.path.isdir(path):
        inside = [n for n in ("model_final.pth", "model_best.pth", "last.pth") if os.path.isfile(os.path.join(path, n))]
        hint = f"; did you mean {os.path.join(path, inside[0])}?" if inside else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint{hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {load_failure(err)}") from None
    if isinstance(ckpt, dict) and not isinstance(ckpt.get("model"), dict):
        ckpt = {"model": ckpt}  # a bare state dict
    if isinstance(ckpt, dict) and "config" in ckpt and not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{path} holds a config that is not a dict of settings ({type(ckpt['config']).__name__}):"
                              " edited or written by another program; load its weights with init_from=PATH")
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise CheckpointError(f"{path} is not a model checkpoint: expected a dict with a 'model' state dict, or a bare "
                              "state dict")
    return ckpt


def _strip_prefixes(key):
    # DDP(compile(model)) and compile(DDP(model)) nest the two prefixes in either order
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def _layout_hint(model, missing, unexpected):
    """Why a checkpoint's tensor names differ from the model's."""
    if not unexpected and all(k.startswith(tuple(f"{m}." for m in model.AUX_MODULES)) for k in missing):
        return f"it holds no auxiliary heads ({', '.join(model.AUX_MODULES)}): it was trained with aux_heads=false"
    switches = [k for k in model.arch if k not in ("arch", "num_classes", "aux_heads")]  # BiSeNetV2 has none
    if switches:
        return f"it was probably trained with different ablation switches ({', '.join(switches)})"
    return "its tensor names are not BiSeNetV2's (bisenetv2.py keeps those of CoinCheung/BiSeNet)"


def _config_hint(model, ckpt_config, shapes=True):
    ckpt_config = _trained_config(ckpt_config)
    differ = [
        f"{k}={ckpt_config[k]!r} (model {model.arch[k]!r})"
        for k in MODEL_KEYS
        if k in ckpt_config and k in model.arch and ckpt_config[k] != model.arch[k] and (shapes or k != "num_classes")
        and not (k == "aux_heads" and not model.arch[k])  # built without them on purpose: their weights are skipped
    ]
    return ". The checkpoint's config differs in: " + ", ".join(differ) if differ else ""


def load_training_state(path):
    ckpt = read_checkpoint(path)
    missing = [k for k in ("optimizer", "scaler", "iteration", "config", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (no {', '.join(missing)}); "
                              "resume takes a run's last.pth, not the final weights")
    return ckpt


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
    """Load a training checkpoint into model, optimizer and scaler; returns (its iteration, the best validation so far).
    The optimizer keeps the current config's settings (overrides on resume apply). A disabled scaler saves {}: an fp16
    run then starts a fresh scaler (and a scaler disabled now ignores a saved state)."""
    ckpt = load_checkpoint(raw_model, ckpt_path, ckpt)
    load_optimizer_state(optimizer, ckpt["optimizer"])
    if ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], device)
    return ckpt["iteration"], ckpt.get("best", NO_BEST)


def make_run_dir(cfg):
    """Create and return runs/NAME, or the resumed checkpoint's folder; a used folder is never overwritten (NAME-1,
    -2...). A folder holding only config.json is a run that failed at start: it is used again."""
    run_dir = base = os.path.join(cfg.out_dir, cfg.run_name)
    n = 0
    while not cfg.resume and os.path.isdir(run_dir) and os.listdir(run_dir) not in ([], ["config.json"]):
        n += 1
        run_dir = f"{base}-{n}"
    run_dir = os.path.dirname(os.path.abspath(cfg.resume)) if cfg.resume else run_dir
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"cannot create the run directory {run_dir}: {err.strerror or err}") from None
    return run_dir


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


def prepare_run_dir(run_dir, cfg, start):
    """The run folder as a run starts it: a killed run's temp files removed, the config written, the log trimmed."""
    stale = [os.path.join(run_dir, n) for n in sorted(os.listdir(run_dir)) if TEMP_FILE.fullmatch(n)]
    for path in stale:  # kill -9 or a power loss while writing: nothing else removes them
        os.remove(path)
        print(f"removed {path}, left by a run killed while writing it")
    write_atomically(os.path.join(run_dir, "config.json"), lambda f: f.write(format_config(cfg).encode()))
    if start:
        trim_log(os.path.join(run_dir, "log.jsonl"), start)
