"""Parameter groups, SGD setup and the warmup + poly schedule, against hand-written expectations."""

import pytest
import torch
from torch import nn

from configs import PRESETS, Config, get_config
from model import build_model
from optimizer import build_optimizer, load_optimizer_state, lr_at, param_groups, set_lr


class ToyBiSeNet(nn.Module):
    """The module names BiSeNet's optimizer setup depends on, with every kind of layer it must sort."""

    HEAD_MODULES = ("ffm", "head", "aux8")

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.sp = nn.Sequential(nn.Conv2d(4, 4, 1, bias=True), nn.LayerNorm(4))
        self.header = nn.Conv2d(4, 4, 1)  # a name that starts with "head" but is not the head module
        self.ffm = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.SyncBatchNorm(4))
        self.head = nn.Sequential(nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4))
        self.aux8 = nn.Conv2d(4, 2, 1)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


EXPECTED = {
    "base": {"conv1.weight", "sp.0.weight", "header.weight"},
    "base_no_decay": {"bn1.weight", "bn1.bias", "sp.0.bias", "sp.1.weight", "sp.1.bias", "header.bias"},
    "head": {"ffm.0.weight", "head.0.weight", "aux8.weight"},
    "head_no_decay": {"ffm.1.weight", "ffm.1.bias", "head.0.bias", "head.1.weight", "head.1.bias", "aux8.bias"},
}


def group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}


def test_param_groups_sort_every_trainable_parameter_once():
    model = ToyBiSeNet()
    groups = param_groups(model, ToyBiSeNet.HEAD_MODULES, weight_decay=5e-4, head_lr_mult=10.0)
    by_name = group_names(model, groups)
    assert {k: set(v) for k, v in by_name.items()} == EXPECTED
    listed = [n for names in by_name.values() for n in names]
    assert len(listed) == len(set(listed))  # nothing twice
    assert set(listed) == {n for n, p in model.named_parameters() if p.requires_grad}
    settings = {g["name"]: (g["lr_mult"], g["weight_decay"]) for g in groups}
    assert settings == {
        "base": (1.0, 5e-4),
        "base_no_decay": (1.0, 0.0),
        "head": (10.0, 5e-4),
        "head_no_decay": (10.0, 0.0),
    }


def test_param_groups_drop_empty_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False))
    groups = param_groups(model, ("head",), weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["base"]


def test_shared_parameter_is_optimized_once():
    model = ToyBiSeNet()
    model.aux8.weight = model.conv1.weight  # same tensor under two names
    groups = param_groups(model, ToyBiSeNet.HEAD_MODULES)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})


def test_build_optimizer_and_set_lr():
    cfg = Config(lr=0.02, momentum=0.8, weight_decay=1e-3, head_lr_mult=10.0)
    opt = build_optimizer(ToyBiSeNet(), cfg)
    assert isinstance(opt, torch.optim.SGD)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"base": 0.02, "base_no_decay": 0.02, "head": 0.2, "head_no_decay": 0.2})
    assert all(g["momentum"] == 0.8 for g in opt.param_groups)
    set_lr(opt, 0.003)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"base": 0.003, "base_no_decay": 0.003, "head": 0.03, "head_no_decay": 0.03})


def test_weight_decay_applies_only_where_it_should():
    # With zero gradients a first SGD step moves a parameter by -lr * weight_decay * p, or not at all.
    cfg = Config(lr=0.1, momentum=0.9, weight_decay=0.01, head_lr_mult=10.0)
    model = ToyBiSeNet()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    opt = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    values = {n: p.flatten()[0].item() for n, p in model.named_parameters()}
    assert values["conv1.weight"] == pytest.approx(1 - 0.1 * 0.01)
    assert values["aux8.weight"] == pytest.approx(1 - 0.1 * 10 * 0.01)
    for name in EXPECTED["base_no_decay"] | EXPECTED["head_no_decay"]:
        assert values[name] == 1.0, name


def schedule(warmup):
    return Config(lr=0.01, max_iter=1000, warmup_iters=100, warmup=warmup, warmup_start=0.1, poly_power=0.9)


def test_lr_exp_warmup_then_poly():
    cfg = schedule("exp")
    assert lr_at(0, cfg) == pytest.approx(0.01 * 0.1)  # 0.001
    assert lr_at(50, cfg) == pytest.approx(0.01 * 0.1**0.5)  # halfway in log space: 0.0031623
    assert lr_at(100, cfg) == pytest.approx(0.01)
    assert lr_at(550, cfg) == pytest.approx(0.01 * (1 - 450 / 900) ** 0.9)  # 0.0053589
    assert lr_at(999, cfg) == pytest.approx(0.01 * (1 / 900) ** 0.9)  # 2.1883e-5
    assert lr_at(1000, cfg) == 0.0


def test_lr_linear_warmup_then_poly():
    cfg = schedule("linear")
    assert lr_at(0, cfg) == pytest.approx(0.001)
    assert lr_at(50, cfg) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))  # 0.0055
    assert lr_at(99, cfg) == pytest.approx(0.01 * (0.1 + 0.9 * 0.99))  # 0.00991
    assert lr_at(100, cfg) == pytest.approx(0.01)
    assert lr_at(550, cfg) == pytest.approx(0.01 * 0.5**0.9)
    assert lr_at(1000, cfg) == 0.0


def test_lr_without_warmup_and_past_the_end():
    cfg = Config(lr=0.01, max_iter=200, warmup_iters=0, poly_power=0.9)
    assert lr_at(0, cfg) == pytest.approx(0.01)
    assert lr_at(100, cfg) == pytest.approx(0.01 * 0.5**0.9)
    assert lr_at(250, cfg) == 0.0  # clamped, not a complex number


def test_lr_rises_then_falls():
    cfg = schedule("exp")
    lrs = [lr_at(it, cfg) for it in range(1001)]
    assert all(a < b for a, b in zip(lrs[:100], lrs[1:101], strict=True))
    assert all(a > b for a, b in zip(lrs[100:1000], lrs[101:1001], strict=True))


def test_loading_a_saved_state_keeps_the_configured_settings():
    # A resume with weight_decay / momentum / head_lr_mult overrides: the momentum buffers come from the saved state,
    # the settings from the config (torch's load_state_dict alone would restore the saved ones).
    saved_cfg = Config(lr=0.1, momentum=0.9, weight_decay=0.01, head_lr_mult=10.0)
    model = ToyBiSeNet()
    opt = build_optimizer(model, saved_cfg)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    buffers = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters() if p.requires_grad}

    resumed = build_optimizer(model, Config(lr=0.1, momentum=0.5, weight_decay=0.002, head_lr_mult=4.0))
    load_optimizer_state(resumed, state)
    settings = {g["name"]: (g["lr_mult"], g["weight_decay"], g["momentum"]) for g in resumed.param_groups}
    assert settings == {
        "base": (1.0, 0.002, 0.5),
        "base_no_decay": (1.0, 0.0, 0.5),
        "head": (4.0, 0.002, 0.5),
        "head_no_decay": (4.0, 0.0, 0.5),
    }
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(resumed.state[p]["momentum_buffer"], buffers[name]), name


def module_params(module):
    return {id(p) for p in module.parameters()} if module is not None else set()


# BiSeNet's fusion module and heads; BiSeNetV2's head and boosters
HEADS = {"bisenetv1": ("ffm", "head", "aux8", "aux16"), "bisenetv2": ("head", "aux2", "aux3", "aux4", "aux5_4")}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_param_groups_of_the_real_model(preset):
    cfg = get_config(preset)
    model = build_model(cfg, pretrained=False)
    groups = {g["name"]: [id(p) for p in g["params"]] for g in build_optimizer(model, cfg).param_groups}
    listed = [i for ids in groups.values() for i in ids]
    assert len(listed) == len(set(listed)) and set(listed) == {id(p) for p in model.parameters()}
    # The head modules of this architecture (ffm is absent with fusion=sum, the aux heads with aux_heads=false).
    heads = set().union(*(module_params(getattr(model, name)) for name in HEADS[cfg.arch]))
    assert set(groups["head"] + groups["head_no_decay"]) == heads
    assert cfg.arch == "bisenetv2" or (model.ffm is None) == (cfg.fusion == "sum")
    # No decay: every BatchNorm parameter and every bias; decay: every conv weight.
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    no_decay |= {id(p) for n, p in model.named_parameters() if n.endswith(".bias")}
    assert set(groups["base_no_decay"] + groups["head_no_decay"]) == no_decay
    convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert set(groups["base"] + groups["head"]) == convs
