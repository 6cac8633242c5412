"""BiSeNetV2: its layout against the paper's Table 1 and CoinCheung/BiSeNet's names and parameter counts, folding and
ONNX export, checkpoints of either architecture, its config rules, loss, optimizer groups and a short training run
(CPU, small inputs)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import randomize_batchnorm
from torch.utils.flop_counter import FlopCounterMode

import model as model_module
import train
from bisenetv2 import BiSeNetV2, UpsampleConvBNReLU
from checkpoint import CheckpointError, load_checkpoint, load_for_inference
from configs import CHOICES, MODEL_KEYS, ConfigError, get_config
from loss import build_loss
from model import build_model, count_gflops, fold_batchnorm, inference_model
from optimizer import build_optimizer

BOOSTERS = ("aux2", "aux3", "aux4", "aux5_4")

# The paper's Table 1 (stages of the detail and semantic branches) and Fig. 3 (the BGA output): module, output
# channels, output stride.
TABLE_1 = (
    ("detail.S1", 64, 2),
    ("detail.S2", 64, 4),
    ("detail.S3", 128, 8),
    ("segment.S1S2", 16, 4),  # the stem block
    ("segment.S3", 32, 8),
    ("segment.S4", 64, 16),
    ("segment.S5_4", 128, 32),  # S5's GE layers
    ("segment.S5_5", 128, 32),  # the CE block
    ("bga", 128, 8),
)


def make_v2(aux_heads=True, num_classes=19, seed=0):
    torch.manual_seed(seed)
    return BiSeNetV2(num_classes=num_classes, aux_heads=aux_heads)


def count_batchnorms(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.fixture(scope="module")
def v2():
    return make_v2()


# --- layout: the paper's strides and widths, CoinCheung's names and parameter counts ------------------------------


@pytest.mark.parametrize("size", [(64, 96), (70, 100)])
def test_every_stage_has_the_channels_and_stride_of_table_1(v2, size):
    outputs = {}

    def record(name):
        def hook(module, inputs, output):
            outputs[name] = output.shape
        return hook

    hooks = [v2.get_submodule(name).register_forward_hook(record(name)) for name, _, _ in TABLE_1]
    with torch.no_grad():
        v2.eval()(torch.randn(1, 3, *size))
    for hook in hooks:
        hook.remove()
    for name, channels, stride in TABLE_1:
        # every stride-2 step (3x3 conv or pool, padding 1) rounds up, so a stage at stride s has ceil(H / s) rows
        assert tuple(outputs[name]) == (1, channels, math.ceil(size[0] / stride), math.ceil(size[1] / stride)), name


def test_parameter_counts_are_those_of_the_released_model():
    # counted from CoinCheung/BiSeNet's model_final_v2_city.pth (19 classes), boosters included or left out
    assert sum(p.numel() for p in make_v2(aux_heads=False).parameters()) == 3_358_627
    assert sum(p.numel() for p in make_v2(aux_heads=True).parameters()) == 5_231_487


def bn_keys(prefix, channels):
    return {f"{prefix}.{k}": (channels,) for k in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


# Written out from the paper's layout in CoinCheung's names: a stride-2 GE layer 16 -> 32 (expansion 6: 96), BGA's
# detail-downsampling path and the 1/32 booster (128 -> 128, then x2 and 32 * 32 channels, 19 classes).
EXPECTED_KEYS = {
    "segment.S3.0": {
        "conv1.conv.weight": (16, 16, 3, 3), **bn_keys("conv1.bn", 16),
        "dwconv1.0.weight": (96, 1, 3, 3), **bn_keys("dwconv1.1", 96),
        "dwconv2.0.weight": (96, 1, 3, 3), **bn_keys("dwconv2.1", 96),
        "conv2.0.weight": (32, 96, 1, 1), **bn_keys("conv2.1", 32),
        "shortcut.0.weight": (16, 1, 3, 3), **bn_keys("shortcut.1", 16),
        "shortcut.2.weight": (32, 16, 1, 1), **bn_keys("shortcut.3", 32),
    },
    "bga.left2": {"0.weight": (128, 128, 3, 3), **bn_keys("1", 128)},
    "segment.S5_5": {
        **bn_keys("bn", 128),
        "conv_gap.conv.weight": (128, 128, 1, 1), **bn_keys("conv_gap.bn", 128),
        "conv_last.conv.weight": (128, 128, 3, 3), **bn_keys("conv_last.bn", 128),
    },
    "aux5_4": {
        "conv.conv.weight": (128, 128, 3, 3), **bn_keys("conv.bn", 128),
        "conv_out.0.1.conv.weight": (1024, 128, 3, 3), **bn_keys("conv_out.0.1.bn", 1024),
        "conv_out.1.weight": (19, 1024, 1, 1), "conv_out.1.bias": (19,),
    },
    "head": {
        "conv.conv.weight": (1024, 128, 3, 3), **bn_keys("conv.bn", 1024),
        "conv_out.1.weight": (19, 1024, 1, 1), "conv_out.1.bias": (19,),
    },
}


@pytest.mark.parametrize("prefix", list(EXPECTED_KEYS))
def test_state_dict_names_and_shapes_are_coincheungs(v2, prefix):
    state = {k[len(prefix) + 1:]: tuple(v.shape) for k, v in v2.state_dict().items() if k.startswith(prefix + ".")}
    assert state == EXPECTED_KEYS[prefix]


def test_top_level_modules_and_no_boosters_without_aux_heads():
    assert {n.split(".")[0] for n, _ in make_v2().named_parameters()} == {"detail", "segment", "bga", "head",
                                                                          *BOOSTERS}
    assert {n.split(".")[0] for n, _ in make_v2(aux_heads=False).named_parameters()} == {"detail", "segment", "bga",
                                                                                       "head"}


def test_init_is_kaiming_fan_out_and_each_ge_layers_last_bn_starts_at_zero(v2):
    for name, m in v2.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() > 5000:  # enough weights for a std to be meaningful
            # torch's fan_out, as kaiming_normal_ counts it: out_channels x kernel area, not divided by groups
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            assert abs(m.weight.std().item() * math.sqrt(fan_out / 2) - 1) < 0.1, name  # std = sqrt(2 / fan_out)
        if isinstance(m, nn.BatchNorm2d):
            closes_a_ge_layer = name.startswith("segment.S") and name.endswith(".conv2.1")
            assert torch.all(m.weight == (0.0 if closes_a_ge_layer else 1.0)) and torch.all(m.bias == 0), name


@pytest.mark.parametrize("size", [(70, 100), (64, 96), (33, 47)])
def test_any_input_size_gives_logits_of_that_size(v2, size):
    with torch.no_grad():
        outputs = v2.train()(torch.randn(2, 3, *size))  # BN after the CE block's pooling needs 2 images in training
        logits = v2.eval()(torch.randn(1, 3, *size))
    assert list(outputs) == ["out", *BOOSTERS]
    assert all(o.shape == (2, 19, *size) for o in outputs.values())
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 19, *size)
    with torch.no_grad():
        assert make_v2(aux_heads=False, num_classes=4).train()(torch.randn(2, 3, *size))["out"].shape == (2, 4, *size)


def test_where_the_size_divides_upsampling_is_their_fixed_factors(v2):
    """Resizing to the target's size equals CoinCheung's nn.Upsample(scale_factor=...) where the factor is exact."""
    v2.eval()
    detail, semantic = torch.randn(1, 128, 8, 12), torch.randn(1, 128, 2, 3)
    bga = v2.bga
    up = nn.Upsample(scale_factor=4)  # nearest
    theirs = bga.conv(bga.left1(detail) * torch.sigmoid(up(bga.right1(semantic)))
                      + up(bga.left2(detail) * torch.sigmoid(bga.right2(semantic))))
    feat2 = torch.randn(1, 16, 16, 24)
    booster = v2.aux2.conv_out(v2.aux2.conv(feat2))
    with torch.no_grad():
        torch.testing.assert_close(bga(detail, semantic), theirs, rtol=0, atol=0)
        head = v2.head.conv_out(v2.head.conv(detail))
        torch.testing.assert_close(v2.head(detail, (64, 96)), F.interpolate(head, scale_factor=8, mode="bilinear"))
        # a booster: x2 inside, then the stride / 2 that is left (4 / 2 for the stem's 1/4 feature)
        torch.testing.assert_close(v2.aux2(feat2, (64, 96)), F.interpolate(booster, scale_factor=2, mode="bilinear"))


@pytest.mark.parametrize("size", [(5, 7), (1, 1), (8, 10)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cout", [5, 12, 13])  # forward: the transposed conv up to twice the input's channels
@pytest.mark.parametrize("path", ["forward", "transposed"])
def test_a_boosters_expansion_is_nearest_x2_then_its_convbnrelu(size, channels_last, cout, path):
    """The output and the gradients are those of the two children run one after the other."""
    torch.manual_seed(0)
    expand = UpsampleConvBNReLU(6, cout).double().train()
    randomize_batchnorm(expand)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 6, *size, dtype=torch.float64).contiguous(memory_format=memory_format)
    ours_in, theirs_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = getattr(expand, path)(ours_in)
    ours_grads = torch.autograd.grad(ours.square().sum(), [ours_in, expand[1].conv.weight, expand[1].bn.weight])
    block = expand[1]
    theirs = block.relu(block.bn(block.conv(F.interpolate(theirs_in, scale_factor=2, mode="nearest"))))
    theirs_grads = torch.autograd.grad(theirs.square().sum(), [theirs_in, block.conv.weight, block.bn.weight])
    assert ours.shape == (3, cout, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_boosters_transposed_conv_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    expand = UpsampleConvBNReLU(16, 8).eval()
    randomize_batchnorm(expand)
    x = torch.randn(2, 16, 6, 7)
    with torch.no_grad():
        reference = expand[1](expand[0](x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = expand.transposed(x)
    assert ours.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: the error of a 144-term sum of rounded products, relative to its scale
    assert (ours.float() - reference).abs().max() < 0.03 * reference.abs().max()


# --- folding and export -------------------------------------------------------------------------------------------


def test_folded_v2_matches_eager_and_has_no_batchnorm_left():
    model = randomize_batchnorm(make_v2(aux_heads=False)).eval()
    folded = fold_batchnorm(model)
    assert count_batchnorms(model) > 0 and count_batchnorms(folded) == 0  # the CE block's pooled BN included
    image = torch.randn(1, 3, 67, 101, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(image)
        np.testing.assert_allclose(folded(image).numpy(), expected.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(inference_model(model.train())(image).numpy(), expected.numpy(), atol=1e-4, rtol=0)
    # a model trained under torchrun with sync_bn folds as well
    synced = fold_batchnorm(nn.SyncBatchNorm.convert_sync_batchnorm(model))
    assert count_batchnorms(synced) == 0
    with torch.no_grad():
        np.testing.assert_allclose(synced(image).numpy(), expected.numpy(), atol=1e-4, rtol=0)


def test_the_ce_blocks_pooled_batchnorm_folds_into_the_next_conv():
    # the formula written out: conv(BN(p)) = W (p * s + t) = (W * s) p + W t, with s = gamma / sqrt(var + eps) and
    # t = beta - mean * s, for the 1x1 conv on the 1x1 pooled feature (then conv_gap's own BN, folded as V1's are)
    block = randomize_batchnorm(make_v2(aux_heads=False)).segment.S5_5.eval()
    folded = fold_batchnorm(block)
    assert isinstance(folded.bn, nn.Identity) and isinstance(folded.conv_gap.bn, nn.Identity)
    pooled = torch.randn(2, 128, 1, 1)
    bn, conv = block.bn, block.conv_gap.conv
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    t = bn.bias - bn.running_mean * s
    with torch.no_grad():
        folded_pre_bn = F.conv2d(pooled, conv.weight * s[None, :, None, None], conv.weight[:, :, 0, 0] @ t)
        expected = block.conv_gap.bn(folded_pre_bn)
        torch.testing.assert_close(folded.conv_gap.conv(pooled), expected, atol=1e-5, rtol=0)
        x = torch.randn(2, 128, 3, 5)
        torch.testing.assert_close(folded(x), block(x), atol=1e-4, rtol=0)


def test_onnx_export_of_v2_matches_eager(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import export

    model = randomize_batchnorm(make_v2(aux_heads=False)).eval()
    path = export.export_onnx(fold_batchnorm(model), str(tmp_path / "v2.onnx"), sample_hw=(64, 96))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 67, 101), (2, 3, 80, 112)):  # other sizes than the traced one, not multiples of 32
        image = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        (logits,) = session.run(None, {"image": image.numpy()})
        with torch.no_grad():
            expected = model(image).numpy()  # the unfolded model: covers folding and export together
        assert logits.shape == expected.shape
        assert np.abs(logits - expected).max() < 1e-4
        assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.999


# --- checkpoints --------------------------------------------------------------------------------------------------


def random_state(model, seed=0):
    """The model's state dict names and shapes with random values (positive variances), as a released file holds."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        else:
            state[key] = torch.rand(value.shape, generator=generator) + (0.5 if key.endswith("running_var") else -0.5)
    return state


def test_a_bare_state_dict_with_boosters_loads_for_inference_with_cityscapes_v2(tmp_path):
    state = random_state(make_v2(aux_heads=True))
    assert {k.split(".")[0] for k in state} >= set(BOOSTERS)
    path = tmp_path / "model_final_v2_city.pth"
    torch.save(state, path)
    model, cfg = load_for_inference(str(path), "cityscapes_v2")
    assert isinstance(model, BiSeNetV2) and cfg.arch == "bisenetv2" and not model.training
    assert all(getattr(model, name) is None for name in BOOSTERS)  # dropped: prediction runs the main head only
    loaded = model.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith(tuple(n + "." for n in BOOSTERS))}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 70, 100)).shape == (1, 19, 70, 100)


def v1_model():
    torch.manual_seed(0)
    return build_model(get_config("synthetic"), pretrained=False)


@pytest.mark.parametrize("with_config", [True, False])
def test_a_v1_checkpoint_given_arch_bisenetv2_and_the_reverse_is_one_line_naming_the_key(tmp_path, with_config):
    v1, v2_cfg = v1_model(), get_config("cityscapes_v2")
    for source, source_cfg, target, wanted in ((v1, get_config("synthetic"), make_v2(), "arch=bisenetv1"),
                                               (make_v2(), v2_cfg, v1_model(), "arch=bisenetv2")):
        path = tmp_path / f"{type(source).__name__}.pth"
        torch.save({"model": source.state_dict(), **({"config": source_cfg.to_dict()} if with_config else {})}, path)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(target, str(path))
        message = str(info.value)
        assert "\n" not in message and str(path) in message and f"set {wanted}" in message, message
        assert "ablation switches" not in message


def test_a_v2_checkpoint_with_other_names_does_not_blame_ablation_switches(tmp_path):
    state = make_v2(aux_heads=False).state_dict()
    state["bga.extra.weight"] = torch.zeros(1)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="unexpected keys: bga.extra.weight.*not BiSeNetV2's") as info:
        load_checkpoint(make_v2(aux_heads=False), str(path))
    assert "ablation" not in str(info.value)


def test_a_v2_checkpoint_without_boosters_for_a_model_with_them_says_so(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(make_v2(aux_heads=False).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing keys: aux2\..*no auxiliary heads.*aux_heads=false"):
        load_checkpoint(make_v2(aux_heads=True), str(path))


def test_a_checkpoint_without_arch_in_its_config_loads_as_bisenetv1(tmp_path):
    cfg = get_config("synthetic", ["aux_heads=false"])
    config = cfg.to_dict()
    del config["arch"]  # written before the key existed
    path = tmp_path / "old.pth"
    torch.save({"model": build_model(cfg, pretrained=False).state_dict(), "config": config}, path)
    model, loaded_cfg = load_for_inference(str(path))
    assert loaded_cfg.arch == "bisenetv1" and type(model).__name__ == "BiSeNet"


def test_class_count_mismatch_is_named_for_v2(tmp_path):
    path = tmp_path / "five.pth"
    torch.save(make_v2(num_classes=5).state_dict(), path)
    with pytest.raises(CheckpointError, match="checkpoint has 5 classes, config has 19"):
        load_checkpoint(make_v2(), str(path))


# --- config -------------------------------------------------------------------------------------------------------


def test_arch_is_the_first_model_key_and_defaults_to_bisenetv1():
    assert MODEL_KEYS[0] == "arch" and CHOICES["arch"] == ("bisenetv1", "bisenetv2")
    assert get_config().arch == "bisenetv1" and get_config().to_dict()["arch"] == "bisenetv1"
    with pytest.raises(ConfigError, match="bad value for arch: 'bisenetv3'; expected one of bisenetv1, bisenetv2"):
        get_config("cityscapes", ["arch=bisenetv3"])


@pytest.mark.parametrize("overrides, named", [
    (["spatial_path=none"], "spatial_path=none is a BiSeNetV1 switch"),
    (["arm=false", "fusion=sum"], "arm=false, fusion=sum are BiSeNetV1 switches"),
    (["upsample=bilinear"], "upsample=bilinear is a BiSeNetV1 switch"),
    (["global_pool=false"], "global_pool=false is a BiSeNetV1 switch"),
])
def test_v1_switches_with_arch_bisenetv2_are_one_line_naming_them(overrides, named):
    with pytest.raises(ConfigError) as info:
        get_config("cityscapes_v2", overrides)
    assert str(info.value).startswith(named) and "\n" not in str(info.value)


@pytest.mark.parametrize("pretrained", ["torchvision", "/weights/resnet18.pth"])
def test_imagenet_resnet_weights_with_arch_bisenetv2_are_a_config_error(pretrained):
    with pytest.raises(ConfigError, match=r"bad value for pretrained: .*arch=bisenetv2.*set pretrained=none"):
        get_config("cityscapes_v2", [f"pretrained={pretrained}"])
    with pytest.raises(ConfigError, match="bad value for pretrained"):
        get_config("cityscapes", ["arch=bisenetv2", f"pretrained={pretrained}"])


def test_v2_presets():
    city = get_config("cityscapes_v2")
    assert (city.arch, city.pretrained, city.batch_size, city.crop_size, city.scales) == (
        "bisenetv2", "none", 16, (512, 1024), (0.25, 2.0))
    assert (city.lr, city.weight_decay, city.warmup_iters, city.max_iter) == (5e-3, 5e-4, 1000, 150000)
    assert (city.amp, city.sync_bn, city.eval_crop) == ("fp16", True, (1024, 1024))
    assert city.eval_scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    camvid, v1 = get_config("camvid_v2"), get_config("camvid")
    assert (camvid.arch, camvid.pretrained) == ("bisenetv2", "none")
    data_keys = ("dataset", "data_root", "image_dir", "label_dir", "num_classes", "class_names", "class_colors",
                 "void_values")
    assert all(getattr(camvid, k) == getattr(v1, k) for k in data_keys)
    assert isinstance(build_model(city), BiSeNetV2)


# --- loss, optimizer, training ------------------------------------------------------------------------------------


def test_the_loss_names_the_boosters_and_sums_the_five_outputs(v2):
    cfg = get_config("cityscapes_v2", ["aux_weight=0.4"])
    criterion = build_loss(cfg, None, v2.AUX_MODULES)
    assert criterion.formula() == "main+0.4*(aux2+aux3+aux4+aux5_4)"
    assert build_loss(get_config("cityscapes_v2"), None, v2.AUX_MODULES).formula() == "main+aux2+aux3+aux4+aux5_4"
    torch.manual_seed(0)
    outputs = {name: torch.randn(2, 19, 8, 12) for name in ("out", *BOOSTERS)}
    target = torch.randint(0, 19, (2, 8, 12))
    total, parts = criterion(outputs, target)
    each = [criterion.criterion(o, target).item() for o in outputs.values()]  # each output's OHEM loss on its own
    assert list(parts) == ["main", *BOOSTERS]
    assert [p.item() for p in parts.values()] == pytest.approx(each, rel=1e-6)
    assert total.item() == pytest.approx(each[0] + 0.4 * sum(each[1:]), rel=1e-6)


def test_the_head_groups_hold_exactly_the_heads_and_no_decay_exactly_bn_and_biases(v2):
    optimizer = build_optimizer(v2, get_config("cityscapes_v2"))
    groups = {g["name"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    heads = {id(p) for name in ("head", *BOOSTERS) for p in getattr(v2, name).parameters()}
    vectors = {id(p) for p in v2.parameters() if p.ndim == 1}  # BN weights and biases, the classifiers' biases
    assert groups["head"] | groups["head_no_decay"] == heads
    assert groups["base_no_decay"] | groups["head_no_decay"] == vectors
    assert sum(map(len, groups.values())) == len(list(v2.parameters()))
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == pytest.approx(10 * lrs["base"]) and lrs["head_no_decay"] == pytest.approx(10 * lrs["base"])


def test_a_short_v2_training_run_lowers_the_loss_and_evaluates(tiny_folder, tmp_path, capsys):
    from conftest import FOLDER_OVERRIDES

    args = ["--config", "camvid_v2", *FOLDER_OVERRIDES, f"data_root={tiny_folder}", f"out_dir={tmp_path}",
            "crop_size=24,32", "scales=1,1", "batch_size=2", "max_iter=16", "warmup_iters=1", "lr=0.01", "log_every=1",
            "ckpt_every=16", "workers=0", "eval_workers=0", "amp=none", "channels_last=false"]
    assert train.main(args) == 0
    assert "loss = main+aux2+aux3+aux4+aux5_4" in capsys.readouterr().out
    run_dir = tmp_path / "camvid_v2"
    with open(run_dir / "log.jsonl") as f:
        log = [r for r in map(json.loads, f) if "loss" in r]  # the training records
    assert [r["iter"] for r in log] == list(range(1, 17))
    for r in log:
        assert r["loss"] == pytest.approx(r["loss_main"] + sum(r[f"loss_{name}"] for name in BOOSTERS), rel=1e-5)
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    model, cfg = load_for_inference(str(run_dir / "model_final.pth"))
    assert isinstance(model, BiSeNetV2) and cfg.arch == "bisenetv2"
    with open(run_dir / "eval.json") as f:
        assert list(json.load(f)["iou"]) == ["road", "tree", "car"]


# --- python model.py ----------------------------------------------------------------------------------------------


def test_count_gflops_of_a_single_conv_is_the_formula():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_gflops(conv, (10, 12)) == pytest.approx(2 * 8 * 3 * 3 * 3 * 10 * 12 / 1e9)


@pytest.mark.parametrize("name", ["cityscapes_v2", "cityscapes"])
def test_model_py_prints_parameters_and_gflops(name, capsys):
    assert model_module.main(["--config", name, "crop_size=128,256"]) == 0
    out = capsys.readouterr().out
    cfg = get_config(name)
    without, with_aux = (sum(p.numel() for p in build_model(get_config(name, [f"aux_heads={a}"]), pretrained=False)
                             .parameters()) for a in ("false", "true"))
    assert f"parameters: {without:,} for prediction, {with_aux:,} in training" in out
    bare = build_model(get_config(name, ["aux_heads=false"]), pretrained=False).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        bare(torch.zeros(1, 3, 128, 256))
    assert f"128x256: {counter.get_total_flops() / 1e9:.1f} (the training crop)" in out
    assert "512x1024: " in out and "1024x2048: " in out and cfg.arch in out


def test_model_py_bad_config_is_one_line_and_exit_2(capsys):
    assert model_module.main(["--config", "cityscapes_v2", "arm=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: arm=false is a BiSeNetV1 switch") and err.count("\n") == 1


def test_coincheungs_weights_through_the_readme_command_are_scored_with_their_normalization(tmp_path, tiny_cityscapes,
                                                                                           capsys):
    """README: python evaluate.py --ckpt model_final_v2_city.pth --config cityscapes_v2 ... A bare state dict records
    no normalization: the preset's, CoinCheung's Cityscapes statistics (lib/data/cityscapes_cv2.py), score it, and
    one line says so."""
    import evaluate

    path = tmp_path / "model_final_v2_city.pth"
    torch.save(random_state(make_v2(aux_heads=True)), path)
    assert evaluate.main(["--ckpt", str(path), "--config", "cityscapes_v2", f"data_root={tiny_cityscapes}",
                          "eval_workers=0"]) == 0
    err = capsys.readouterr().err
    assert "note: a bare state dict records no normalization: scored with mean=0.3257,0.369,0.3223 " \
           "std=0.2112,0.2148,0.2115 (CoinCheung's Cityscapes, from --config cityscapes_v2)" in err
    with open(tmp_path / "eval_val_ss.json") as f:
        used = json.load(f)["config"]
    assert (tuple(used["mean"]), tuple(used["std"])) == ((0.3257, 0.3690, 0.3223), (0.2112, 0.2148, 0.2115))


def test_a_trained_checkpoint_keeps_the_normalization_it_was_trained_with(tmp_path):
    cfg = get_config("cityscapes_v2", ["mean=0.1,0.2,0.3", "std=0.4,0.5,0.6"])
    path = tmp_path / "model_final.pth"
    torch.save({"model": make_v2(aux_heads=False).state_dict(), "config": cfg.to_dict()}, path)
    _, loaded = load_for_inference(str(path))
    assert (loaded.mean, loaded.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


@pytest.mark.parametrize("device, cout, transposed", [("cpu", 12, True), ("cpu", 13, False), ("cuda", 12, False)])
def test_the_boosters_transposed_conv_is_a_cpu_choice(device, cout, transposed):
    """One place decides: on a CPU the transposed conv up to twice the input's channels (measured there); on CUDA the
    upsample-then-conv path of the reference, until a GPU measurement says otherwise."""
    expand = UpsampleConvBNReLU(6, cout)
    x = type("OnDevice", (), {"device": torch.device(device)})()  # the choice reads the input's device only
    assert expand.use_transposed(x) is transposed
