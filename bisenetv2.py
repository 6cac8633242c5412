"""BiSeNetV2 (Yu et al., IJCV 2021, arXiv 2004.02147), strides and widths of the paper's Table 1.

The layers and their state-dict names are those of CoinCheung/BiSeNet's lib/models/bisenetv2.py, so that its
released state dict (model_final_v2_city.pth, boosters included) loads strictly. Where that file departs from the
paper, this module follows the file:
- a ReLU after the depthwise conv of GELayerS1 and after the second depthwise conv of GELayerS2;
- the CE block's last 3x3 conv has BatchNorm and ReLU (the paper: a plain conv);
- BGA's final 3x3 conv has BatchNorm and ReLU, and its x4 upsampling is nearest;
- the main head's 3x3 conv is 1024 channels wide (boosters: 128), with dropout 0.1 before the classifier; a booster
  doubles its feature's size (nearest) and applies another ConvBNReLU of stride**2 channels before the classifier;
- initialization: kaiming_normal_ (fan_out) for every conv, biases 0, BatchNorm weights 1 except the one closing each
  GE layer's residual branch (conv2's), which starts at 0 so that the layer starts as its shortcut.
One departure from that file: its fixed x4 / x8 upsampling factors become resizes to the exact size of the target
(layers.resize), so that any input size works, with the same results where the size divides; the parameter-free
modules this drops were the last in their Sequentials, so the other names keep their indices.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import ConvBNReLU, global_avg, resize


def conv_bn(cin, cout, kernel=3, stride=1, groups=1):
    """A conv (no bias) and its BatchNorm, as the two entries of a Sequential."""
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class DetailBranch(nn.Module):
    """Wide and shallow: 64 channels at 1/2 (S1) and 1/4 (S2), 128 at 1/8 (S3)."""

    def __init__(self):
        super().__init__()
        self.S1 = nn.Sequential(ConvBNReLU(3, 64, 3, 2), ConvBNReLU(64, 64))
        self.S2 = nn.Sequential(ConvBNReLU(64, 64, 3, 2), ConvBNReLU(64, 64), ConvBNReLU(64, 64))
        self.S3 = nn.Sequential(ConvBNReLU(64, 128, 3, 2), ConvBNReLU(128, 128), ConvBNReLU(128, 128))

    def forward(self, x):
        return self.S3(self.S2(self.S1(x)))


class StemBlock(nn.Module):
    """16 channels at 1/4: a strided conv, then a strided conv path and a max pool side by side, fused by a 3x3."""

    def __init__(self):
        super().__init__()
        self.conv = ConvBNReLU(3, 16, 3, 2)
        self.left = nn.Sequential(ConvBNReLU(16, 8, 1), ConvBNReLU(8, 16, 3, 2))
        self.right = nn.MaxPool2d(3, 2, 1)
        self.fuse = ConvBNReLU(32, 16)

    def forward(self, x):
        feat = self.conv(x)
        return self.fuse(torch.cat([self.left(feat), self.right(feat)], 1))


class GELayerS1(nn.Module):
    """Gather-and-expansion layer, stride 1: 3x3 conv, depthwise 3x3 expanding 6x, 1x1 projection, residual."""

    def __init__(self, cin, cout, expand=6):
        super().__init__()
        mid = cin * expand
        self.conv1 = ConvBNReLU(cin, cin)
        self.dwconv = nn.Sequential(*conv_bn(cin, mid, groups=cin), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(*conv_bn(mid, cout, 1))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv2(self.dwconv(self.conv1(x))) + x)


class GELayerS2(nn.Module):
    """Gather-and-expansion layer, stride 2: two depthwise 3x3 (the first strided and expanding 6x), and a depthwise
    strided 3x3 + 1x1 shortcut."""

    def __init__(self, cin, cout, expand=6):
        super().__init__()
        mid = cin * expand
        self.conv1 = ConvBNReLU(cin, cin)
        self.dwconv1 = nn.Sequential(*conv_bn(cin, mid, stride=2, groups=cin))
        self.dwconv2 = nn.Sequential(*conv_bn(mid, mid, groups=mid), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(*conv_bn(mid, cout, 1))
        self.shortcut = nn.Sequential(*conv_bn(cin, cin, stride=2, groups=cin), *conv_bn(cin, cout, 1))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv2(self.dwconv2(self.dwconv1(self.conv1(x)))) + self.shortcut(x))


class CEBlock(nn.Module):
    """Context embedding: the globally pooled feature (BatchNorm, 1x1) added to the feature, then a 3x3."""

    def __init__(self, channels=128):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv_gap = ConvBNReLU(channels, channels, 1)
        self.conv_last = ConvBNReLU(channels, channels)

    def forward(self, x):
        return self.conv_last(self.conv_gap(self.bn(global_avg(x))) + x)


class SegmentBranch(nn.Module):
    """Narrow and deep: stem 16 ch at 1/4, S3 32 at 1/8, S4 64 at 1/16, S5 128 at 1/32 (GE layers), the CE block.
    Returns every stage's output (stem, S3, S4, S5 before the CE block, after it): the boosters read the first four."""

    def __init__(self):
        super().__init__()
        self.S1S2 = StemBlock()
        self.S3 = nn.Sequential(GELayerS2(16, 32), GELayerS1(32, 32))
        self.S4 = nn.Sequential(GELayerS2(32, 64), GELayerS1(64, 64))
        self.S5_4 = nn.Sequential(GELayerS2(64, 128), GELayerS1(128, 128), GELayerS1(128, 128), GELayerS1(128, 128))
        self.S5_5 = CEBlock(128)

    def forward(self, x):
        feat2 = self.S1S2(x)
        feat3 = self.S3(feat2)
        feat4 = self.S4(feat3)
        feat5_4 = self.S5_4(feat4)
        return feat2, feat3, feat4, feat5_4, self.S5_5(feat5_4)


class BGALayer(nn.Module):
    """Bilateral guided aggregation: the detail (1/8) and semantic (1/32) features gate each other with sigmoids."""

    def __init__(self, channels=128):
        super().__init__()
        c = channels
        self.left1 = nn.Sequential(*conv_bn(c, c, groups=c), nn.Conv2d(c, c, 1, bias=False))
        self.left2 = nn.Sequential(*conv_bn(c, c, stride=2), nn.AvgPool2d(3, 2, 1))
        self.right1 = nn.Sequential(*conv_bn(c, c))
        self.right2 = nn.Sequential(*conv_bn(c, c, groups=c), nn.Conv2d(c, c, 1, bias=False))
        self.conv = nn.Sequential(*conv_bn(c, c), nn.ReLU(inplace=True))

    def forward(self, detail, semantic):
        # left2's strided conv and pool bring the detail feature to the semantic one's size (both round up alike)
        size = detail.shape[2:]
        left = self.left1(detail) * torch.sigmoid(resize(self.right1(semantic), size, "nearest"))
        right = self.left2(detail) * torch.sigmoid(self.right2(semantic))
        return self.conv(left + resize(right, size, "nearest"))


class UpsampleConvBNReLU(nn.Sequential):
    """Nearest x2 upsampling, then a 3x3 ConvBNReLU (a booster's expansion, CoinCheung's state-dict names), computed as
    one stride-2 transposed conv where faster: nearest x2 repeats a pixel in a 2x2 block, so each output pixel reads a
    2x2 input window with taps that are sums of the kernel's rows and columns (`_TAPS`): 16 multiply-adds per input
    pixel and channel pair instead of 4 x 9, no upsampled copy, the same result up to float rounding."""

    # One axis of the 4-tap transposed-conv kernel from the 3 taps of the conv's: output pixel 2i (tap 1) reads
    # input i with taps 1+2 and input i-1 (tap 3) with tap 0; output 2i+1 reads input i (tap 2) with taps 0+1 and
    # input i+1 (tap 0) with tap 2. conv_transpose2d(stride 2, padding 1) sends input i to outputs 2i-1+k, k = 0..3.
    _TAPS = ((2,), (1, 2), (0, 1), (0,))

    def __init__(self, cin, cout):
        super().__init__(nn.Upsample(scale_factor=2), ConvBNReLU(cin, cout))

    def forward(self, x):
        return self.transposed(x) if self.use_transposed(x) else self[1](self[0](x))

    def use_transposed(self, x):
        # Measured on a 2-core CPU: faster up to twice the input's channels (aux2-aux4: 1.1-4.5x), not for aux5_4's
        # 128 -> 1024 (0.7-1.0x; benchmarks/measured.md). CUDA upsamples first until a GPU measurement says otherwise.
        conv = self[1].conv
        return x.device.type == "cpu" and conv.out_channels <= 2 * conv.in_channels

    def transposed(self, x):
        block = self[1]
        weight = block.conv.weight
        # plain sums, not a matmul: autocast would round these taps to bf16 before the conv rounds them again
        rows = torch.stack([sum(weight[:, :, i] for i in taps) for taps in self._TAPS], 2)
        kernel = torch.stack([sum(rows[..., i] for i in taps) for taps in self._TAPS], 3)
        x = F.conv_transpose2d(x, kernel.transpose(0, 1), block.conv.bias, stride=2, padding=1)
        return block.relu(block.bn(x))


class SegmentHead(nn.Module):
    """3x3 ConvBNReLU to `mid` channels, dropout, a 1x1 classifier; logits resized bilinearly to the input size.
    A booster first doubles the size (nearest) and convolves to stride**2 channels, `stride` being its feature's."""

    def __init__(self, cin, mid, num_classes, stride, booster):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.drop = nn.Dropout(0.1)
        width = stride * stride if booster else mid
        expand = UpsampleConvBNReLU(mid, width) if booster else nn.Identity()
        self.conv_out = nn.Sequential(expand, nn.Conv2d(width, num_classes, 1))

    def forward(self, x, size):  # size None: the logits at the feature's own size
        logits = self.conv_out(self.drop(self.conv(x)))
        return logits if size is None else resize(logits, size, "bilinear")


class BiSeNetV2(nn.Module):
    HEAD_MODULES = ("head", "aux2", "aux3", "aux4", "aux5_4")  # parameters the optimizer gives cfg.head_lr_mult
    AUX_MODULES = ("aux2", "aux3", "aux4", "aux5_4")  # the boosters (training only), named as their outputs
    CLASSIFIER = "head.conv_out.1"  # the conv whose output channels are the classes

    def __init__(self, num_classes=19, aux_heads=True):
        super().__init__()
        # what shapes the parameter set (configs.MODEL_KEYS), to explain checkpoint mismatches
        self.arch = dict(arch="bisenetv2", num_classes=num_classes, aux_heads=aux_heads)
        self.detail = DetailBranch()
        self.segment = SegmentBranch()
        self.bga = BGALayer(128)
        self.head = SegmentHead(128, 1024, num_classes, 8, booster=False)
        # on the stem (16 ch, 1/4), S3 (32, 1/8), S4 (64, 1/16) and S5 before the CE block (128, 1/32)
        for name, cin, stride in (("aux2", 16, 4), ("aux3", 32, 8), ("aux4", 64, 16), ("aux5_4", 128, 32)):
            setattr(self, name, SegmentHead(cin, 128, num_classes, stride, booster=True) if aux_heads else None)
        self._init_weights()

    def _init_weights(self):
        residual_ends = {m.conv2[1] for m in self.modules() if isinstance(m, (GELayerS1, GELayerS2))}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.0 if m in residual_ends else 1.0)
                nn.init.zeros_(m.bias)

    def forward(self, x, resize_logits=True):
        """Training: {"out": main, "aux2": ..., "aux5_4": ...} logits at input size; evaluation: the main logits, with
        resize_logits=False at the head's 1/8 size (export.py's labels model upsamples its labels instead). In
        training mode the CE block's BatchNorm after global pooling needs more than one image per batch."""
        size = x.shape[2:]
        *features, semantic = self.segment(x)
        main = self.head(self.bga(self.detail(x), semantic), size if resize_logits or self.training else None)
        if not self.training:
            return main
        boosters = zip(self.AUX_MODULES, features, strict=True) if self.aux2 is not None else ()
        return {"out": main, **{name: getattr(self, name)(feat, size) for name, feat in boosters}}
