import os
import sys
import threading
import time

import cv2
import numpy as np
import pytest
import torch
from conftest import PALETTE, colorize

import datasets
import demo
import export
from checkpoint import load_for_inference
from configs import get_config
from datasets import class_table
from model import build_model, fold_batchnorm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(path, model in eval mode, config) of a random-weight synthetic-preset model, saved with its aux heads."""
    torch.manual_seed(0)
    cfg = get_config("synthetic")
    model = build_model(cfg, pretrained=False).eval()
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pth")
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path, model, cfg


def random_image(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def write_png(path, image_rgb):
    cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    return str(path)


def read_png(path):
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def hand_prediction(model, cfg, image_rgb):
    """argmax of the model's eval logits on the image normalized by the formula (x / 255 - mean) / std."""
    x = (image_rgb.astype(np.float64) / 255 - np.array(cfg.mean)) / np.array(cfg.std)
    x = torch.from_numpy(x.transpose(2, 0, 1)).float()[None]
    with torch.no_grad():
        return model(x)[0].argmax(0).numpy().astype(np.uint8)


def test_image_outputs_have_the_input_size_and_the_models_colors(checkpoint, tmp_path):
    path, model, cfg = checkpoint
    image = random_image((45, 70))
    out = tmp_path / "out"
    assert demo.main(["--ckpt", path, write_png(tmp_path / "street.png", image), "--out", str(out)]) == 0
    color, annotated = read_png(out / "street_color.png"), read_png(out / "street_overlay.png")
    expected = hand_prediction(model, cfg, image)
    assert len(np.unique(expected)) > 1  # a one-class prediction would hardly test the colors
    # both: the picture at the input's size on the left, the same legend strip (as tall) on the right
    assert color.shape == annotated.shape == (45, 70 + datasets.legend_layout(45, demo.CITYSCAPES.names)[-1], 3)
    assert np.array_equal(color[:, :70], colorize(expected))
    assert np.array_equal(color[:, 70:], datasets.legend(expected, 45, demo.CITYSCAPES))
    assert np.array_equal(annotated[:, 70:], color[:, 70:])
    blend = np.rint(0.5 * image + 0.5 * colorize(expected).astype(np.float64))
    assert np.abs(annotated[:, :70].astype(int) - blend).max() <= 1


def test_a_folder_of_two_images_writes_four_files(checkpoint, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    write_png(folder / "b.png", random_image((32, 48), 1))
    write_png(folder / "a.jpg", random_image((30, 40), 2))
    (folder / "notes.txt").write_text("not an image: skipped in a folder")
    out = tmp_path / "out"
    assert demo.main(["--ckpt", checkpoint[0], str(folder), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["a_color.png", "a_overlay.png", "b_color.png", "b_overlay.png"]


def read_video(path):
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


def write_video(path, frames_rgb, fps):
    """An MJPG .avi by OpenCV's own writer, which keeps odd sizes (its FFmpeg writer would cut them to even)."""
    h, w = frames_rgb[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for frame in frames_rgb:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.mark.parametrize("width, height", [(64, 40), (65, 41)])
def test_a_video_gives_videos_with_every_frame_at_the_input_size(checkpoint, tmp_path, width, height):
    path, model, cfg = checkpoint
    video = tmp_path / "drive.avi"
    write_video(video, [random_image((height, width), i) for i in range(6)], fps=10)
    decoded, _ = read_video(video)  # what demo.py reads: JPEG-compressed frames
    assert len(decoded) == 6 and decoded[0].shape == (height, width, 3)
    out = tmp_path / "out"
    assert demo.main(["--ckpt", path, str(video), "--out", str(out)]) == 0
    # OpenCV's mp4 writer would drop an odd last row or column: odd sizes must go to .avi
    extensions = (".avi",) if width % 2 or height % 2 else (".mp4", ".avi")
    written = sorted(os.listdir(out))
    assert written in [[f"drive_color{ext}", f"drive_overlay{ext}"] for ext in extensions], written
    legend_w = datasets.legend_layout(height, demo.CITYSCAPES.names)[-1]
    for name in written:
        frames, fps = read_video(out / name)
        expected_width = width + legend_w  # the legend strip to the right of both
        assert len(frames) == 6 and fps == pytest.approx(10)
        assert all(frame.shape == (height, expected_width, 3) for frame in frames), (name, frames[0].shape)
    # The color frames show the model's prediction where it belongs, up to compression loss. At an odd edge OpenCV's
    # MJPEG encoder averages the last chroma sample with empty pixels, which washes out the colors of the last one or
    # two rows / columns, but keeps their brightness: so colors are compared inside, brightness up to the edge.
    colors, _ = read_video(out / written[0])
    for frame, color in zip(decoded, (c[:, :width] for c in colors), strict=True):
        expected = cv2.cvtColor(colorize(hand_prediction(model, cfg, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))),
                                cv2.COLOR_RGB2BGR)
        wrong = np.abs(color[:-2, :-2].astype(int) - expected[:-2, :-2]).max(2) > 40  # compression: a few edges
        assert wrong.mean() < 0.15
        gray, expected_gray = (cv2.cvtColor(c, cv2.COLOR_BGR2GRAY).astype(int) for c in (color, expected))
        assert max(np.abs(gray - expected_gray)[edge].mean() for edge in (-1, (slice(None), -1))) < 10


def test_the_legend_lists_exactly_the_classes_present():
    train_ids = np.full((30, 40), 255, np.uint8)  # ignore: never listed
    train_ids[:5, :5], train_ids[10, 10:20], train_ids[-1, -1] = 13, 0, 18
    assert datasets.present_classes(train_ids, demo.CITYSCAPES.names) == [0, 13, 18]
    assert datasets.present_classes(torch.from_numpy(train_ids).long().numpy(), demo.CITYSCAPES.names) == [0, 13, 18]
    strip = datasets.legend(train_ids, 200, demo.CITYSCAPES)
    assert strip.shape == (200, datasets.legend_layout(200, demo.CITYSCAPES.names)[-1], 3)
    colors = {tuple(c) for c in strip.reshape(-1, 3)}
    # Swatches are drawn in the class colors; text is anti-aliased gray, so only non-gray colors can tell.
    for class_id, color in enumerate(map(tuple, PALETTE[:19])):
        if len(set(color)) > 1:
            assert (color in colors) == (class_id in (0, 13, 18)), class_id


def test_the_legend_keeps_its_width_whatever_the_classes():
    few, many = np.zeros((50, 8), np.uint8), np.arange(19, dtype=np.uint8).repeat(2).reshape(2, 19)
    # video frames must not change size
    assert datasets.legend(few, 50, demo.CITYSCAPES).shape == datasets.legend(many, 50, demo.CITYSCAPES).shape


@pytest.mark.parametrize("name, content", [("missing.png", None), ("notes.txt", "text"), ("fake.png", "text")])
def test_a_bad_input_is_an_error_naming_it(checkpoint, tmp_path, capsys, name, content):
    if content is not None:
        (tmp_path / name).write_text(content)
    assert demo.main(["--ckpt", checkpoint[0], str(tmp_path / name), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and name in err


def test_outputs_written_before_an_error_are_kept(checkpoint, tmp_path, capsys):
    good = write_png(tmp_path / "good.png", random_image((20, 30)))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert demo.main(["--ckpt", checkpoint[0], good, str(tmp_path / "bad.png"), "--out", str(out)]) == 2
    assert "bad.png" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["good_color.png", "good_overlay.png"]


def test_a_missing_or_mismatched_checkpoint_is_an_error_naming_it(checkpoint, tmp_path, capsys):
    image = write_png(tmp_path / "x.png", random_image((20, 30)))
    missing = str(tmp_path / "nope.pth")
    assert demo.main(["--ckpt", missing, image, "--out", str(tmp_path / "out")]) == 2
    assert missing in capsys.readouterr().err
    assert demo.main(["--ckpt", checkpoint[0], image, "num_classes=5", "--out", str(tmp_path / "out")]) == 2
    assert checkpoint[0] in capsys.readouterr().err


def test_a_folder_datasets_names_and_colors_reach_the_pictures_and_legend(tmp_path):
    torch.manual_seed(1)
    cfg = get_config("camvid")
    table = class_table(cfg)
    model = build_model(cfg, pretrained=False).eval()
    path = str(tmp_path / "camvid.pth")
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    image = random_image((40, 60), seed=3)
    out = tmp_path / "out"
    assert demo.main(["--ckpt", path, write_png(tmp_path / "frame.png", image), "--out", str(out)]) == 0
    expected = hand_prediction(model, cfg, image)
    color = read_png(out / "frame_color.png")[:, :60]  # the legend strip to its right
    assert np.mean(np.all(color == table.colors[expected], axis=-1)) >= 0.999
    # the legend: CamVid's colors for the classes present, sized for CamVid's names
    ids = np.array([[2, 10, 11]], np.uint8).repeat(3, 0)  # Pole, Bicyclist and a value past the classes
    strip = datasets.legend(ids, 120, table)
    assert strip.shape[1] == datasets.legend_layout(120, table.names)[-1]
    colors = {tuple(c) for c in strip.reshape(-1, 3)}
    for class_id, rgb in enumerate(map(tuple, table.colors.tolist())):
        if len(set(rgb)) > 1:  # gray ones (Sky) cannot be told from the anti-aliased text
            assert (rgb in colors) == (class_id in (2, 10)), table.names[class_id]
    assert datasets.present_classes(ids, table.names) == [2, 10]


@pytest.fixture(scope="module")
def exported(checkpoint):
    """model.onnx and model.xml next to the checkpoint, where export.py writes them by default."""
    model, _ = load_for_inference(checkpoint[0])
    onnx_path = export.export_onnx(fold_batchnorm(model), export.default_output(checkpoint[0], False),
                                   sample_hw=(64, 96))
    return onnx_path, export.export_openvino(onnx_path, export.openvino_paths(onnx_path)[0])


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_an_exported_file_gives_the_models_segmentation(checkpoint, exported, tmp_path, backend):
    path, model, cfg = checkpoint
    image = random_image((45, 70), seed=4)
    out = tmp_path / "out"
    assert demo.main(["--ckpt", path, write_png(tmp_path / "street.png", image), "--out", str(out),
                      f"backend={backend}"]) == 0
    expected = hand_prediction(model, cfg, image)
    assert len(np.unique(expected)) > 1
    assert np.mean(np.all(read_png(out / "street_color.png")[:, :70] == colorize(expected), axis=-1)) >= 0.999


def test_a_missing_backend_model_or_package_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    image = write_png(tmp_path / "x.png", random_image((20, 30)))
    missing = str(tmp_path / "nope.xml")
    assert demo.main(["--ckpt", checkpoint[0], image, "backend=openvino", f"backend_model={missing}",
                      "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: openvino model not found: {missing};") and err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert demo.main(["--ckpt", checkpoint[0], image, "backend=onnxruntime", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the onnxruntime package is needed") and err.count("\n") == 1
    assert err.strip().endswith("pip install -r requirements-deploy.txt")


def test_no_input_is_one_line_asking_for_one(capsys):
    with pytest.raises(SystemExit) as end:
        demo.main(["--ckpt", "model_final.pth"])
    assert end.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        " error: expected at least one INPUT (image, folder or video)")  # not "key=value are required"


def test_an_exported_file_of_other_classes_is_refused_before_any_picture(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = get_config("synthetic", ["num_classes=11"])
    eleven = tmp_path / "eleven"
    eleven.mkdir()
    torch.save({"model": build_model(cfg, pretrained=False).state_dict(), "config": cfg.to_dict()},
               eleven / "model.pth")
    model, _ = load_for_inference(str(eleven / "model.pth"))
    onnx_path = export.export_onnx(fold_batchnorm(model), str(eleven / "model.onnx"), sample_hw=(64, 96))
    cfg19 = get_config("synthetic")
    torch.save({"model": build_model(cfg19, pretrained=False).state_dict(), "config": cfg19.to_dict()},
               tmp_path / "model.pth")
    out = tmp_path / "out"
    assert demo.main(["--ckpt", str(tmp_path / "model.pth"), write_png(tmp_path / "street.png", random_image((45, 70))),
                      "--out", str(out), "backend=onnxruntime", f"backend_model={onnx_path}"]) == 2
    assert capsys.readouterr().err == (f"error: {onnx_path} outputs 11 classes, but the config has num_classes=19: it "
                                       "was exported from another model; export this checkpoint (python export.py "
                                       "--ckpt CKPT)\n")
    assert not out.exists() or not os.listdir(out)


@pytest.mark.parametrize("jobs", [1, 3])
def test_the_pipeline_writes_every_result_in_order_whatever_finishes_first(jobs):
    """Work that takes longer for earlier items (so that later ones finish first when run at once) still reaches the
    writer in the items' order, each once; at most `jobs` calls run at once."""
    running, most, written, lock = [0], [0], [], threading.Lock()

    def work(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002 * (10 - i % 10))
        with lock:
            running[0] -= 1
        return i * i

    assert demo.pipeline(iter(range(25)), work, written.append, jobs) == 25
    assert written == [i * i for i in range(25)] and most[0] <= jobs


def test_a_writer_or_work_error_stops_the_pipeline_with_that_error():
    def write(x):
        if x == 3:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        demo.pipeline(iter(range(10)), lambda i: i, write, jobs=2)
    with pytest.raises(ZeroDivisionError):
        demo.pipeline(iter(range(10)), lambda i: 1 // (i - 4), lambda x: None, jobs=2)
