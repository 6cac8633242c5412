"""Files written safely, and checkpoints read into a model: the one place for both.

write_atomically is how every file the project writes reaches the disk (a crash leaves the old file or the new one);
load_checkpoint / load_fitting put a checkpoint's weights into a built BiSeNet or BiSeNetV2, and load_for_inference
turns a checkpoint path (plus --config and overrides) into (model, cfg) for evaluate.py, demo.py and export.py.
"""

import dataclasses
import io
import os
import sys

import torch

from configs import CITYSCAPES_MEAN, CITYSCAPES_STD, IMAGENET_MEAN, IMAGENET_STD, MODEL_KEYS, get_config
from model import build_model, load_failure, state_dict_problems

# Settings a model was trained with that no weight records: a checkpoint loads whatever their value, and its
# predictions change with them (upsample is the one architecture switch that shapes no parameter).
UNRECORDED_KEYS = ("upsample", "mean", "std")
# A tensor name only one architecture has: what a bare state dict (no config) was trained as
ARCH_MARKS = {"bisenetv1": "backbone.", "bisenetv2": "detail."}
ARCH_NAMES = {"bisenetv1": "BiSeNetV1", "bisenetv2": "BiSeNetV2"}


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model it is loaded into."""


def write_atomically(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it to `path`: a crash at any moment leaves the
    old file or the new one, never a half-written one. The fsyncs make that hold across a power loss as well."""
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
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(path):
    """Make a rename in folder `path` durable. Windows cannot open a folder (no O_DIRECTORY) and needs none."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
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
    """Load a checkpoint's weights into a built BiSeNet or BiSeNetV2: the one place that does it.

    Accepts our checkpoints (a dict with "model", optionally "config") or a bare state dict (such as the BiSeNetV2
    weights CoinCheung/BiSeNet released), with DDP `module.` and torch.compile `_orig_mod.` prefixes stripped. Aux-head
    weights are skipped for a model built without aux heads.
    `ckpt`: the file's contents where read_checkpoint(path) has read them already. Returns the checkpoint dict (a bare
    state dict comes back as {"model": state}). Raises CheckpointError.
    """
    ckpt, state = _read_state(model, path, ckpt)
    _raise_mismatches(model, state, path, ckpt)
    model.load_state_dict(state)
    return ckpt


def load_for_inference(path, config=None, overrides=()):
    """(eval-mode model on the CPU, cfg) of the checkpoint at `path`, which is read once: what evaluate.py, demo.py
    and export.py run.

    cfg is preset `config` if given, else the config stored in the checkpoint, with the `overrides` (key=value; mode=X
    stands for eval_mode=X) on top. The model is built without aux heads: prediction runs the main head only. Warns
    (stderr) where cfg differs from the checkpoint's config in a setting no weight records (UNRECORDED_KEYS).
    """
    ckpt = read_checkpoint(path)
    cfg = inference_config(ckpt.get("config"), config, overrides)
    model = build_model(dataclasses.replace(cfg, aux_heads=False), pretrained=False)
    load_checkpoint(model, path, ckpt)
    return model.eval(), cfg


def inference_config(ckpt_config, config=None, overrides=()):
    """The config of load_for_inference; ckpt_config: the checkpoint's stored config dict (None for a bare state
    dict)."""
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
        print(f"note: a bare state dict records no normalization: scored with mean={_numbers(cfg.mean)} "
              f"std={_numbers(cfg.std)} ({_normalization_name(cfg)}, from --config {config or 'cityscapes'}); "
              "override mean= and std= if it was trained with others", file=sys.stderr)
    return cfg


def _numbers(values):
    return ",".join(f"{v:g}" for v in values)


def _normalization_name(cfg):
    """Whose statistics cfg.mean / cfg.std are, for the bare state dict's note."""
    known = {(IMAGENET_MEAN, IMAGENET_STD): "ImageNet's", (CITYSCAPES_MEAN, CITYSCAPES_STD): "CoinCheung's Cityscapes"}
    return known.get((tuple(cfg.mean), tuple(cfg.std)), "set in the config")


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def load_fitting(model, path):
    """Fine-tuning (init_from): load every tensor of checkpoint `path` whose shape fits `model`; the others (the
    classifiers of a model trained on other classes) keep their fresh initialization.

    A checkpoint of another architecture (missing or unexpected tensors: other ablation switches) is still a
    CheckpointError. Returns (loaded names, [(name, checkpoint shape, model shape)] of the tensors left new).
    """
    ckpt, state = _read_state(model, path)
    _raise_mismatches(model, state, path, ckpt, shapes=False)
    expected = model.state_dict()
    fitting = {k: v for k, v in state.items() if v.shape == expected[k].shape}
    skipped = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if k not in fitting]
    model.load_state_dict(fitting, strict=False)
    return sorted(fitting), skipped


def _read_state(model, path, ckpt=None):
    """(checkpoint, its state dict with wrapper prefixes stripped and, for a model without aux heads, theirs left
    out)."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    state = {_strip_prefixes(k): v for k, v in ckpt["model"].items()}
    if not model.arch["aux_heads"]:
        state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{m}." for m in model.AUX_MODULES))}
    return ckpt, state


def _raise_mismatches(model, state, path, ckpt, shapes=True):
    trained, built = checkpoint_arch(state, ckpt.get("config")), model.arch["arch"]
    if trained not in (None, built):
        fix = f"arch={trained}" + (" pretrained=none (the _v2 presets set both)" if trained == "bisenetv2" else "")
        raise CheckpointError(f"checkpoint {path} does not fit this model: it looks like a {ARCH_NAMES[trained]} "
                              f"checkpoint and the model is a {ARCH_NAMES[built]} (arch={built}): set {fix}")
    problems = _mismatches(model, state, path, shapes)
    if problems:
        hint = _config_hint(model, ckpt.get("config"), shapes)
        raise CheckpointError(f"checkpoint {path} does not fit this model: " + "; ".join(problems) + hint)


def checkpoint_arch(state, config=None):
    """The architecture (a cfg.arch value) whose weights `state` holds: told by its tensor names, else by its `config`
    (one from before configs had `arch` is BiSeNetV1); None if neither tells."""
    for arch, mark in ARCH_MARKS.items():
        if any(k.startswith(mark) for k in state):
            return arch
    return _trained_config(config).get("arch")


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
        raise CheckpointError(
            f"{path} is not a model checkpoint: expected a dict with a 'model' state dict, or a bare state dict"
        )
    return ckpt


def _strip_prefixes(key):
    # DDP(compile(model)) and compile(DDP(model)) nest the two prefixes in either order
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def _mismatches(model, state, path, shapes=True):
    """What keeps `state` from loading into `model`; with shapes=False (fine-tuning) only missing and unexpected
    tensors count."""
    expected = model.state_dict()
    problems = []
    cls = state.get(f"{model.CLASSIFIER}.weight")
    if shapes and cls is not None and cls.shape[0] != model.arch["num_classes"]:
        problems.append(f"checkpoint has {cls.shape[0]} classes, config has {model.arch['num_classes']} (num_classes); "
                        "to fine-tune it on other classes use init_from=PATH")
    problems += state_dict_problems(expected, state, shapes)
    if set(expected) != set(state):
        problems.append(_layout_hint(model, set(expected) - set(state), set(state) - set(expected)))
    return problems


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
    if not differ:
        return ""
    return ". The checkpoint's config differs in: " + ", ".join(differ)
