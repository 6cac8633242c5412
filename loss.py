"""Training losses: OHEM cross-entropy and the sum over the model's heads, main + aux_weight * (sum of the aux heads).
The logged loss is that total, the value optimized: with aux_weight 1 it starts near 3x (BiSeNetV2's four boosters:
5x) a single head's cross-entropy. Each head's own loss is logged beside it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from datasets import IGNORE


def ohem_mask(losses, valid, thresh_loss, n_min):
    """Mask of the hard valid losses: all above `thresh_loss` if at least `n_min` are (the n_min-th largest is), else
    the `n_min` largest, so an easy batch still has a gradient."""
    hard = valid & (losses > thresh_loss)
    n_min = min(n_min, int(valid.sum()))
    if int(hard.sum()) >= n_min:
        return hard
    # topk instead of a full sort: only the n_min largest are needed; -inf keeps the ignored pixels out
    top = losses.detach().masked_fill(~valid, -math.inf).flatten().topk(n_min, sorted=False).indices
    return torch.zeros_like(hard).flatten().index_fill_(0, top, True).view_as(hard)


def ohem_select(losses, thresh_loss, n_min):
    """The hard losses themselves among the 1-D `losses`, all valid (see ohem_mask)."""
    return losses[ohem_mask(losses, torch.ones_like(losses, dtype=torch.bool), thresh_loss, n_min)]


class OhemCrossEntropy(nn.Module):
    """Cross-entropy averaged over the hard pixels: true-class probability below `thresh`, and at least `min_frac` of
    the valid pixels. With class `weight`s, hardness is the unweighted loss (a weight changes what a pixel counts for,
    not whether it is hard) and the mean is PyTorch's weighted one, sum(w_i * loss_i) / sum(w_i): a plain mean of
    w_i * loss_i would scale the gradient by the hard pixels' mean weight, several times 1 with median-frequency
    weights, and can make a run diverge."""

    def __init__(self, thresh=0.7, min_frac=1 / 16, ignore_index=IGNORE, weight=None):
        super().__init__()
        self.thresh_loss = -math.log(thresh)  # p < thresh  <=>  -log p > -log thresh
        self.min_frac = min_frac
        self.ignore_index = ignore_index
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits, target):
        # float32 so that fp16/bf16 logits under autocast give the same selection and no overflow.
        losses = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="none")
        valid = target != self.ignore_index
        n_valid = int(valid.sum())
        if n_valid == 0:
            # Zero that still backpropagates (to zero gradients), so every rank runs the same backward.
            return logits.float().sum() * 0
        # n_min counts valid pixels only: counting ignored ones would ask for more pixels than exist.
        hard = ohem_mask(losses, valid, self.thresh_loss, max(1, int(n_valid * self.min_frac)))
        # The mean over the hard pixels as a masked sum over the map: the same value as gathering them first, without
        # the gathers and the backward's index_put (benchmark.py's loss section times the two).
        # torch.where, not a product with the mask: a non-finite loss outside the selection stays out of it.
        selected = torch.where(hard, losses, 0)
        if self.weight is None:
            return selected.sum() / hard.sum()
        weights = self.weight[target.masked_fill(~valid, 0)] * hard
        # all hard pixels of weight 0: nothing to learn from them, a zero that still backpropagates
        return (selected * weights).sum() / weights.sum().clamp(min=torch.finfo(torch.float32).tiny)

    def extra_repr(self):
        return f"thresh_loss={self.thresh_loss:.4f}, min_frac={self.min_frac}, ignore_index={self.ignore_index}"


class BiSeNetLoss(nn.Module):
    """`criterion` on each head's logits ({"out": main, AUX_NAME: aux, ...} or main alone): (main + aux_weight *
    sum(aux), {"main" and each aux name: its detached loss}); `aux_names` only name the heads in `formula`."""

    def __init__(self, criterion, aux_weight=1.0, aux_names=()):
        super().__init__()
        self.criterion, self.aux_weight, self.aux_names = criterion, aux_weight, tuple(aux_names)

    def formula(self, aux_heads=True):
        """The total in terms of the heads' names: "main+aux8+aux16", "main+0.4*(aux8+aux16)", or "main"."""
        aux = "+".join(self.aux_names)
        if not aux_heads or not aux:
            return "main"
        return f"main+{aux}" if self.aux_weight == 1 else f"main+{self.aux_weight:g}*({aux})"

    def forward(self, outputs, target):
        total, parts = 0, {}
        for name, logits in ({"out": outputs} if torch.is_tensor(outputs) else outputs).items():
            loss = self.criterion(logits, target)
            parts["main" if name == "out" else name] = loss.detach()
            total = total + (loss if name == "out" else self.aux_weight * loss)
        return total, parts


def build_loss(cfg, class_weights=None, aux_names=()):
    """The training loss; `class_weights`: None or num_classes numbers (datasets.class_weights)."""
    criterion = OhemCrossEntropy(cfg.ohem_thresh, cfg.ohem_min_frac, weight=class_weights)
    return BiSeNetLoss(criterion, cfg.aux_weight, aux_names)
