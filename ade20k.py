"""The ADE20K (SceneParsing, ADEChallengeData2016) label table and file layout; datasets.py builds the dataset on them.

    ROOT/images/{split}/ADE_{split}_NNNNNNNN.jpg
    ROOT/annotations/{split}/ADE_{split}_NNNNNNNN.png    0: "other" (ignored), 1..150: classes 0..149

The split names are the folder names, `training` and `validation` (train_split=training, val_split=validation).
The 150 names and colors (classes/ade20k.csv) are those of mmsegmentation's ADE20KDataset.
"""

import csv
import os
from glob import glob

import numpy as np

SPLITS = ("training", "validation")
CLASSES_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classes", "ade20k.csv")
OTHER = 0  # the label value of unannotated pixels: ignored, and what save_dir writes for the ignore id


def find_samples(root, split, labels=True):
    """Sorted (image path, label path) pairs of the images of a split, whether or not the label file exists (None
    where labels=False)."""
    images = sorted(glob(os.path.join(root, "images", split, "*.jpg")))
    return [(path, os.path.join(root, "annotations", split, stem(path) + ".png") if labels else None)
            for path in images]


def stem(image_path):
    """ADE_{split}_NNNNNNNN: the file name without extension, as the label and the prediction are named."""
    return os.path.splitext(os.path.basename(image_path))[0]


def layout_help(root, split):
    parent = os.path.dirname(os.path.normpath(root)) or "."
    return (
        f"expected ADE20K under {root} (split {split!r}; the splits are {' and '.join(SPLITS)}):\n"
        f"    {root}/images/{split}/ADE_*.jpg\n"
        f"    {root}/annotations/{split}/ADE_*.png\n"
        "To get it: download http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip and unzip it\n"
        f"in {parent}/ (the zip holds the ADEChallengeData2016/ folder), or pass data_root=PATH."
    )


def table():
    """(names, colors, lookup, values) of datasets.ClassTable: label value v is class v-1; 0 ("other") and 255 (the
    ignore value of this code base) are ignored (255), 151..254 are outside the table (-1); class c is written back as
    c+1, the ignore id as 0."""
    with open(CLASSES_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [int(row["id"]) for row in rows]
    names = tuple(row["name"] for row in rows)
    colors = np.array([[int(row[k]) for k in "rgb"] for row in rows], np.uint8)
    lookup = np.full(256, -1, np.int16)
    lookup[[OTHER, 255]] = 255
    lookup[ids] = np.arange(len(ids))
    values = np.full(256, OTHER, np.uint8)
    values[: len(ids)] = ids
    return names, colors, lookup, values
