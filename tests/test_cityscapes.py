import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import PALETTE, write_frame

from configs import get_config
from datasets import DatasetError, build_dataset, cityscapes_table

# labelId -> trainId, written out from the official cityscapesScripts table; every other id is ignored.
OFFICIAL = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
            27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
OFFICIAL_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                  "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                  "bicycle")


def Cityscapes(root, split, *overrides):
    return build_dataset(get_config("cityscapes", [f"data_root={root}", *overrides]), split)


def test_every_label_value_maps_as_the_official_table():
    # every value a uint8 PNG can hold (the license plate's id, -1, cannot occur there)
    values = np.arange(256, dtype=np.uint8)
    assert cityscapes_table().to_class_ids(values, "x.png").tolist() == [OFFICIAL.get(i, 255) for i in range(256)]


def test_train_ids_map_back_to_label_ids_and_names():
    table, train_ids = cityscapes_table(), np.arange(19)
    assert table.to_values(train_ids).tolist() == [k for k, _ in sorted(OFFICIAL.items(), key=lambda t: t[1])]
    assert table.to_class_ids(table.to_values(train_ids), "x.png").tolist() == train_ids.tolist()
    assert table.names == OFFICIAL_NAMES


def test_colorize_uses_the_official_colors_and_black_for_ignore():
    train_ids = np.array([list(range(10)), list(range(10, 19)) + [255]], np.uint8)
    rgb = cityscapes_table().colorize(train_ids)
    assert rgb.shape == (2, 10, 3) and rgb.dtype == np.uint8
    for (r, c), tid in np.ndenumerate(train_ids):
        assert tuple(rgb[r, c]) == tuple(PALETTE[tid])


def test_each_image_is_paired_with_its_own_label(tmp_path):
    # Every frame's image and label encode the frame's number: a label paired with another frame's image shows.
    root = str(tmp_path)
    frames = [("aachen", 0), ("aachen", 1), ("aachen", 2), ("bochum", 0), ("bochum", 5)]
    for n, (city, index) in enumerate(frames):
        write_frame(root, "train", city, index, np.full((6, 8, 3), 10 * n, np.uint8),
                    np.full((6, 8), list(OFFICIAL)[n], np.uint8))
    ds = Cityscapes(root, "train")
    assert [ds.name(i) for i in range(len(ds))] == [f"{c}_{i:06d}_000019" for c, i in frames]
    for n in range(len(frames)):
        image, label = ds[n]
        assert (image == 10 * n).all() and (label == n).all(), f"frame {n} is paired with another frame's label"


def test_dataset_pairs_images_with_labels_and_maps_them(tiny_cityscapes):
    ds = Cityscapes(tiny_cityscapes, "train")
    assert len(ds) == 4
    names = [ds.name(i) for i in range(len(ds))]
    assert names == sorted(names) and names[0] == "aachen_000000_000019"
    for i in range(len(ds)):
        image, label = ds[i]
        img_path, lbl_path = ds.samples[i]
        assert image.shape == (24, 40, 3) and image.dtype == np.uint8
        assert label.shape == (24, 40) and label.dtype == np.int64
        # Independent read: cv2 BGR -> RGB, labelIds -> train ids through the dict above.
        np.testing.assert_array_equal(image, cv2.imread(img_path)[..., ::-1])
        raw = cv2.imread(lbl_path, cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(label, np.vectorize(lambda v: OFFICIAL.get(int(v), 255))(raw))


def test_test_split_loads_images_only(tmp_path):
    root = str(tmp_path)
    write_frame(root, "test", "berlin", 0, np.zeros((8, 12, 3), np.uint8))
    image, label = Cityscapes(root, "test")[0]
    assert image.shape == (8, 12, 3)
    assert (label == 255).all() and label.shape == (8, 12)


def test_missing_root_explains_layout_download_and_synthetic(tmp_path):
    with pytest.raises(DatasetError) as err:
        Cityscapes(str(tmp_path / "nowhere"), "train")
    msg = str(err.value)
    assert "nowhere" in msg and "leftImg8bit/train" in msg and "gtFine_trainvaltest.zip" in msg
    assert "--config synthetic" in msg


def test_missing_split_is_an_error(tiny_cityscapes):
    with pytest.raises(DatasetError, match="leftImg8bit/test"):
        Cityscapes(tiny_cityscapes, "test")


def test_image_without_label_names_both_files(tmp_path):
    root = str(tmp_path)
    write_frame(root, "val", "lindau", 0, np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    img, _ = write_frame(root, "val", "lindau", 1, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError) as err:
        Cityscapes(root, "val")
    assert img in str(err.value) and "lindau_000001_000019_gtFine_labelIds.png" in str(err.value)


def test_label_of_other_size_is_an_error(tmp_path):
    root = str(tmp_path)
    _, lbl = write_frame(root, "val", "lindau", 0, np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8))
    with pytest.raises(DatasetError, match="8x9 but its image is 8x8") as err:
        Cityscapes(root, "val")[0]
    assert lbl in str(err.value)


def test_color_label_is_an_error(tmp_path):
    root = str(tmp_path)
    _, lbl = write_frame(root, "val", "lindau", 0, np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="3-channel uint8; expected a single-channel") as err:
        Cityscapes(root, "val")[0]
    assert lbl in str(err.value)


def test_unreadable_label_is_an_error(tmp_path):
    root = str(tmp_path)
    _, lbl = write_frame(root, "val", "lindau", 0, np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    with open(lbl, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(DatasetError, match="is not a PNG file") as err:
        Cityscapes(root, "val")[0]
    assert lbl in str(err.value)


def test_a_jpeg_under_a_png_label_name_is_an_error(tmp_path):
    # read as it is, about 29% of its label pixels would change silently
    root = str(tmp_path)
    _, lbl = write_frame(root, "val", "lindau", 0, np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    ok, data = cv2.imencode(".jpg", np.full((8, 8), 26, np.uint8))
    with open(lbl, "wb") as f:
        f.write(data.tobytes())
    with pytest.raises(DatasetError, match="is not a PNG file .*JPEG") as err:
        Cityscapes(root, "val")[0]
    assert lbl in str(err.value)


def test_labels_beyond_num_classes_are_refused_naming_the_file(tmp_path):
    root = str(tmp_path)
    label = np.full((8, 8), 7, np.uint8)  # road, train id 0
    label[0, 0] = 26  # car, train id 13
    _, lbl = write_frame(root, "val", "lindau", 0, np.zeros((8, 8, 3), np.uint8), label)
    assert Cityscapes(root, "val", "num_classes=14")[0][1].max() == 13
    with pytest.raises(DatasetError, match=r"values outside the class table: 26 \(1 px\).*check num_classes") as err:
        Cityscapes(root, "val", "num_classes=5")[0]
    assert lbl in str(err.value)


def test_16bit_label_is_an_error(tmp_path):
    root = str(tmp_path)
    _, lbl = write_frame(root, "val", "lindau", 0, np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    cv2.imwrite(lbl, np.zeros((8, 8), np.uint16))
    with pytest.raises(DatasetError, match="uint16"):
        Cityscapes(root, "val")[0]


@pytest.mark.parametrize("module", ["configs", "cityscapes", "transform", "synthetic", "resnet", "model", "loss",
                                    "optimizer", "distributed", "train", "evaluate", "demo", "export", "benchmark",
                                    "datasets", "check_data", "plots"])
def test_import_has_no_side_effects(module, tmp_path):
    out = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and list(tmp_path.iterdir()) == []
