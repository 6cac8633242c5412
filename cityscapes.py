"""The Cityscapes dataset: file discovery, the official label table and label-id <-> train-id maps.

Layout (as unzipped from leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip):

    ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png
"""

import os
from collections import namedtuple
from glob import glob

import cv2
import numpy as np
import torch

IGNORE = 255  # the label of ignored pixels everywhere: train ids, crop padding, the loss, the confusion matrix

Label = namedtuple("Label", "name id train_id color")

# The official table (cityscapesScripts labels.py): name, labelId, trainId, RGB color.
LABELS = (
    Label("unlabeled", 0, IGNORE, (0, 0, 0)),
    Label("ego vehicle", 1, IGNORE, (0, 0, 0)),
    Label("rectification border", 2, IGNORE, (0, 0, 0)),
    Label("out of roi", 3, IGNORE, (0, 0, 0)),
    Label("static", 4, IGNORE, (0, 0, 0)),
    Label("dynamic", 5, IGNORE, (111, 74, 0)),
    Label("ground", 6, IGNORE, (81, 0, 81)),
    Label("road", 7, 0, (128, 64, 128)),
    Label("sidewalk", 8, 1, (244, 35, 232)),
    Label("parking", 9, IGNORE, (250, 170, 160)),
    Label("rail track", 10, IGNORE, (230, 150, 140)),
    Label("building", 11, 2, (70, 70, 70)),
    Label("wall", 12, 3, (102, 102, 156)),
    Label("fence", 13, 4, (190, 153, 153)),
    Label("guard rail", 14, IGNORE, (180, 165, 180)),
    Label("bridge", 15, IGNORE, (150, 100, 100)),
    Label("tunnel", 16, IGNORE, (150, 120, 90)),
    Label("pole", 17, 5, (153, 153, 153)),
    Label("polegroup", 18, IGNORE, (153, 153, 153)),
    Label("traffic light", 19, 6, (250, 170, 30)),
    Label("traffic sign", 20, 7, (220, 220, 0)),
    Label("vegetation", 21, 8, (107, 142, 35)),
    Label("terrain", 22, 9, (152, 251, 152)),
    Label("sky", 23, 10, (70, 130, 180)),
    Label("person", 24, 11, (220, 20, 60)),
    Label("rider", 25, 12, (255, 0, 0)),
    Label("car", 26, 13, (0, 0, 142)),
    Label("truck", 27, 14, (0, 0, 70)),
    Label("bus", 28, 15, (0, 60, 100)),
    Label("caravan", 29, IGNORE, (0, 0, 90)),
    Label("trailer", 30, IGNORE, (0, 0, 110)),
    Label("train", 31, 16, (0, 80, 100)),
    Label("motorcycle", 32, 17, (0, 0, 230)),
    Label("bicycle", 33, 18, (119, 11, 32)),
    Label("license plate", -1, IGNORE, (0, 0, 142)),
)

TRAIN_LABELS = sorted((lb for lb in LABELS if lb.train_id != IGNORE), key=lambda lb: lb.train_id)
CLASS_NAMES = tuple(lb.name for lb in TRAIN_LABELS)
NUM_CLASSES = len(TRAIN_LABELS)


def _lookup_tables():
    # uint8 tables indexed by id & 0xFF: -1 (license plate) wraps to 255, which is ignored either way.
    # Filled with IGNORE (255), never -1, which numpy 2 refuses to put in a uint8 array.
    to_train = np.full(256, IGNORE, np.uint8)
    for lb in LABELS:
        to_train[lb.id & 0xFF] = lb.train_id
    to_label = np.zeros(256, np.uint8)  # ignore / unknown train ids -> 0 (unlabeled)
    palette = np.zeros((256, 3), np.uint8)  # ignore -> black
    for lb in TRAIN_LABELS:
        to_label[lb.train_id] = lb.id
        palette[lb.train_id] = lb.color
    return to_train, to_label, palette


ID_TO_TRAIN_ID, TRAIN_ID_TO_ID, PALETTE = _lookup_tables()


def to_train_ids(label_ids):
    """Map Cityscapes labelIds (any integer array; -1 is the license plate) to train ids (255 = ignore).

    Values that are no label id at all (below -1 or above 255) are ignored too, not wrapped onto a class.
    """
    ids = np.asarray(label_ids)
    if ids.dtype == np.uint8:
        return ID_TO_TRAIN_ID[ids]
    ids = ids.astype(np.int64)
    return np.where((ids >= -1) & (ids <= 255), ID_TO_TRAIN_ID[ids & 0xFF], IGNORE).astype(np.uint8)


def to_label_ids(train_ids):
    """Map train ids 0..18 back to labelIds (what the benchmark server and the official toolkit read)."""
    return TRAIN_ID_TO_ID[np.asarray(train_ids).astype(np.uint8)]


def colorize(train_ids):
    """RGB uint8 picture (H, W, 3) of a train-id map in the Cityscapes colors; ignore is black."""
    return PALETTE[np.asarray(train_ids).astype(np.uint8)]


class DatasetError(RuntimeError):
    """A data file or folder that cannot be used, named in the message.

    Raised in a DataLoader worker, it reaches the main process as DatasetError("Caught DatasetError in DataLoader
    worker process N. Original Traceback ..."): `str()` gives back the original message alone.
    """

    def __str__(self):
        text = super().__str__()
        if "Original Traceback" in text:
            return text.rstrip().splitlines()[-1].split(": ", 1)[-1]
        return text


def layout_help(root, split):
    return (
        f"expected Cityscapes under {root}:\n"
        f"    {root}/leftImg8bit/{split}/CITY/CITY_SEQ_FRAME_leftImg8bit.png\n"
        f"    {root}/gtFine/{split}/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png\n"
        "To get it: register at https://www.cityscapes-dataset.com/, download leftImg8bit_trainvaltest.zip and\n"
        f"gtFine_trainvaltest.zip, and unzip both in {root}/ (see data/README.md), or pass data_root=PATH.\n"
        f"To try the pipeline without downloading anything: python synthetic.py --root {root} writes a small\n"
        "dataset in this layout (then train with --config synthetic)."
    )


def find_samples(root, split, labels=True):
    """Sorted (image_path, label_path) pairs of a split; label_path is None when labels=False."""
    image_dir = os.path.join(root, "leftImg8bit", split)
    images = sorted(glob(os.path.join(image_dir, "*", "*_leftImg8bit.png")))
    if not images:
        where = image_dir if os.path.isdir(image_dir) else f"{image_dir} (missing)"
        raise DatasetError(f"no images found in {where}\n{layout_help(root, split)}")
    if not labels:
        return [(path, None) for path in images]
    samples, missing = [], []
    for path in images:
        city = os.path.basename(os.path.dirname(path))
        stem = os.path.basename(path)[: -len("_leftImg8bit.png")]
        label = os.path.join(root, "gtFine", split, city, stem + "_gtFine_labelIds.png")
        (samples if os.path.isfile(label) else missing).append((path, label))
    if missing:
        listed = "\n".join(f"    {img} -> {lbl}" for img, lbl in missing[:5])
        more = f"\n    ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(f"{len(missing)} image(s) in {image_dir} have no label file:\n{listed}{more}")
    return samples


def read_image(path):
    """RGB uint8 (H, W, 3)."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"cannot read image {path}: missing, unreadable or not an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_label_png(path, shape=None):
    """The raw uint8 (H, W) array of a label PNG, checked: a real PNG file (a JPEG under a .png name would change
    label values), single-channel 8-bit, of the image's (H, W) `shape`. DatasetError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
    except OSError as err:
        raise DatasetError(f"cannot read label {path}: {err.strerror or err}") from None
    if head != PNG_SIGNATURE:
        raise DatasetError(f"label {path} is not a PNG file (another format under a .png name?); expected a "
                           "single-channel 8-bit PNG: a lossy format such as JPEG changes label values")
    label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DatasetError(f"cannot read label {path}: unreadable or truncated PNG")
    if label.ndim != 2 or label.dtype != np.uint8:
        got = f"{label.shape[2] if label.ndim == 3 else 1}-channel {label.dtype}"
        raise DatasetError(f"label {path} is {got}; expected a single-channel 8-bit PNG of label values "
                           "(a color-coded label must be converted to label values first)")
    if shape is not None and label.shape != tuple(shape):
        raise DatasetError(f"label {path} is {label.shape[0]}x{label.shape[1]} but its image is "
                           f"{shape[0]}x{shape[1]}; expected the same size")
    return label


def read_label(path, shape=None, num_classes=NUM_CLASSES):
    """Train ids (H, W) uint8 from a labelIds PNG; `shape` is the (H, W) its image has. A model of fewer than 19
    classes cannot learn Cityscapes' labels: a train id >= num_classes is a DatasetError naming the file."""
    train_ids = to_train_ids(read_label_png(path, shape))
    beyond = (train_ids != IGNORE) & (train_ids >= num_classes)
    if beyond.any():
        raise DatasetError(f"label {path} holds train ids up to {int(train_ids[beyond].max())} (Cityscapes has "
                           f"{NUM_CLASSES} classes) but num_classes={num_classes}; expected num_classes={NUM_CLASSES}")
    return train_ids


class Cityscapes(torch.utils.data.Dataset):
    """Cityscapes `split` under `root`.

    Without a transform, item i is (RGB uint8 image (H, W, 3), int64 train-id label (H, W)); with one,
    it is `transform(image, label, rng)`. The index may be an (i, seed) pair: the transform then draws
    its randomness from a generator seeded with `seed`, so an augmentation stream is reproducible
    whatever the number of loader workers (and across a resumed run). The test split has no public
    labels: its label is all 255.
    """

    def __init__(self, root, split, transform=None, labels=None, num_classes=NUM_CLASSES):
        self.root, self.split, self.transform, self.num_classes = root, split, transform, num_classes
        self.has_labels = split != "test" if labels is None else labels
        self.samples = find_samples(root, split, self.has_labels)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        index, seed = index if isinstance(index, tuple) else (index, None)
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        if label_path is None:
            label = np.full(image.shape[:2], IGNORE, np.uint8)
        else:
            label = self.read_label(label_path, image.shape[:2])
        if self.transform is None:
            return image, label.astype(np.int64)
        return self.transform(image, label, np.random.default_rng(seed))

    def read_label(self, path, shape):
        """Train ids (H, W) uint8 of the label file at `path` for an image of (H, W) `shape`."""
        return read_label(path, shape, self.num_classes)

    def name(self, index):
        """The frame's name, {city}_{seq}_{frame}, as the official toolkit matches predictions by it."""
        return os.path.basename(self.samples[index][0])[: -len("_leftImg8bit.png")]

    def output_path(self, index):
        """Where save_dir puts this frame's prediction, relative to save_dir/KIND/: CITY/NAME.png."""
        name = self.name(index)
        return os.path.join(name.split("_")[0], name + ".png")
