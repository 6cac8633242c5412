"""Segment images, folders of images and videos with a BiSeNet checkpoint: colored maps and overlays.

    python demo.py --ckpt runs/NAME/model_final.pth INPUT [INPUT ...] [--out DIR] [--config NAME] [key=value ...]

For each INPUT NAME (an image, a folder of images or a video), DIR (default demo_out/) gets NAME_color and NAME_overlay
with a legend of the classes present (docs/deploy.md). backend=openvino or onnxruntime runs export.py's file.
"""

import argparse
import os
import re
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from checkpoint import CheckpointError, load_for_inference
from configs import ConfigError, add_config_args
from datasets import DatasetError, cityscapes_table, class_table, legend, read_image
from evaluate import predict_image, write_png
from model import inference_model
from runtime import BackendError, BackendModel, load_model

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv")
# (backend, fourcc, extension). OpenCV's FFmpeg writer cuts an odd width or height to even whatever the codec (65x41
# came out 64x40), so it gets even sizes only; OpenCV's own Motion JPEG writer keeps any size and is always built in.
MP4 = (cv2.CAP_FFMPEG, "mp4v", ".mp4")
MJPEG = (cv2.CAP_OPENCV_MJPEG, "MJPG", ".avi")
CITYSCAPES = cityscapes_table()
SUFFIXES = ("_color", "_overlay")  # of the outputs of render()


class DemoError(RuntimeError):
    """An input that cannot be read or an output that cannot be written."""


@torch.inference_mode()
def render(model, image_rgb, cfg, table, alpha=0.5):
    """(color picture, overlay) of an RGB uint8 image, each at its size with the legend strip of the classes present
    on the right; the overlay is (1 - alpha) * image + alpha * colors. `model`: inference_model's or a BackendModel
    (a labels file too: export.py --argmax)."""
    device = model.device if isinstance(model, BackendModel) else next(model.parameters()).device
    image = torch.from_numpy(np.ascontiguousarray(image_rgb))
    train_ids = predict_image(model, image, cfg, cfg.eval_mode, device).to(torch.uint8).cpu().numpy()
    colors, strip = table.colorize(train_ids), legend(train_ids, image_rgb.shape[0], table)
    blend = cv2.addWeighted(np.ascontiguousarray(image_rgb), 1 - alpha, colors, alpha, 0)  # rounded to uint8
    return (np.concatenate([colors, strip], axis=1), np.concatenate([blend, strip], axis=1))


def list_inputs(paths):
    """[(kind, path)] with kind "image" or "video", folders expanded; raises DemoError on a bad input."""
    items = []
    for path in paths:
        ext = os.path.splitext(path)[1].lower()
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path)
                           if os.path.splitext(n)[1].lower() in IMAGE_EXTS and os.path.isfile(os.path.join(path, n)))
            if not names:
                raise DemoError(f"no images in folder {path}: expected files ending in {' '.join(IMAGE_EXTS)}")
            items += [("image", os.path.join(path, n)) for n in names]
        elif not os.path.exists(path):
            raise DemoError(f"input not found: {path}")
        elif ext in IMAGE_EXTS or ext in VIDEO_EXTS:
            items.append(("image" if ext in IMAGE_EXTS else "video", path))
        else:
            raise DemoError(f"unsupported input {path}: expected an image ({' '.join(IMAGE_EXTS)}), "
                            f"a video ({' '.join(VIDEO_EXTS)}) or a folder of images")
    seen = {}  # outputs are named after the file name alone: two inputs of one name would overwrite each other
    for kind, path in items:
        other = seen.setdefault((kind, Path(path).stem), path)
        if other != path:
            raise DemoError(f"inputs {other} and {path} would both write {Path(path).stem}_*: rename one or run them "
                            "apart")
    return items


def open_writer(out_base, fps, size):
    """A cv2.VideoWriter of frames of `size` (W, H) at out_base + the extension of the first format that opens."""
    formats = (MP4, MJPEG) if size[0] % 2 == 0 and size[1] % 2 == 0 else (MJPEG,)
    for backend, codec, ext in formats:
        writer = cv2.VideoWriter(out_base + ext, backend, cv2.VideoWriter_fourcc(*codec), fps, size)
        if writer.isOpened():
            return writer
        writer.release()
    tried = " or ".join(f"{out_base}{ext} ({codec})" for _, codec, ext in formats)
    raise DemoError(f"cannot write video {tried} at {size[0]}x{size[1]}: check that the folder is writable")


def pipeline(items, work, write, jobs=1):
    """write(work(item)) for each item of the iterable `items`, in order, returning how many: `jobs` work calls run at
    once in threads while the main thread reads the next item, and a thread of its own writes, so that decoding,
    inference and writing overlap (OpenCV, PyTorch and the runtimes release the GIL)."""
    count = 0
    with ThreadPoolExecutor(jobs) as workers, ThreadPoolExecutor(1) as writer:
        computing, writing = deque(), deque()
        for item in items:
            computing.append(workers.submit(work, item))
            while len(computing) > jobs:  # one item read ahead of those computing
                writing.append(writer.submit(write, computing.popleft().result()))
            while writing and (len(writing) > jobs or writing[0].done()):
                writing.popleft().result()  # the writer's error, raised here
                count += 1
        for done in computing:
            writing.append(writer.submit(write, done.result()))
        for done in writing:
            done.result()
            count += 1
    return count


def read_frames(capture):
    """The BGR frames of an opened cv2.VideoCapture, as it decodes them."""
    while (frame := capture.read())[0]:
        yield frame[1]


def process_video(model, cfg, table, path, out_dir, jobs=1):
    """Write the color and overlay videos of `path`, `jobs` frames segmented at once (pipeline); the bar shows frames
    per second end to end."""
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise DemoError(f"cannot open video {path}: unreadable, or a codec this OpenCV cannot decode")
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps > 0 else 25.0  # where the header gives no frame rate (NaN too)
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None  # a header's estimate, for the bar only
    base, writers = os.path.join(out_dir, Path(path).stem), []

    def write(pictures):
        if not writers:  # opened at the first frame, whose size the header may not give
            writers.extend(open_writer(base + suffix, fps, picture.shape[1::-1])
                           for suffix, picture in zip(SUFFIXES, pictures, strict=True))
        for writer, picture in zip(writers, pictures, strict=True):
            writer.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        bar.update()

    try:
        with tqdm(total=total, desc=os.path.basename(path), unit="frame", dynamic_ncols=True) as bar:
            pipeline(read_frames(capture), lambda bgr: render(model, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), cfg, table),
                     write, jobs)
    finally:
        capture.release()
        for writer in writers:
            writer.release()
    if not writers:
        raise DemoError(f"video {path} has no readable frames")


def run(model, cfg, items, out_dir):
    """Write the outputs of every (kind, path) item in the class colors and names of the config's dataset; a video's
    frames as many at once as `model` runs at once (a BackendModel compiled for throughput: its `jobs`)."""
    os.makedirs(out_dir, exist_ok=True)
    table = class_table(cfg)
    images = [path for kind, path in items if kind == "image"]
    for path in tqdm(images, desc="images", unit="image", disable=len(images) < 2, dynamic_ncols=True):
        for suffix, picture in zip(SUFFIXES, render(model, read_image(path), cfg, table), strict=True):
            write_png(os.path.join(out_dir, f"{Path(path).stem}{suffix}.png"), picture[..., ::-1])  # RGB to BGR
    for path in (path for kind, path in items if kind == "video"):
        process_video(model, cfg, table, path, out_dir, model.run.jobs if isinstance(model, BackendModel) else 1)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="model_final.pth or last.pth of a run")
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    # "*", not "+": argparse would name key=value as missing too; an empty list is said below
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image, folder of images or video")
    args = add_config_args(parser).parse_intermixed_args(argv)
    # argparse cannot tell INPUTs from key=value overrides: a word shaped key=value is one unless such a file exists
    words = [*args.inputs, *args.overrides]
    args.overrides = [w for w in words if re.fullmatch(r"\w+=.*", w) and not os.path.exists(w)]
    args.inputs = [w for w in words if w not in args.overrides]
    if not args.inputs:
        parser.error("expected at least one INPUT (image, folder or video)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        items = list_inputs(args.inputs)  # every input checked before the model is loaded
        model, cfg = load_for_inference(args.ckpt, args.config, args.overrides)
        model = load_model(cfg, args.ckpt, model, throughput=any(kind == "video" for kind, _ in items))
        if not isinstance(model, BackendModel):
            model = inference_model(model, cfg.eval_amp, "cuda" if torch.cuda.is_available() else "cpu")
        run(model, cfg, items, args.out)
    except (ConfigError, CheckpointError, DatasetError, DemoError, BackendError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    print(f"wrote the outputs of {len(items)} input(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
