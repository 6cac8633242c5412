import os

import cv2
import numpy as np
import pytest

import ade20k
import cocostuff
from datasets import ClassTable, read_image, read_label_png

# Written out from the sources: ADE20K's labels 1..150 (objectInfo150), the COCO-Stuff README's 11 thing ids without
# annotations (labels.txt ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91, minus one in the stuffthingmaps).
COCO_UNUSED = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
COCO_IDS = [i for i in range(182) if i not in COCO_UNUSED]
ADE_EXPECTED = [255] + list(range(150)) + [-1] * 104 + [255]  # 0 ("other") and 255 ignored; 151..254 refused
COCO_EXPECTED = [COCO_IDS.index(v) if v in COCO_IDS else 255 if v in COCO_UNUSED else -1 for v in range(255)] + [255]
SIZES = [(14, 15), (16, 12), (13, 17)]  # (H, W), each at least 183 pixels: every label value fits in each label


def write_split(root, split, names, label_values):
    """Images NAME.jpg of mixed sizes and labels NAME.png holding every one of `label_values`, in the shared layout
    ROOT/images/{split}/ and ROOT/annotations/{split}/; written out of order."""
    for d in ("images", "annotations"):
        os.makedirs(os.path.join(root, d, split), exist_ok=True)
    for n, name in sorted(enumerate(names), key=lambda t: t[1], reverse=True):
        shape = SIZES[n % len(SIZES)]
        cv2.imwrite(os.path.join(root, "images", split, name + ".jpg"), np.full((*shape, 3), 40 * n, np.uint8))
        label = np.resize(np.roll(np.array(label_values, np.uint8), n), shape)
        cv2.imwrite(os.path.join(root, "annotations", split, name + ".png"), label)


ADE_TRAIN = ["ADE_train_00000001", "ADE_train_00000002", "ADE_train_00000010"]
ADE_VAL = ["ADE_val_00000001", "ADE_val_00000007"]
COCO_TRAIN = ["000000000009", "000000000025", "000000000030"]
COCO_VAL = ["000000000139", "000000000285"]


@pytest.fixture
def tiny_ade(tmp_path):
    root = str(tmp_path / "ADEChallengeData2016")
    write_split(root, "training", ADE_TRAIN, range(151))
    write_split(root, "validation", ADE_VAL, range(151))
    return root


@pytest.fixture
def tiny_coco(tmp_path):
    root = str(tmp_path / "cocostuff")
    write_split(root, "train2017", COCO_TRAIN, [*range(182), 255])
    write_split(root, "val2017", COCO_VAL, [*range(182), 255])
    return root


@pytest.mark.parametrize("module, fixture, splits", [
    (ade20k, "tiny_ade", {"training": ADE_TRAIN, "validation": ADE_VAL}),
    (cocostuff, "tiny_coco", {"train2017": COCO_TRAIN, "val2017": COCO_VAL}),
])
def test_find_samples_pairs_each_image_with_its_label_in_name_order(module, fixture, splits, request):
    root = request.getfixturevalue(fixture)
    assert tuple(splits) == module.SPLITS
    for split, names in splits.items():
        expected = [(os.path.join(root, "images", split, n + ".jpg"),
                     os.path.join(root, "annotations", split, n + ".png")) for n in names]
        assert module.find_samples(root, split) == expected
        assert module.find_samples(root, split, labels=False) == [(image, None) for image, _ in expected]
        assert [module.stem(image) for image, _ in expected] == names
    assert module.find_samples(root, "test") == []


@pytest.mark.parametrize("module, fixture, split, expected", [
    (ade20k, "tiny_ade", "training", ADE_EXPECTED),
    (cocostuff, "tiny_coco", "train2017", COCO_EXPECTED),
])
def test_label_files_map_as_the_written_out_table(module, fixture, split, expected, request):
    table = ClassTable(*module.table())
    for n, (image_path, label_path) in enumerate(module.find_samples(request.getfixturevalue(fixture), split)):
        image = read_image(image_path)
        assert image.shape == (*SIZES[n], 3)
        raw = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
        class_ids = table.to_class_ids(read_label_png(label_path, image.shape[:2]), label_path)
        np.testing.assert_array_equal(class_ids, np.array(expected)[raw])


def test_ade20k_lookup_and_values():
    names, colors, lookup, values = ade20k.table()
    assert lookup.shape == (256,) and lookup.dtype == np.int16 and lookup.tolist() == ADE_EXPECTED
    assert lookup[1] == 0 and lookup[150] == 149
    assert values.shape == (256,) and values.dtype == np.uint8
    assert values[:150].tolist() == list(range(1, 151)) and values[255] == 0  # ignore -> "other"
    assert all(lookup[values[c]] == c for c in range(150))


def test_cocostuff_lookup_and_values():
    names, colors, lookup, values = cocostuff.table()
    assert lookup.shape == (256,) and lookup.dtype == np.int16 and lookup.tolist() == COCO_EXPECTED
    assert (lookup[0], lookup[10], lookup[12], lookup[181]) == (0, 10, 11, 170)
    assert all(lookup[v] == 255 for v in [*COCO_UNUSED, 255])
    assert values.shape == (256,) and values.dtype == np.uint8
    assert values[:171].tolist() == COCO_IDS and values[255] == 255
    assert all(lookup[values[c]] == c for c in range(171))


def test_ade20k_names_and_palette():
    names, colors, _, _ = ade20k.table()
    assert len(names) == 150 and names[:4] == ("wall", "building", "sky", "floor") and names[-1] == "flag"
    assert names[7] == "bed" and names[12] == "person"  # mmsegmentation writes "bed " with a trailing space
    assert colors.shape == (150, 3) and colors.dtype == np.uint8
    assert tuple(colors[0]) == (120, 120, 120) and tuple(colors[2]) == (6, 230, 230)  # wall, sky
    assert tuple(colors[-1]) == (92, 0, 255)  # flag


def test_cocostuff_names_and_palette():
    names, colors, _, _ = cocostuff.table()
    assert len(names) == 171 and names[0] == "person" and names[-1] == "wood"
    # stuffthingmaps id = labels.txt id - 1: id 12 is "stop sign" (class 11), 91 "banner" (class 80)
    assert names[11] == "stop sign" and names[80] == "banner" and names[170] == "wood"
    assert colors.shape == (171, 3) and colors.dtype == np.uint8
    assert tuple(colors[0]) == (0, 192, 64) and tuple(colors[2]) == (0, 64, 96) and tuple(colors[-1]) == (64, 64, 0)


@pytest.mark.parametrize("module, root, split, url", [
    (ade20k, "data/ADEChallengeData2016", "validation", "ADEChallengeData2016.zip"),
    (cocostuff, "data/cocostuff", "val2017", "stuffthingmaps_trainval2017.zip"),
])
def test_layout_help_names_the_folders_and_the_download(module, root, split, url):
    text = module.layout_help(root, split)
    assert f"{root}/images/{split}/" in text and f"{root}/annotations/{split}/" in text and url in text
