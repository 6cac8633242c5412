"""The COCO-Stuff 164k label table and file layout (COCO 2017 images and stuffthingmaps_trainval2017 labels, unzipped
as the COCO-Stuff README does); datasets.py builds the dataset on them.

    ROOT/images/{split}/NNNNNNNNNNNN.jpg
    ROOT/annotations/{split}/NNNNNNNNNNNN.png    0..181: COCO-Stuff ids (its labels.txt id - 1), 255: unlabeled

The split names are the folder names, `train2017` and `val2017` (train_split=train2017, val_split=val2017).
171 classes: the 182 ids without the 11 thing ids that COCO never annotated (UNUSED, ignored like 255), in id order.
The names and colors (classes/cocostuff.csv) are those of mmsegmentation's COCOStuffDataset.
"""

import csv
import os
from glob import glob

import numpy as np

SPLITS = ("train2017", "val2017")
CLASSES_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classes", "cocostuff.csv")
# street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door, blender, hair brush
UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
UNLABELED = 255


def find_samples(root, split, labels=True):
    """Sorted (image path, label path) pairs of the images of a split, whether or not the label file exists (None
    where labels=False)."""
    images = sorted(glob(os.path.join(root, "images", split, "*.jpg")))
    return [(path, os.path.join(root, "annotations", split, stem(path) + ".png") if labels else None)
            for path in images]


def stem(image_path):
    """The COCO image id as its file names write it (000000000139): the file name without extension."""
    return os.path.splitext(os.path.basename(image_path))[0]


def layout_help(root, split):
    return (
        f"expected COCO-Stuff under {root} (split {split!r}; the splits are {' and '.join(SPLITS)}):\n"
        f"    {root}/images/{split}/NNNNNNNNNNNN.jpg\n"
        f"    {root}/annotations/{split}/NNNNNNNNNNNN.png\n"
        "To get it (https://github.com/nightrome/cocostuff#downloads): download the COCO 2017 images and the labels,\n"
        "    http://images.cocodataset.org/zips/train2017.zip and val2017.zip\n"
        "    http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip\n"
        "and unzip them:\n"
        f"    unzip train2017.zip -d {root}/images/ && unzip val2017.zip -d {root}/images/\n"
        f"    unzip stuffthingmaps_trainval2017.zip -d {root}/annotations/\n"
        "or pass data_root=PATH."
    )


def table():
    """(names, colors, lookup, values) of datasets.ClassTable: the ids of classes/cocostuff.csv are classes 0..170 in
    order; UNUSED and 255 are ignored (255), 182..254 are outside the table (-1); the ignore id is written as 255."""
    with open(CLASSES_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [int(row["id"]) for row in rows]
    names = tuple(row["name"] for row in rows)
    colors = np.array([[int(row[k]) for k in "rgb"] for row in rows], np.uint8)
    lookup = np.full(256, -1, np.int16)
    lookup[[*UNUSED, UNLABELED]] = 255
    lookup[ids] = np.arange(len(ids))
    values = np.full(256, UNLABELED, np.uint8)
    values[: len(ids)] = ids
    return names, colors, lookup, values
