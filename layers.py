"""The building blocks both BiSeNets share (model.py's V1, bisenetv2.py's V2): ConvBNReLU, resizing to an exact size
and global average pooling."""

import torch.nn as nn
import torch.nn.functional as F


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
