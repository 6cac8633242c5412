"""OHEM cross-entropy and the multi-head loss, checked against the formula written out in numpy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import Config
from loss import BiSeNetLoss, OhemCrossEntropy, build_loss, ohem_select

IGNORE = 255


def reference_ohem(logits, target, thresh, min_frac, ignore_index=IGNORE):
    """(loss, branch) by hand: float64 log-softmax, explicit sort, the two OHEM branches."""
    x = logits.detach().double().numpy()  # N, C, H, W
    t = target.numpy()
    losses = []
    for n, i, j in zip(*np.nonzero(t != ignore_index), strict=True):
        z = x[n, :, i, j]
        log_sum_exp = z.max() + math.log(np.exp(z - z.max()).sum())
        losses.append(log_sum_exp - z[t[n, i, j]])
    losses = np.sort(np.array(losses))[::-1]
    thresh_loss = -math.log(thresh)
    n_min = max(1, int(len(losses) * min_frac))
    if losses[n_min - 1] > thresh_loss:
        return losses[losses > thresh_loss].mean(), "above_thresh"
    return losses[:n_min].mean(), "top_n_min"


def random_batch(seed, n=2, c=5, h=8, w=12, scale=3.0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * scale
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < ignore_frac] = IGNORE
    return logits, target


def test_ohem_select_hand_values():
    losses = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.05])
    # Two losses (0.9, 0.5) exceed 0.357 and n_min = 1: keep both.
    assert sorted(ohem_select(losses, 0.357, 1).tolist()) == pytest.approx([0.5, 0.9])
    assert sorted(ohem_select(losses, 0.357, 2).tolist()) == pytest.approx([0.5, 0.9])
    # n_min = 3 but only two above: keep the three largest.
    assert sorted(ohem_select(losses, 0.357, 3).tolist()) == pytest.approx([0.2, 0.5, 0.9])


def test_ohem_keeps_all_above_threshold():
    # Large random logits: most pixels are far from confident, well over n_min of them are hard.
    logits, target = random_batch(0)
    expected, branch = reference_ohem(logits, target, 0.7, 1 / 16)
    assert branch == "above_thresh"
    loss = OhemCrossEntropy(0.7, 1 / 16, IGNORE)(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ohem_keeps_top_n_min_when_few_are_hard():
    logits, target = random_batch(1)
    # Confident and right everywhere (loss ~ 0), except three wrong pixels: fewer hard pixels than n_min.
    valid = target != IGNORE
    confident = F.one_hot(target.clamp(max=4), 5).permute(0, 3, 1, 2).float() * 8.0
    logits = confident + 0.5 * logits
    valid_idx = valid.nonzero()[:3]
    for n, i, j in valid_idx.tolist():
        logits[n, :, i, j] = 0.0
        logits[n, (target[n, i, j] + 1) % 5, i, j] = 6.0
    n_valid = int(valid.sum())
    assert n_valid // 16 > 3  # the three wrong pixels cannot fill n_min
    expected, branch = reference_ohem(logits, target, 0.7, 1 / 16)
    assert branch == "top_n_min"
    loss = OhemCrossEntropy(0.7, 1 / 16, IGNORE)(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ohem_matches_cross_entropy_when_everything_is_kept():
    logits, target = random_batch(2)
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE)
    # min_frac = 1: n_min is every valid pixel.
    assert OhemCrossEntropy(0.7, 1.0, IGNORE)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # thresh near 1: every non-zero loss is above the threshold.
    assert OhemCrossEntropy(1 - 1e-7, 1 / 16, IGNORE)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("seed, confident", [(3, False), (4, True)])  # many hard pixels; few (the top-n_min branch)
def test_ohem_gradient_equals_the_gather_of_the_hard_pixels(seed, confident):
    """The masked sum over the map (what the loss computes) has the gradient of the plain formulation: gather the
    valid pixels' losses, then the hard ones, and take their mean."""
    logits, target = random_batch(seed)
    if confident:  # right by a wide margin nearly everywhere: fewer hard pixels than n_min
        logits = logits + 12.0 * F.one_hot(target.clamp(max=4), 5).permute(0, 3, 1, 2)
    logits.requires_grad_(True)
    OhemCrossEntropy(0.7, 1 / 16, IGNORE)(logits, target).backward()
    ours, logits.grad = logits.grad, None
    losses = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")[target != IGNORE]
    n_min = max(1, int(losses.numel() / 16))
    hard = losses > -math.log(0.7)
    if int(hard.sum()) < n_min:
        hard = losses.argsort(descending=True)[:n_min]
    losses[hard].mean().backward()
    assert (int((target != IGNORE).sum()) // 16 > int((losses > -math.log(0.7)).sum())) is confident
    assert torch.allclose(ours, logits.grad, rtol=1e-5, atol=1e-9)


def test_ohem_gradient_only_reaches_valid_pixels():
    logits, target = random_batch(3)
    logits.requires_grad_(True)
    OhemCrossEntropy()(logits, target).backward()
    ignored = (target == IGNORE).unsqueeze(1).expand_as(logits)
    assert torch.all(logits.grad[ignored] == 0)
    assert logits.grad.abs().sum() > 0


def test_ohem_all_ignored_is_zero_with_gradient():
    logits = torch.randn(2, 5, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE, dtype=torch.long)
    loss = OhemCrossEntropy()(logits, target)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ohem_low_precision_logits_computed_in_float32(dtype):
    logits, target = random_batch(4)
    low = logits.to(dtype)
    expected, _ = reference_ohem(low.float(), target, 0.7, 1 / 16)
    loss = OhemCrossEntropy()(low, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert OhemCrossEntropy()(low, target).item() == pytest.approx(expected, rel=1e-5)


def test_bisenet_loss_sums_heads_with_weight():
    target = random_batch(5)[1]
    outputs = {name: random_batch(seed)[0] for name, seed in (("out", 6), ("aux8", 7), ("aux16", 8))}
    ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    main, aux8, aux16 = (ce(o, target).item() for o in outputs.values())
    total, parts = BiSeNetLoss(ce, aux_weight=0.4)(outputs, target)
    assert total.item() == pytest.approx(main + 0.4 * (aux8 + aux16), rel=1e-6)
    assert set(parts) == {"main", "aux8", "aux16"}
    assert [parts[k].item() for k in ("main", "aux8", "aux16")] == pytest.approx([main, aux8, aux16], rel=1e-6)
    assert not any(p.requires_grad for p in parts.values())


def test_bisenet_loss_formula_names_the_weight():
    ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    assert BiSeNetLoss(ce, 0.4, ("aux8", "aux16")).formula() == "main+0.4*(aux8+aux16)"
    assert BiSeNetLoss(ce, 1.0, ("aux8", "aux16")).formula() == "main+aux8+aux16"
    assert BiSeNetLoss(ce, 0.4, ("aux8", "aux16")).formula(aux_heads=False) == "main"
    assert BiSeNetLoss(ce, 0.4).formula() == "main"


def test_bisenet_loss_accepts_main_logits_alone():
    logits, target = random_batch(9)
    total, parts = BiSeNetLoss(torch.nn.CrossEntropyLoss(ignore_index=IGNORE))(logits, target)
    assert set(parts) == {"main"}
    assert total.item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=IGNORE).item())


def test_build_loss_reads_config():
    cfg = Config(ohem_thresh=0.6, ohem_min_frac=0.25, aux_weight=0.5)
    loss = build_loss(cfg)
    assert loss.aux_weight == 0.5
    assert loss.criterion.thresh_loss == pytest.approx(-math.log(0.6))
    assert loss.criterion.min_frac == 0.25 and loss.criterion.ignore_index == IGNORE


def reference_weighted_ohem(logits, target, thresh, min_frac, weight):
    """By hand: pixels chosen by their unweighted loss as in reference_ohem, then sum(w * loss) / sum(w) over them."""
    x = logits.detach().double().numpy()
    t = target.numpy()
    rows = []
    for n, i, j in zip(*np.nonzero(t != IGNORE), strict=True):
        z = x[n, :, i, j]
        rows.append((z.max() + math.log(np.exp(z - z.max()).sum()) - z[t[n, i, j]], weight[t[n, i, j]]))
    rows.sort(key=lambda r: -r[0])
    thresh_loss = -math.log(thresh)
    n_min = max(1, int(len(rows) * min_frac))
    chosen = [r for r in rows if r[0] > thresh_loss] if rows[n_min - 1][0] > thresh_loss else rows[:n_min]
    return sum(loss * w for loss, w in chosen) / sum(w for _, w in chosen)


@pytest.mark.parametrize("thresh, min_frac", [(0.7, 1 / 16), (0.01, 0.5)])  # both OHEM branches
def test_class_weights_with_ohem_match_the_formula_written_out(thresh, min_frac):
    logits, target = random_batch(4)
    weight = [0.5, 3.0, 1.0, 0.0, 2.0]
    got = OhemCrossEntropy(thresh, min_frac, IGNORE, weight)(logits, target).item()
    assert got == pytest.approx(reference_weighted_ohem(logits, target, thresh, min_frac, weight), rel=1e-5)
    # equal weights are the unweighted loss
    plain = OhemCrossEntropy(thresh, min_frac, IGNORE)(logits, target).item()
    assert OhemCrossEntropy(thresh, min_frac, IGNORE, [2.0] * 5)(logits, target).item() == pytest.approx(plain)


def test_hard_pixels_all_of_weight_zero_give_a_zero_loss_that_backpropagates():
    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    loss = OhemCrossEntropy(0.7, 1.0, IGNORE, [0.0, 1.0])(logits, torch.zeros(1, 2, 2, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().sum() == 0


def test_build_loss_takes_the_class_weights():
    loss = build_loss(Config(num_classes=3), [1.0, 2.0, 0.5])
    assert loss.criterion.weight.tolist() == [1.0, 2.0, 0.5]
    assert build_loss(Config()).criterion.weight is None
