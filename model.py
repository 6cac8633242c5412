"""BiSeNet (ResNet18, arXiv 1808.00897) with the ablation switches of configs.py; the builder of it and of BiSeNetV2,
BatchNorm folding and the inference copy of either. `python model.py --config NAME` prints parameters and GFLOPs.

Layout: a spatial path at 1/8, a context path (ResNet18, ARM on the 1/16 and 1/32 features, global pooling), the FFM,
a main head and two auxiliary heads; a part switched off has no parameters (DDP needs no find_unused_parameters).
"""

import argparse
import copy
import dataclasses
import os
import sys

import torch
import torch.nn as nn
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from bisenetv2 import BiSeNetV2
from configs import ConfigError, add_config_args, get_config
from layers import ConvBNReLU, global_avg, resize
from precision import autocast_dtype
from resnet import ResNet18


class AttentionRefinement(nn.Module):
    """ARM: a 3x3 ConvBNReLU whose output is reweighted per channel by its own global context."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 3)
        self.att_conv = nn.Conv2d(cout, cout, 1, bias=False)
        self.att_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        feat = self.conv(x)
        return feat * torch.sigmoid(self.att_bn(self.att_conv(global_avg(feat))))


class FeatureFusion(nn.Module):
    """FFM: 1x1 ConvBNReLU on the concatenated features, then a squeeze-excite style residual reweighting."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 1)
        # The paper's two-layer attention (the CoinCheung "newest" variant uses one 1x1 conv + BN instead).
        self.att = nn.Sequential(nn.Conv2d(cout, cout // 4, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout // 4, cout, 1, bias=False), nn.Sigmoid())

    def forward(self, x):
        feat = self.conv(x)
        return feat * self.att(global_avg(feat)) + feat


class SegHead(nn.Module):
    def __init__(self, cin, mid, num_classes):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid, 3)
        self.cls = nn.Conv2d(mid, num_classes, 1)

    def forward(self, x, size):
        logits = self.cls(self.conv(x))
        return logits if size is None else resize(logits, size, "bilinear")


class BiSeNet(nn.Module):
    HEAD_MODULES = ("ffm", "head", "aux8", "aux16")  # parameters the optimizer gives cfg.head_lr_mult
    # the training-only auxiliary heads, by output name (a model built without them skips a checkpoint's)
    AUX_MODULES = ("aux8", "aux16")
    CLASSIFIER = "head.cls"  # the conv whose output channels are the classes

    def __init__(self, num_classes=19, spatial_path="conv", arm=True, global_pool=True, fusion="ffm",
                 upsample="nearest", aux_heads=True):
        super().__init__()
        # the switches that shape the parameter set (configs.MODEL_KEYS), to explain checkpoint mismatches
        self.arch = dict(arch="bisenetv1", num_classes=num_classes, spatial_path=spatial_path, arm=arm,
                         global_pool=global_pool, fusion=fusion, aux_heads=aux_heads)
        self.upsample = upsample
        self.backbone = ResNet18()
        # Three stride-2 convs give ceil(ceil(ceil(H/2)/2)/2) rows, the same as the ResNet's layer2 for any H.
        self.spatial = nn.Sequential(ConvBNReLU(3, 64, 7, 2), ConvBNReLU(64, 64, 3, 2), ConvBNReLU(64, 64, 3, 2),
                                     ConvBNReLU(64, 128, 1)) if spatial_path == "conv" else None
        # Without ARM a plain 3x3 ConvBNReLU keeps the reduction to 128 channels, so nothing else changes.
        refine = AttentionRefinement if arm else ConvBNReLU
        self.arm16 = refine(256, 128)
        self.arm32 = refine(512, 128)
        self.gp = ConvBNReLU(512, 128, 1) if global_pool else None
        self.refine16 = ConvBNReLU(128, 128, 3)
        self.refine8 = ConvBNReLU(128, 128, 3)
        spatial_channels = 0 if spatial_path == "none" else 128
        self.ffm = FeatureFusion(spatial_channels + 128, 256) if fusion == "ffm" else None
        # Sum fusion hands the head 128 channels; its mid width stays 256 so that only the fusion differs.
        self.head = SegHead(256 if fusion == "ffm" else 128, 256, num_classes)
        self.aux8 = SegHead(128, 64, num_classes) if aux_heads else None
        self.aux16 = SegHead(128, 64, num_classes) if aux_heads else None
        backbone = set(self.backbone.modules())  # it keeps its own init, usually replaced by ImageNet weights
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m not in backbone:
                nn.init.kaiming_normal_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x, resize_logits=True):
        """Training: {"out": main, "aux8": ..., "aux16": ...} logits at input size; evaluation: the main logits, with
        resize_logits=False at the head's 1/8 size (export.py's labels model upsamples its labels instead). In
        training mode BatchNorm after global pooling (ARM, GP) needs more than one image per batch."""
        size = x.shape[2:]
        feat8, feat16, feat32 = self.backbone(x)
        feat16_up, feat8_up = self._context(feat8, feat16, feat32)
        main = self.head(self._fuse(x, feat8, feat8_up), size if resize_logits or self.training else None)
        if not self.training:
            return main
        if self.aux8 is None:
            return {"out": main}
        return {"out": main, "aux8": self.aux8(feat8_up, size), "aux16": self.aux16(feat16_up, size)}

    def _context(self, feat8, feat16, feat32):
        """Context path: returns (feat16_up, feat8_up), 128 channels at the 1/16 and 1/8 feature sizes."""
        ctx32 = self.arm32(feat32)
        if self.gp is not None:
            ctx32 = ctx32 + self.gp(global_avg(feat32))  # 1x1 context broadcast over the 1/32 map
        feat16_up = self.refine16(resize(ctx32, feat16.shape[2:], self.upsample))
        feat8_up = self.refine8(resize(feat16_up + self.arm16(feat16), feat8.shape[2:], self.upsample))
        return feat16_up, feat8_up

    def _fuse(self, x, feat8, feat8_up):
        """The context fused with the 1/8 detail feature of the spatial path (conv: its own; backbone: feat8)."""
        spatial = self.spatial(x) if self.spatial is not None else None
        if self.arch["spatial_path"] == "backbone":
            spatial = feat8
        if self.ffm is not None:
            return self.ffm(feat8_up if spatial is None else torch.cat([spatial, feat8_up], 1))
        return feat8_up if spatial is None else spatial + feat8_up


ARCHITECTURES = {"bisenetv1": BiSeNet, "bisenetv2": BiSeNetV2}  # cfg.arch -> the model class


# ---- ImageNet weights of the ResNet18 trunk, and the report of a state dict that does not fit ----

class PretrainedError(RuntimeError):
    """The ImageNet weights the config asks for cannot be found or do not fit."""


def load_pretrained(backbone, source):
    """Load ImageNet weights from cfg.pretrained: "none" (from scratch on purpose), "torchvision" (IMAGENET1K_V1, in
    the torch hub cache) or a resnet18 state dict's path. Returns the file read; PretrainedError rather than none."""
    if source == "none":
        return None
    state, path = _torchvision_weights() if source == "torchvision" else (_read_state_dict(source), source)
    expected = backbone.state_dict()
    # the ImageNet classifier has no place in a segmentation backbone; BatchNorm's batch counter is absent from older
    # torchvision files and unused with a fixed momentum
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    state.update({k: v for k, v in expected.items() if k.endswith("num_batches_tracked") and k not in state})
    problems = state_dict_problems(expected, state)
    if problems:
        raise PretrainedError(f"{path} does not match torchvision's resnet18 layout: " + "; ".join(problems))
    backbone.load_state_dict(state)
    return path


def _torchvision_weights():
    """(state dict, file) of torchvision's ResNet18_Weights.IMAGENET1K_V1, hash checked, read weights-only."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True), path
    except Exception as err:  # offline, proxy, bad hash: whatever the cause, the fix is to fetch the file by hand
        raise PretrainedError(
            f"pretrained=torchvision: the ResNet18 ImageNet weights are not in the torch hub cache ({path}) and "
            f"downloading them failed ({type(err).__name__}: {err}). Download {weights.url} and put it at "
            f"{path}, or pass pretrained=/path/to/resnet18.pth. Use pretrained=none only to train from scratch on "
            "purpose (expect a much lower mIoU)."
        ) from None


def _read_state_dict(path):
    try:  # train.py has checked that the file exists (configs.check_weight_files)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedError(f"cannot read pretrained weights {path}: {load_failure(err)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{path} is not a resnet18 state dict: expected a dict of tensors named as torchvision's")
    return state


def load_failure(err):
    """Why torch.load(weights_only=True) refused a file, in one line (checkpoint.py's reading says it too). Torch's own
    message advises weights_only=False, which would run whatever code the file holds: that advice is never passed on."""
    if "weights only load failed" in str(err).lower():
        return ("it holds Python objects other than tensors and plain values (a pickle, which could run code when "
                "loaded): refused; expected a file written by torch.save of tensors")
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {first}; expected a file written by torch.save (it may be truncated)"


def state_dict_problems(expected, state, shapes=True, shown=5):
    """The "wrong shapes: ...", "missing keys: ..." and "unexpected keys: ..." lines of `state` against a module's
    state dict `expected` (the first `shown` names, then the count); for ImageNet weights and checkpoints alike."""
    wrong_shape = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                   for k, v in expected.items() if shapes and k in state and state[k].shape != v.shape]
    found = (("wrong shapes", wrong_shape), ("missing keys", sorted(set(expected) - set(state))),
             ("unexpected keys", sorted(set(state) - set(expected))))
    return [f"{label}: {', '.join(keys[:shown])}{' ...' if len(keys) > shown else ''} ({len(keys)} in all)"
            for label, keys in found if keys]


def build_model(cfg, pretrained=True):
    """BiSeNet or BiSeNetV2 (cfg.arch) for a configs.Config; `pretrained=False` skips BiSeNet's ImageNet backbone
    (e.g. before load_checkpoint). BiSeNetV2 trains from scratch: configs rejects a pretrained value for it."""
    if cfg.arch == "bisenetv2":
        return BiSeNetV2(num_classes=cfg.num_classes, aux_heads=cfg.aux_heads)
    model = BiSeNet(cfg.num_classes, cfg.spatial_path, cfg.arm, cfg.global_pool, cfg.fusion, cfg.upsample,
                    cfg.aux_heads)
    if pretrained:
        load_pretrained(model.backbone, cfg.pretrained)
    return model


# (conv, BN) attribute pairs where the BN directly follows the conv: ConvBNReLU, ARM attention, ResNet stem and
# BasicBlock, its downsample ("0", "1"), BiSeNetV2's conv + BN Sequentials (GELayerS2's shortcut: also "2", "3")
FOLLOWING_BN = (("conv", "bn"), ("att_conv", "att_bn"), ("conv1", "bn1"), ("conv2", "bn2"), ("0", "1"), ("2", "3"))
# (BN, conv) pairs where the BN feeds a 1x1 conv directly: BiSeNetV2's CE block, the BN of the pooled feature
PRECEDING_BN = (("bn", "conv_gap.conv"),)
BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)  # SyncBatchNorm (train.py's under torchrun) is no BatchNorm2d


@torch.no_grad()
def fold_batchnorm(model):
    """A deployment copy of `model` in eval mode with every BatchNorm folded into the conv next to it (the BN becomes
    nn.Identity). Eval-mode outputs are unchanged up to float rounding; the original model is untouched."""
    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        for bn_name, conv_name in PRECEDING_BN:
            bn, conv = getattr(module, bn_name, None), _submodule(module, conv_name)
            # only a 1x1 conv without padding sees the BN's shift on every input pixel
            if (isinstance(bn, BATCHNORMS) and isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
                    and conv.padding == (0, 0) and conv.groups == 1):
                _fold(module, bn_name, conv, before=True)
        for conv_name, bn_name in FOLLOWING_BN:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, BATCHNORMS):
                _fold(module, bn_name, conv, before=False)
    return folded


def _submodule(module, dotted):
    for name in dotted.split("."):
        module = getattr(module, name, None)
    return module


def _fold(module, bn_name, conv, before):
    """Fold BN module.<bn_name> (x * scale + shift) into the input or output channels and bias of `conv`, in float64
    on the CPU (not every accelerator has it), so that folding adds no rounding of its own."""
    bn = getattr(module, bn_name)
    gamma, beta, mean, var = (t.to("cpu", torch.float64) for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
    scale = gamma / torch.sqrt(var + bn.eps)
    shift = beta - mean * scale
    weight = conv.weight.to("cpu", torch.float64)
    bias = (torch.zeros(conv.out_channels) if conv.bias is None else conv.bias).to("cpu", torch.float64)
    if before:
        weight, bias = weight * scale.reshape(1, -1, 1, 1), bias + weight[:, :, 0, 0] @ shift
    else:
        weight, bias = weight * scale.reshape(-1, 1, 1, 1), shift + bias * scale
    like = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    conv.weight, conv.bias = nn.Parameter(weight.to(**like)), nn.Parameter(bias.to(**like))
    setattr(module, bn_name, nn.Identity())


class InferenceModel(nn.Module):
    """Runs `model` with weights and input in channels_last memory format (oneDNN's and cuDNN's faster convolution
    layout), under autocast to `dtype` if one is given; float32 logits come out."""

    def __init__(self, model, dtype=None):
        super().__init__()
        self.model, self.dtype = model.to(memory_format=torch.channels_last), dtype

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.model(x).float()


def inference_model(model, amp="none", device=None):
    """The fastest eval-mode copy of `model` on `device`: BatchNorm folded, channels_last, bf16/fp16 autocast where the
    hardware has it; fp32 outputs equal up to float rounding. benchmarks/*.md have what each step buys."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    return InferenceModel(fold_batchnorm(model).to(device), autocast_dtype(amp, device)).eval()


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def count_gflops(model, size):
    """GFLOPs of one eval-mode forward pass of a (1, 3, H, W) input, as torch's FlopCounterMode counts them: 2 per
    multiply-add, convolutions and matrix products only. On a model built on the meta device it costs no compute."""
    device = next(model.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, *size, device=device))
    return counter.get_total_flops() / 1e9


def summary(cfg):
    """What `python model.py` prints: parameters with and without aux heads, GFLOPs at the crop, 512x1024, 1024x2048."""
    with torch.device("meta"):  # shapes only: neither the weights nor the forward passes take memory or time
        full = build_model(dataclasses.replace(cfg, aux_heads=True), pretrained=False)
        bare = build_model(dataclasses.replace(cfg, aux_heads=False), pretrained=False)
    lines = [f"{type(full).__name__} (arch={cfg.arch}), {cfg.num_classes} classes",
             f"parameters: {count_parameters(bare):,} for prediction, {count_parameters(full):,} in training "
             f"(with the auxiliary heads {', '.join(full.AUX_MODULES)})",
             "GFLOPs (2 per multiply-add, eval mode, batch 1):"]
    crop = tuple(cfg.crop_size)
    for size in dict.fromkeys((crop, (512, 1024), (1024, 2048))):  # in this order, each once
        note = " (the training crop)" if size == crop else ""
        lines.append(f"  {size[0]}x{size[1]}: {count_gflops(bare, size):.1f}{note}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description="Parameters and GFLOPs of the model a config builds.")
    args = add_config_args(parser).parse_args(argv)
    try:
        cfg = get_config(args.config or "cityscapes", args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
