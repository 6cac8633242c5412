"""BiSeNet (ResNet18) with the ablation switches of configs.py, its builder, BatchNorm folding and the inference copy.

Layout (the BiSeNet paper, arXiv 1808.00897): a spatial path at 1/8, a context path (ResNet18, attention refinement on
the 1/16 and 1/32 features, a global pooling branch), a feature fusion module, a main head and two auxiliary heads. A
part that is switched off has no parameters at all, so DistributedDataParallel needs no find_unused_parameters.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from precision import autocast_dtype
from resnet import ResNet18, load_pretrained


class ConvBNReLU(nn.Module):
    def __init__(self, cin, cout, kernel=3, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def resize(x, size, mode):
    """Resize to an exact size (never a fixed x2), so that input sizes need not be multiples of 32."""
    return F.interpolate(x, size=size, mode=mode, align_corners=False if mode == "bilinear" else None)


def global_avg(x):
    return x.mean((2, 3), keepdim=True)


def make_spatial_path():
    # Three stride-2 convs give ceil(ceil(ceil(H/2)/2)/2) rows, the same as the ResNet's layer2 for any H.
    return nn.Sequential(
        ConvBNReLU(3, 64, 7, 2), ConvBNReLU(64, 64, 3, 2), ConvBNReLU(64, 64, 3, 2), ConvBNReLU(64, 128, 1)
    )


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
        self.att = nn.Sequential(
            nn.Conv2d(cout, cout // 4, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout // 4, cout, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        feat = self.conv(x)
        return feat * self.att(global_avg(feat)) + feat


class SegHead(nn.Module):
    """3x3 ConvBNReLU then a 1x1 classifier; logits are resized bilinearly to the input size."""

    def __init__(self, cin, mid, num_classes):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid, 3)
        self.cls = nn.Conv2d(mid, num_classes, 1)

    def forward(self, x, size):
        return resize(self.cls(self.conv(x)), size, "bilinear")


class BiSeNet(nn.Module):
    # The optimizer gives parameters whose names start with these a higher lr (cfg.head_lr_mult).
    HEAD_MODULES = ("ffm", "head", "aux8", "aux16")

    def __init__(
        self,
        num_classes=19,
        spatial_path="conv",
        arm=True,
        global_pool=True,
        fusion="ffm",
        upsample="nearest",
        aux_heads=True,
    ):
        super().__init__()
        # the switches that shape the parameter set (configs.MODEL_KEYS), to explain checkpoint mismatches
        self.arch = dict(
            num_classes=num_classes,
            spatial_path=spatial_path,
            arm=arm,
            global_pool=global_pool,
            fusion=fusion,
            aux_heads=aux_heads,
        )
        self.upsample = upsample

        self.backbone = ResNet18()
        self.spatial = make_spatial_path() if spatial_path == "conv" else None
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
        self._init_new_layers()

    def _init_new_layers(self):
        # The backbone keeps its own init, usually replaced by ImageNet weights.
        for name, child in self.named_children():
            if name == "backbone":
                continue
            for m in child.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, a=1)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward(self, x):
        """Training: a tuple (main, aux8, aux16) of logits at input size, or (main,) without aux heads.

        Evaluation: the main logits only (the aux heads are not run). Note that in training mode BatchNorm after
        global pooling (ARM, GP) needs more than one image per batch.
        """
        size = x.shape[2:]
        feat8, feat16, feat32 = self.backbone(x)
        feat16_up, feat8_up = self._context(feat8, feat16, feat32)
        main = self.head(self._fuse(self._spatial_feature(x, feat8), feat8_up), size)
        if not self.training:
            return main
        if self.aux8 is None:
            return (main,)
        return main, self.aux8(feat8_up, size), self.aux16(feat16_up, size)

    def _context(self, feat8, feat16, feat32):
        """Context path: returns (feat16_up, feat8_up), 128 channels at the 1/16 and 1/8 feature sizes."""
        ctx32 = self.arm32(feat32)
        if self.gp is not None:
            ctx32 = ctx32 + self.gp(global_avg(feat32))  # 1x1 context broadcast over the 1/32 map
        feat16_up = self.refine16(resize(ctx32, feat16.shape[2:], self.upsample))
        feat8_up = self.refine8(resize(feat16_up + self.arm16(feat16), feat8.shape[2:], self.upsample))
        return feat16_up, feat8_up

    def _spatial_feature(self, x, feat8):
        """The 1/8 detail feature (128 channels), or None with spatial_path=none."""
        if self.spatial is not None:
            return self.spatial(x)
        return feat8 if self.arch["spatial_path"] == "backbone" else None

    def _fuse(self, spatial, feat8_up):
        if self.ffm is not None:
            return self.ffm(feat8_up if spatial is None else torch.cat([spatial, feat8_up], 1))
        return feat8_up if spatial is None else spatial + feat8_up


def build_model(cfg, pretrained=True):
    """BiSeNet for a configs.Config; `pretrained=False` skips the ImageNet backbone (e.g. before load_checkpoint)."""
    model = BiSeNet(
        num_classes=cfg.num_classes,
        spatial_path=cfg.spatial_path,
        arm=cfg.arm,
        global_pool=cfg.global_pool,
        fusion=cfg.fusion,
        upsample=cfg.upsample,
        aux_heads=cfg.aux_heads,
    )
    if pretrained:
        load_pretrained(model.backbone, cfg.pretrained)
    return model


@torch.no_grad()
def fold_batchnorm(model):
    """A deployment copy of `model` in eval mode with every BatchNorm folded into the conv before it.

    The conv gets weight * gamma / sqrt(var + eps) and a bias beta - mean * scale (+ its own bias * scale); the BN
    becomes nn.Identity. Eval-mode outputs are unchanged up to float rounding; the original model is untouched.
    """
    # (conv, BN) attribute pairs where the BN directly follows the conv: ConvBNReLU, the ARM attention, the ResNet
    # stem, BasicBlock, and its downsample Sequential ("0", "1")
    pairs = (("conv", "bn"), ("att_conv", "att_bn"), ("conv1", "bn1"), ("conv2", "bn2"), ("0", "1"))
    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            # SyncBatchNorm (a model trained with sync_bn under torchrun) is not a BatchNorm2d subclass
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm))):
                continue
            # in float64 (on the CPU: not every accelerator has it), so that folding adds no rounding of its own
            weight, gamma, beta, mean, var = (
                t.to("cpu", torch.float64) for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
            )
            scale = gamma / torch.sqrt(var + bn.eps)
            bias = beta - mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias.to("cpu", torch.float64) * scale
            like = dict(device=conv.weight.device, dtype=conv.weight.dtype)
            conv.weight = nn.Parameter((weight * scale.reshape(-1, 1, 1, 1)).to(**like))
            conv.bias = nn.Parameter(bias.to(**like))
            setattr(module, bn_name, nn.Identity())
    return folded


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
    """The fastest eval-mode copy of `model` for prediction: BatchNorm folded (fold_batchnorm), channels_last, and
    with amp="bf16" / "fp16" autocast where the hardware has it (autocast_dtype), on `device` (default: the model's).

    In fp32, outputs equal the eval-mode model's up to float rounding; `model` itself is not touched and does not
    move. BENCHMARKS.md has what each step buys.
    """
    device = next(model.parameters()).device if device is None else torch.device(device)
    return InferenceModel(fold_batchnorm(model).to(device), autocast_dtype(amp, device)).eval()


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
