"""ResNet18 trunk for BiSeNet, and loading its ImageNet weights.

The parameter and buffer names are torchvision's (conv1, bn1, layer1.0.conv1, layer2.0.downsample.0, ...), so
torchvision's ImageNet checkpoint, or any file saved from torchvision.models.resnet18(), loads directly.
There is no avgpool / fc: the segmentation model only needs the 1/8, 1/16 and 1/32 features.
"""

import os

import torch
import torch.nn as nn

# torchvision's ResNet18_Weights.IMAGENET1K_V1. The hash prefix in the file name is checked on download.
TORCHVISION_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
TORCHVISION_FILE = "resnet18-f37072fd.pth"


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def make_layer(cin, cout, stride):
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout))


class ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = make_layer(64, 64, 1)
        self.layer2 = make_layer(64, 128, 2)
        self.layer3 = make_layer(128, 256, 2)
        self.layer4 = make_layer(256, 512, 2)
        # torchvision's init, which matters only when training from scratch (pretrained=none)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        """Return (feat8, feat16, feat32): layer2/3/4 outputs, 128/256/512 channels at 1/8, 1/16, 1/32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class PretrainedError(RuntimeError):
    """The ImageNet weights the config asks for cannot be found or do not fit."""


def torchvision_cache_path():
    """Where torchvision keeps (and looks for) its downloaded ResNet18 ImageNet weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", TORCHVISION_FILE)


def load_pretrained(backbone, source):
    """Load ImageNet weights into `backbone` from `source` (the config's `pretrained`).

    "none" trains from scratch on purpose; "torchvision" uses torchvision's IMAGENET1K_V1 file (from the torch hub
    cache, downloading it if missing); anything else is the path of a resnet18 state dict. Returns the file the
    weights came from (None for "none"), for the training log. Never continues silently without weights.
    """
    if source == "none":
        return None
    path = _torchvision_weights() if source == "torchvision" else source
    _load_strict(backbone, _read_state_dict(path), path)
    return path


def _torchvision_weights():
    path = torchvision_cache_path()
    if os.path.isfile(path):
        return path
    try:
        torch.hub.load_state_dict_from_url(
            TORCHVISION_URL, model_dir=os.path.dirname(path), file_name=TORCHVISION_FILE, check_hash=True
        )
    except Exception as err:  # offline, proxy, bad hash: whatever the cause, the fix is to fetch the file by hand
        raise PretrainedError(
            f"pretrained=torchvision: the ResNet18 ImageNet weights are not in the torch hub cache ({path}) and "
            f"downloading them failed ({type(err).__name__}: {err}). Download {TORCHVISION_URL} and put it at "
            f"{path}, or pass pretrained=/path/to/resnet18.pth. Use pretrained=none only to train from scratch on "
            "purpose (expect a much lower mIoU)."
        ) from err
    return path


def _read_state_dict(path):
    if not os.path.isfile(path):
        raise PretrainedError(
            f"pretrained weights not found: {path!r}; expected 'torchvision', 'none' or the path of a resnet18 "
            "state dict (.pth)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedError(f"cannot read pretrained weights {path}: {load_failure(err)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{path} is not a resnet18 state dict: expected a dict of tensors named like "
                              "torchvision's")
    # the ImageNet classifier has no place in a segmentation backbone
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_failure(err):
    """Why torch.load(weights_only=True) refused a file, in one line (checkpoint.py's reading says it too). For a
    pickle of other objects torch's own message advises weights_only=False, which would run whatever code the file
    holds: that advice is never passed on."""
    if "weights only load failed" in str(err).lower():
        return ("it holds Python objects other than tensors and plain values (a pickle, which could run code when "
                "loaded): refused; expected a file written by torch.save of tensors")
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {first}; expected a file written by torch.save (it may be truncated)"


def state_dict_problems(expected, state, shapes=True, shown=5):
    """How `state` differs from a module's state dict `expected`: a "wrong shapes: ...", "missing keys: ..." and
    "unexpected keys: ..." line where there are any (the first `shown` names, then the count); shapes=False leaves
    the shapes unchecked. The one report of a mismatch, for ImageNet weights and for checkpoints (checkpoint.py)."""
    wrong_shape = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                   for k, v in expected.items() if shapes and k in state and state[k].shape != v.shape]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    found = (("wrong shapes", wrong_shape), ("missing keys", missing), ("unexpected keys", unexpected))
    return [f"{label}: {', '.join(keys[:shown])}{' ...' if len(keys) > shown else ''} ({len(keys)} in all)"
            for label, keys in found if keys]


def _load_strict(backbone, state, path):
    expected = backbone.state_dict()
    # BatchNorm's batch counter is absent from older torchvision files and unused with a fixed momentum
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    problems = state_dict_problems(expected, state)
    if problems:
        raise PretrainedError(f"{path} does not match torchvision's resnet18 layout: " + "; ".join(problems))
    backbone.load_state_dict(state)
