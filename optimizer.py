"""SGD with per-group learning-rate multipliers, and the warmup + poly learning-rate schedule. Four groups: backbone
("base") and head ("head", lr x head_lr_mult) parameters, each with and without weight decay; each group carries
"lr_mult", so the schedule sets one base lr and every group follows it.
"""

import torch
from torch import nn

# Their affine parameters only rescale and shift: decaying them towards 0 fights the normalization. _NormBase covers
# BatchNorm1d/2d/3d, SyncBatchNorm and the InstanceNorms.
NO_DECAY_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model, head_prefixes=(), weight_decay=5e-4, head_lr_mult=10.0):
    """Non-empty groups base / base_no_decay / head / head_no_decay holding each trainable parameter once. Head: the
    name starts with one of `head_prefixes` as whole dotted components ("head" does not claim "header.weight"); no
    decay: norm weights and biases. Call it on the raw model: DDP's parameter names start with "module."."""
    groups = {part + suffix: {"params": [], "weight_decay": 0.0 if suffix else weight_decay,
                              "lr_mult": head_lr_mult if part == "head" else 1.0, "name": part + suffix}
              for part in ("base", "head") for suffix in ("", "_no_decay")}
    seen = set()  # a parameter shared by two modules must still be optimized once
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                name = f"{module_name}.{param_name}" if module_name else param_name
                head = any(name == p or name.startswith(p + ".") for p in head_prefixes)
                no_decay = isinstance(module, NO_DECAY_MODULES) or param_name == "bias"
                groups[("head" if head else "base") + ("_no_decay" if no_decay else "")]["params"].append(param)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(model, cfg):
    """SGD over `param_groups`, the heads being the modules named in the model's HEAD_MODULES."""
    groups = param_groups(model, getattr(model, "HEAD_MODULES", ()), cfg.weight_decay, cfg.head_lr_mult)
    return torch.optim.SGD([dict(g, lr=cfg.lr * g["lr_mult"]) for g in groups], lr=cfg.lr, momentum=cfg.momentum)


def load_optimizer_state(optimizer, state):
    """Load saved momentum buffers but keep each group's settings as built: torch's load_state_dict alone would bring
    back the saved ones, silently ignoring config changes made on resume."""
    built = {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(built[group["name"]])


def lr_at(it, cfg):
    """The base learning rate at iteration `it` (0-based): a warmup (it < warmup_iters) from lr * warmup_start to lr,
    geometric ("exp") or linear; then lr * (1 - (it - warmup_iters) / (max_iter - warmup_iters)) ** poly_power, which
    is lr at it = warmup_iters and 0 at it = max_iter."""
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
