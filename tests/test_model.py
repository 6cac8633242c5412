"""BiSeNet, its ResNet18 backbone, ImageNet weight loading and checkpoint loading (CPU, small inputs)."""

import os
import urllib.error

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import precision
import resnet
from checkpoint import CheckpointError, load_checkpoint
from configs import PRESETS, get_config
from loss import build_loss
from model import BiSeNet, PretrainedError, build_model, count_parameters, load_pretrained

MODEL_PRESETS = ["cityscapes"] + [name for name in PRESETS if name.startswith("ablation_")]


def make_model(name="cityscapes", *overrides):
    torch.manual_seed(0)
    return build_model(get_config(name, ["pretrained=none", *overrides]))


@pytest.fixture(scope="module")
def default_model():
    return make_model()


# --- shapes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(97, 131), (257, 515), (64, 64)])
def test_output_shapes_train_and_eval(default_model, size):
    with torch.no_grad():
        default_model.train()
        outputs = default_model(torch.randn(2, 3, *size))  # BN after global pooling needs 2 images in training
        default_model.eval()
        logits = default_model(torch.randn(1, 3, *size))
    assert list(outputs) == ["out", "aux8", "aux16"]
    assert all(o.shape == (2, 19, *size) for o in outputs.values())
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 19, *size)


def test_bilinear_upsample_and_no_aux_heads_shapes():
    model = make_model("cityscapes", "upsample=bilinear", "aux_heads=false", "num_classes=7")
    with torch.no_grad():
        outputs = model.train()(torch.randn(2, 3, 67, 93))
        logits = model.eval()(torch.randn(1, 3, 67, 93))
    assert list(outputs) == ["out"] and outputs["out"].shape == (2, 7, 67, 93)
    assert logits.shape == (1, 7, 67, 93)


def test_backbone_feature_shapes():
    feats = resnet.ResNet18().eval()(torch.randn(1, 3, 97, 131))
    # each stride-2 stage rounds up: 97 -> 49 -> 25 -> 13 -> 7 -> 4; 131 -> 66 -> 33 -> 17 -> 9 -> 5
    assert [tuple(f.shape) for f in feats] == [(1, 128, 13, 17), (1, 256, 7, 9), (1, 512, 4, 5)]


# --- ablations ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_every_parameter_gets_a_gradient(name):
    model = make_model(name).train()
    outputs = model(torch.randn(2, 3, 67, 93))
    assert len(outputs) == 3 and all(o.shape == (2, 19, 67, 93) for o in outputs.values())
    labels = torch.randint(0, 19, (2, 67, 93))
    labels[:, :10] = 255  # ignored rows, as in real labels
    loss, parts = build_loss(get_config(name))(outputs, labels)  # the training loss: OHEM summed over the heads
    assert set(parts) == {"main", "aux8", "aux16"}
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{name}: parameters without gradient: {no_grad}"


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_switched_off_parts_have_no_parameters(name):
    cfg = get_config(name, ["pretrained=none"])
    names = [n for n, _ in make_model(name).named_parameters()]
    prefixes = {n.split(".")[0] for n in names}
    assert ("spatial" in prefixes) == (cfg.spatial_path == "conv")
    assert ("gp" in prefixes) == cfg.global_pool
    assert ("ffm" in prefixes) == (cfg.fusion == "ffm")
    assert {"backbone", "arm16", "arm32", "refine16", "refine8", "head", "aux8", "aux16"} <= prefixes
    assert any(n.startswith("arm16.att_conv.") for n in names) == cfg.arm


def test_new_layers_get_kaiming_init_and_the_backbone_keeps_its_own():
    torch.manual_seed(0)
    model = BiSeNet()
    torch.manual_seed(0)
    reference = resnet.ResNet18()  # the backbone is built first, from the same seed: its own init, untouched
    for a, b in zip(model.backbone.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    convs = [(n, m) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Conv2d) and not n.startswith("backbone")]
    assert len(convs) == 20  # spatial 4, ARMs 2 x 2, GP 1, refine 2, FFM 3, three heads 2 each
    for name, m in convs:
        fan_in = m.weight[0].numel()
        # kaiming_normal_(a=1): std = gain / sqrt(fan_in) with gain = sqrt(2 / (1 + a^2)) = 1, mean 0.
        # (PyTorch's default conv init has std 1 / sqrt(3 fan_in), 0.58x of that.)
        std, mean = m.weight.std().item(), m.weight.mean().item()
        assert abs(std * fan_in**0.5 - 1) < 0.1, f"{name}: std {std:.4g}, fan_in {fan_in}"
        assert abs(mean) < 5 * std / m.weight.numel() ** 0.5, f"{name}: mean {mean:.3g}"
        if m.bias is not None:
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name


def test_aux_heads_off_has_no_aux_parameters():
    names = [n for n, _ in make_model("cityscapes", "aux_heads=false").named_parameters()]
    assert not [n for n in names if n.startswith(("aux8.", "aux16."))]


# --- parameter count and FLOPs, against a hand computation --------------------------------------------------------


def conv(k, cin, cout, bias=False):
    return k * k * cin * cout + (cout if bias else 0)


def bn(c):
    return 2 * c  # weight and bias; running statistics are buffers


def conv_bn_relu(k, cin, cout):
    return conv(k, cin, cout) + bn(cout)


def basic_block(cin, cout, downsample):
    own = conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
    return own + (conv(1, cin, cout) + bn(cout) if downsample else 0)


def resnet18_trunk():
    stem = conv(7, 3, 64) + bn(64)
    layers = [basic_block(64, 64, False) + basic_block(64, 64, False)]
    for cin, cout in ((64, 128), (128, 256), (256, 512)):
        layers.append(basic_block(cin, cout, True) + basic_block(cout, cout, False))
    return stem + sum(layers)


def bisenet_by_hand(num_classes=19, aux=True):
    spatial = conv_bn_relu(7, 3, 64) + 2 * conv_bn_relu(3, 64, 64) + conv_bn_relu(1, 64, 128)
    arm16 = conv_bn_relu(3, 256, 128) + conv(1, 128, 128) + bn(128)
    arm32 = conv_bn_relu(3, 512, 128) + conv(1, 128, 128) + bn(128)
    gp = conv_bn_relu(1, 512, 128)
    refine = 2 * conv_bn_relu(3, 128, 128)
    ffm = conv_bn_relu(1, 256, 256) + conv(1, 256, 64) + conv(1, 64, 256)
    head = conv_bn_relu(3, 256, 256) + conv(1, 256, num_classes, bias=True)
    aux_heads = 2 * (conv_bn_relu(3, 128, 64) + conv(1, 64, num_classes, bias=True)) if aux else 0
    return resnet18_trunk() + spatial + arm16 + arm32 + gp + refine + ffm + head + aux_heads


def test_parameter_count_matches_hand_computation(default_model):
    assert resnet18_trunk() == 11_176_512
    assert count_parameters(default_model.backbone) == 11_176_512
    assert count_parameters(default_model) == bisenet_by_hand(aux=True)
    assert count_parameters(make_model("cityscapes", "aux_heads=false")) == bisenet_by_hand(aux=False)


def test_flops_match_recipe(default_model):
    # 236.7 GFLOPs at 1024x2048 (benchmarks/AVX2.md); every conv scales with the pixel count, so 1/16 of it at 256x512
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        default_model.eval()(torch.randn(1, 3, 256, 512))
    assert counter.get_total_flops() == pytest.approx(236.7e9 / 16, rel=0.02)


# --- ImageNet weights ---------------------------------------------------------------------------------------------


def random_torchvision_resnet18():
    torch.manual_seed(1)
    tv = torchvision.models.resnet18()
    # non-trivial BN statistics, so that loading the buffers is checked too
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return tv.eval()


def torchvision_features(tv, x):
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    feat8 = tv.layer2(tv.layer1(x))
    feat16 = tv.layer3(feat8)
    return feat8, feat16, tv.layer4(feat16)


def test_load_pretrained_matches_torchvision(tmp_path):
    tv = random_torchvision_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    backbone = resnet.ResNet18()
    assert set(tv.state_dict()) - set(backbone.state_dict()) == {"fc.weight", "fc.bias"}
    assert set(backbone.state_dict()) <= set(tv.state_dict())
    assert load_pretrained(backbone, str(path)) == str(path)
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        ours, theirs = backbone.eval()(x), torchvision_features(tv, x)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_load_pretrained_file_without_batch_counters(tmp_path):
    # older torchvision files have no num_batches_tracked buffers: they still load, with every weight
    tv = random_torchvision_resnet18()
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    backbone = resnet.ResNet18()
    load_pretrained(backbone, str(path))
    theirs = tv.state_dict()
    for key, value in backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, theirs[key]), key


def test_load_pretrained_rejects_unexpected_and_missing_keys(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    extra = tmp_path / "extra.pth"
    torch.save({**state, "layer5.0.conv1.weight": torch.zeros(1)}, extra)
    with pytest.raises(PretrainedError, match=r"(?s)extra\.pth.*unexpected keys: layer5\.0\.conv1\.weight"):
        load_pretrained(resnet.ResNet18(), str(extra))
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "layer3.1.bn2.weight"}, missing)
    with pytest.raises(PretrainedError, match=r"(?s)missing\.pth.*missing keys: layer3\.1\.bn2\.weight"):
        load_pretrained(resnet.ResNet18(), str(missing))


def test_load_pretrained_missing_path_is_named(tmp_path):
    path = str(tmp_path / "nowhere" / "resnet18.pth")
    with pytest.raises(PretrainedError, match="nowhere"):
        load_pretrained(resnet.ResNet18(), path)


def test_load_pretrained_none_keeps_init():
    backbone = resnet.ResNet18()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert load_pretrained(backbone, "none") is None
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def no_network(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


def test_torchvision_source_offline_error(tmp_path, monkeypatch):
    import torchvision.models._api

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)  # the weights API's
    with pytest.raises(PretrainedError) as info:
        load_pretrained(resnet.ResNet18(), "torchvision")
    message = str(info.value)
    assert os.path.join(str(tmp_path), "checkpoints", "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "pretrained=none" in message and "pretrained=/path/to/resnet18.pth" in message


def test_torchvision_source_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # the file is there: nothing is downloaded
    tv = random_torchvision_resnet18()
    (tmp_path / "checkpoints").mkdir()
    torch.save(tv.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    backbone = resnet.ResNet18()
    load_pretrained(backbone, "torchvision")
    assert torch.equal(backbone.layer4[1].bn2.running_var, tv.layer4[1].bn2.running_var)


# --- checkpoints --------------------------------------------------------------------------------------------------


def save_checkpoint(model, cfg, path):
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "iteration": 7}, path)
    return str(path)


def test_checkpoint_round_trip(tmp_path, default_model):
    path = save_checkpoint(default_model, get_config("cityscapes"), tmp_path / "ckpt.pth")
    torch.manual_seed(2)
    loaded = build_model(get_config("cityscapes", ["pretrained=none"]))  # a differently initialised model
    ckpt = load_checkpoint(loaded, path)
    assert ckpt["iteration"] == 7
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), default_model.eval()(x))


def test_checkpoint_with_ddp_and_compile_prefixes(tmp_path, default_model):
    path = tmp_path / "proc.pth"
    torch.save({"module._orig_mod." + k: v for k, v in default_model.state_dict().items()}, path)
    loaded = BiSeNet()
    ckpt = load_checkpoint(loaded, str(path))
    assert set(ckpt) == {"model"}
    assert torch.equal(loaded.head.cls.weight, default_model.head.cls.weight)


def test_checkpoint_aux_heads_skipped_for_model_without_them(tmp_path, default_model):
    path = save_checkpoint(default_model, get_config("cityscapes"), tmp_path / "ckpt.pth")
    export = BiSeNet(aux_heads=False)
    load_checkpoint(export, path)
    assert torch.equal(export.head.cls.weight, default_model.head.cls.weight)


def test_checkpoint_class_count_mismatch(tmp_path):
    cfg = get_config("cityscapes", ["pretrained=none", "num_classes=5"])
    path = save_checkpoint(build_model(cfg), cfg, tmp_path / "five.pth")
    with pytest.raises(CheckpointError, match="checkpoint has 5 classes, config has 19") as info:
        load_checkpoint(BiSeNet(), path)
    assert "five.pth" in str(info.value)


def test_checkpoint_ablation_mismatch_names_the_switch(tmp_path):
    cfg = get_config("ablation_no_arm", ["pretrained=none"])
    path = save_checkpoint(build_model(cfg), cfg, tmp_path / "no_arm.pth")
    with pytest.raises(CheckpointError, match=r"(?s)no_arm\.pth.*ablation switches.*arm=False \(model True\)"):
        load_checkpoint(BiSeNet(), path)


def test_checkpoint_missing_file(tmp_path):
    path = str(tmp_path / "runs" / "last.pth")
    with pytest.raises(CheckpointError, match="not found.*last.pth"):
        load_checkpoint(BiSeNet(), path)


def test_checkpoint_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*garbage.pth"):
        load_checkpoint(BiSeNet(), str(path))


def test_checkpoint_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="list.pth is not a model checkpoint"):
        load_checkpoint(BiSeNet(), str(path))


def test_native_bf16_on_gpus_means_compute_capability_8_or_newer(monkeypatch):

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # says yes on emulating GPUs too
    for capability, native in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):  # V100, T4, A100...
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert precision.native_bf16(gpu) is native, capability


def test_native_bf16_on_the_cpu_follows_the_instruction_set(monkeypatch):

    cpu = torch.device("cpu")
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert precision.native_bf16(cpu) is (avx512_bf16 or amx)
