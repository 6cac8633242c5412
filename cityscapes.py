"""The Cityscapes label table and file layout (which files make a split); datasets.py builds the dataset on them.

    ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png
"""

import os
from collections import namedtuple
from glob import glob

IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"

Label = namedtuple("Label", "name id train_id color")

# The official table (cityscapesScripts labels.py): name, labelId, trainId (255: ignored), RGB color.
LABELS = (
    Label("unlabeled", 0, 255, (0, 0, 0)),
    Label("ego vehicle", 1, 255, (0, 0, 0)),
    Label("rectification border", 2, 255, (0, 0, 0)),
    Label("out of roi", 3, 255, (0, 0, 0)),
    Label("static", 4, 255, (0, 0, 0)),
    Label("dynamic", 5, 255, (111, 74, 0)),
    Label("ground", 6, 255, (81, 0, 81)),
    Label("road", 7, 0, (128, 64, 128)),
    Label("sidewalk", 8, 1, (244, 35, 232)),
    Label("parking", 9, 255, (250, 170, 160)),
    Label("rail track", 10, 255, (230, 150, 140)),
    Label("building", 11, 2, (70, 70, 70)),
    Label("wall", 12, 3, (102, 102, 156)),
    Label("fence", 13, 4, (190, 153, 153)),
    Label("guard rail", 14, 255, (180, 165, 180)),
    Label("bridge", 15, 255, (150, 100, 100)),
    Label("tunnel", 16, 255, (150, 120, 90)),
    Label("pole", 17, 5, (153, 153, 153)),
    Label("polegroup", 18, 255, (153, 153, 153)),
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
    Label("caravan", 29, 255, (0, 0, 90)),
    Label("trailer", 30, 255, (0, 0, 110)),
    Label("train", 31, 16, (0, 80, 100)),
    Label("motorcycle", 32, 17, (0, 0, 230)),
    Label("bicycle", 33, 18, (119, 11, 32)),
    Label("license plate", -1, 255, (0, 0, 142)),
)



def find_samples(root, split, labels=True):
    """Sorted (image path, label path or None) pairs of a split, whether or not the label file exists."""
    images = sorted(glob(os.path.join(root, "leftImg8bit", split, "*", "*" + IMAGE_SUFFIX)))
    return [(path, os.path.join(root, "gtFine", split, stem(path) + LABEL_SUFFIX) if labels else None)
            for path in images]


def stem(image_path):
    """CITY/NAME of an image, NAME being {city}_{seq}_{frame}: how the official toolkit matches predictions."""
    city = os.path.basename(os.path.dirname(image_path))
    return os.path.join(city, os.path.basename(image_path)[: -len(IMAGE_SUFFIX)])


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
