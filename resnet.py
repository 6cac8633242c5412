"""ResNet18 trunk for BiSeNet: torchvision's resnet18 up to layer4, returning the 1/8, 1/16 and 1/32 features. Its
state-dict names are torchvision's, without avgpool and fc: its ImageNet weights (model.load_pretrained) and every
checkpoint of this project load into it.
"""

import torch
import torch.nn as nn
import torchvision
from torchvision.models._utils import IntermediateLayerGetter

FEATURES = {"layer2": "feat8", "layer3": "feat16", "layer4": "feat32"}  # 128, 256, 512 channels


class ResNet18(IntermediateLayerGetter):
    def __init__(self):
        rng = torch.get_rng_state()
        super().__init__(torchvision.models.resnet18(), FEATURES)
        # A seed's initial weights as before this trunk came from torchvision, whose constructor also draws the dropped
        # fc's: the convs are drawn again (default init, then kaiming_normal_, in module order). Only from scratch.
        torch.set_rng_state(rng)
        convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        for conv in convs:
            conv.reset_parameters()
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        """(feat8, feat16, feat32): layer2/3/4 outputs, 128/256/512 channels at 1/8, 1/16, 1/32."""
        features = super().forward(x)
        return features["feat8"], features["feat16"], features["feat32"]
