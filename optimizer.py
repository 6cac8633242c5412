"""SGD with per-group learning-rate multipliers, and the warmup + poly learning-rate schedule.

Parameters fall in four groups: the backbone-side ("base") and the head-side ("head", lr x head_lr_mult)
parameters, each split into those with weight decay and those without (normalization layers and biases).
Each group carries "lr_mult", so the schedule sets one base lr and every group follows it.
"""

import torch
from torch import nn

# Layers whose affine parameters only rescale and shift: decaying them towards 0 fights the normalization.
# _NormBase covers BatchNorm1d/2d/3d, SyncBatchNorm and the InstanceNorms.
NO_DECAY_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _is_head(name, head_prefixes):
    # Whole dotted components: "head" must not claim "header.weight".
    return any(name == p or name.startswith(p + ".") for p in head_prefixes)


def _group_name(is_head, no_decay):
    return ("head" if is_head else "base") + ("_no_decay" if no_decay else "")


def param_groups(model, head_prefixes=(), weight_decay=5e-4, head_lr_mult=10.0):
    """Optimizer parameter groups: base / base_no_decay / head / head_no_decay; empty ones are dropped.

    A parameter is in a head group when its name starts with one of `head_prefixes` (module names,
    e.g. "ffm", "head"); it gets no weight decay when it belongs to a normalization layer or is a bias.
    Every trainable parameter is in exactly one group. Each group dict has "params", "weight_decay",
    "lr_mult" and "name". Call it on the raw model, not on a DistributedDataParallel wrapper
    (whose parameter names start with "module.").
    """
    groups = {}
    for is_head in (False, True):
        for no_decay in (False, True):
            name = _group_name(is_head, no_decay)
            groups[name] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_mult": head_lr_mult if is_head else 1.0,
                "name": name,
            }
    seen = set()  # a parameter shared by two modules must still be optimized once
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            no_decay = isinstance(module, NO_DECAY_MODULES) or param_name == "bias"
            groups[_group_name(_is_head(full_name, head_prefixes), no_decay)]["params"].append(param)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(model, cfg):
    """SGD over `param_groups`, the heads being the modules named in the model's HEAD_MODULES."""
    groups = param_groups(model, getattr(model, "HEAD_MODULES", ()), cfg.weight_decay, cfg.head_lr_mult)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_mult"]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def load_optimizer_state(optimizer, state):
    """Load a saved optimizer `state` (momentum buffers) but keep each group's settings (weight_decay, momentum,
    lr_mult) as `optimizer` was built, so that config changes made on resume take effect.

    torch's load_state_dict alone would bring back the saved settings, silently ignoring such overrides.
    """
    built = {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(built[group["name"]])


def lr_at(it, cfg):
    """The base learning rate at iteration `it` (0-based): a warmup ramp, then poly decay to 0.

    Warmup (it < warmup_iters) rises from lr * warmup_start to lr, geometrically ("exp") or linearly;
    then lr * (1 - (it - warmup_iters) / (max_iter - warmup_iters)) ** poly_power, which is lr at
    it = warmup_iters and 0 at it = max_iter. Reads lr, max_iter, warmup_iters, warmup, warmup_start
    and poly_power from `cfg`.
    """
    base, warmup_iters = cfg.lr, cfg.warmup_iters
    if it < warmup_iters:
        frac = it / warmup_iters
        if cfg.warmup == "exp":
            return base * cfg.warmup_start ** (1 - frac)
        return base * (cfg.warmup_start + (1 - cfg.warmup_start) * frac)  # "linear"
    # Clamped: past max_iter a negative base would make the fractional power complex.
    progress = min(1.0, (it - warmup_iters) / (cfg.max_iter - warmup_iters))
    return base * (1 - progress) ** cfg.poly_power


def set_lr(optimizer, lr):
    """Set every group's lr to `lr` times its "lr_mult" (1 where a group has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
