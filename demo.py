"""Segment images, folders of images and videos with a BiSeNet checkpoint: colored maps and overlays.

    python demo.py --ckpt runs/NAME/model_final.pth INPUT [INPUT ...] [--out DIR] [--config NAME] [key=value ...]

An INPUT is an image (.png .jpg .jpeg .bmp), a folder (its images, sorted, not its subfolders) or a video
(.mp4 .avi .mov .mkv). For each image NAME, DIR (default demo_out/) gets:

    NAME_color.png     the segmentation in the dataset's class colors
    NAME_overlay.png   the input blended with the segmentation (alpha 0.5)

each at the input's size with a legend strip on the right listing the classes present: as tall as the input, input
width + strip width (evaluate.py save_dir=DIR writes maps of the input's size alone). For each video NAME:
NAME_color.mp4 and NAME_overlay.mp4, same fps, frames as above. Where the input's width or height
is odd, or where this OpenCV cannot write mp4v, they are Motion JPEG .avi files instead (NAME_color.avi,
NAME_overlay.avi): OpenCV's mp4 writer would drop the odd last row or column.

The model and the inference mode (eval_mode, default ss) come from the config stored in the checkpoint, or from
--config NAME; key=value overrides go on top (mode=msf works too). backend=openvino or backend=onnxruntime runs the
file export.py wrote from the checkpoint instead (backend_model=FILE; default model.xml / model.onnx next to it), on
the CPU.
"""

import argparse
import os
import re
import sys

import cv2
import numpy as np
import torch
from tqdm import tqdm

from checkpoint import CheckpointError, load_for_inference
from cityscapes import DatasetError, read_image
from configs import ConfigError, add_config_args
from datasets import cityscapes_table, class_table, legend
from evaluate import predict, write_png
from model import inference_model
from runtime import BackendError, BackendModel, load_model
from transform import normalize

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv")
# (backend, fourcc, extension) tried in order. OpenCV's FFmpeg writer truncates an odd width or height to even
# whatever the codec (a 65x41 video came out 64x40), so it only gets frames of even size; OpenCV's own Motion JPEG
# writer keeps any size and is always built in.
MP4 = (cv2.CAP_FFMPEG, "mp4v", ".mp4")
MJPEG = (cv2.CAP_OPENCV_MJPEG, "MJPG", ".avi")
DEFAULT_FPS = 25.0  # for a video whose header gives no frame rate
CITYSCAPES = cityscapes_table()



class DemoError(RuntimeError):
    pass


# ---- pictures ----

@torch.inference_mode()
def segment(model, image_rgb, cfg):
    """Train ids (H, W) uint8 of an RGB uint8 image (H, W, 3) of any size; `model` from inference_model (eval), or a
    runtime.BackendModel."""
    device = model.device if isinstance(model, BackendModel) else next(model.parameters()).device
    image = normalize(torch.from_numpy(np.ascontiguousarray(image_rgb))[None].to(device), cfg.mean, cfg.std)
    return predict(model, image, cfg, cfg.eval_mode).to(torch.uint8).cpu().numpy()


def overlay(image_rgb, train_ids, table=CITYSCAPES, alpha=0.5):
    """The image blended with its segmentation colors: (1 - alpha) * image + alpha * colors, RGB uint8."""
    blend = (1 - alpha) * image_rgb.astype(np.float32) + alpha * table.colorize(train_ids).astype(np.float32)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def render(model, image_rgb, cfg, table):
    """(color picture, overlay) of one RGB image, both RGB uint8 in the colors of `table`, each at the input's size
    with the legend strip of the classes present to its right."""
    train_ids = segment(model, image_rgb, cfg)
    strip = legend(train_ids, image_rgb.shape[0], table)
    return (np.concatenate([table.colorize(train_ids), strip], axis=1),
            np.concatenate([overlay(image_rgb, train_ids, table), strip], axis=1))


# ---- inputs and outputs ----

def list_inputs(paths):
    """[(kind, path)] with kind "image" or "video", folders expanded; raises DemoError on a bad input."""
    items = []
    for path in paths:
        ext = os.path.splitext(path)[1].lower()
        if os.path.isdir(path):
            items.extend(("image", p) for p in folder_images(path))
        elif not os.path.exists(path):
            raise DemoError(f"input not found: {path}")
        elif ext in IMAGE_EXTS or ext in VIDEO_EXTS:
            items.append(("image" if ext in IMAGE_EXTS else "video", path))
        else:
            raise DemoError(f"unsupported input {path}: expected an image ({' '.join(IMAGE_EXTS)}), "
                            f"a video ({' '.join(VIDEO_EXTS)}) or a folder of images")
    check_unique_names(items)
    return items


def folder_images(folder):
    names = sorted(n for n in os.listdir(folder)
                   if os.path.splitext(n)[1].lower() in IMAGE_EXTS and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise DemoError(f"no images in folder {folder}: expected files ending in {' '.join(IMAGE_EXTS)}")
    return [os.path.join(folder, n) for n in names]


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def check_unique_names(items):
    # Outputs are named after the input's file name alone: two inputs with one name would overwrite each other.
    seen = {}
    for kind, path in items:
        other = seen.setdefault((kind, stem(path)), path)
        if other != path:
            raise DemoError(f"inputs {other} and {path} would both write {stem(path)}_*: rename one or run them apart")


def video_formats(size):
    """The (backend, fourcc, extension) choices for frames of `size` (W, H), best first: each keeps that size."""
    return (MP4, MJPEG) if size[0] % 2 == 0 and size[1] % 2 == 0 else (MJPEG,)


def open_writer(out_base, fps, size):
    """A cv2.VideoWriter for out_base + the extension of the first format of video_formats(size) that opens."""
    formats = video_formats(size)
    for backend, codec, ext in formats:
        writer = cv2.VideoWriter(out_base + ext, backend, cv2.VideoWriter_fourcc(*codec), fps, size)
        if writer.isOpened():
            return writer
        writer.release()
    tried = " or ".join(f"{out_base}{ext} ({codec})" for _, codec, ext in formats)
    raise DemoError(f"cannot write video {tried} at {size[0]}x{size[1]}: check that the folder is writable")


def process_image(model, cfg, table, path, out_dir):
    color, annotated = render(model, read_image(path), cfg, table)
    base = os.path.join(out_dir, stem(path))
    write_png(base + "_color.png", color[..., ::-1])  # RGB to OpenCV's BGR
    write_png(base + "_overlay.png", annotated[..., ::-1])


def process_video(model, cfg, table, path, out_dir):
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise DemoError(f"cannot open video {path}: unreadable, or a codec this OpenCV cannot decode")
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps > 0 else DEFAULT_FPS  # also catches NaN
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None  # a header's estimate, for the bar only
    base, writers = os.path.join(out_dir, stem(path)), None
    try:
        with tqdm(total=total, desc=os.path.basename(path), unit="frame", dynamic_ncols=True) as bar:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                color, annotated = render(model, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), cfg, table)
                if writers is None:  # opened at the first frame, whose size the header may not give
                    writers = [open_writer(base + "_color", fps, color.shape[1::-1]),
                               open_writer(base + "_overlay", fps, annotated.shape[1::-1])]
                for writer, picture in zip(writers, (color, annotated), strict=True):
                    writer.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
                bar.update()
    finally:
        capture.release()
        for writer in writers or ():
            writer.release()
    if writers is None:
        raise DemoError(f"video {path} has no readable frames")


def run(model, cfg, items, out_dir):
    """Write the outputs of every (kind, path) item; a bar over a folder's images and over a video's frames. Class
    names and colors are those of the config's dataset."""
    os.makedirs(out_dir, exist_ok=True)
    table = class_table(cfg)
    images = [path for kind, path in items if kind == "image"]
    for path in tqdm(images, desc="images", unit="image", disable=len(images) < 2, dynamic_ncols=True):
        process_image(model, cfg, table, path, out_dir)
    for path in (path for kind, path in items if kind == "video"):
        process_video(model, cfg, table, path, out_dir)


# ---- command line ----

def split_arguments(args):
    # argparse cannot tell INPUTs from key=value overrides (both positional): a word shaped key=value is an
    # override unless a file of that name exists.
    words = [*args.inputs, *args.overrides]
    args.overrides = [w for w in words if re.fullmatch(r"\w+=.*", w) and not os.path.exists(w)]
    args.inputs = [w for w in words if w not in args.overrides]
    return args


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="model_final.pth or last.pth of a run")
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    # "*", not "+": argparse would name key=value as missing too; an empty list is said below
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image, folder of images or video")
    args = split_arguments(add_config_args(parser).parse_intermixed_args(argv))
    if not args.inputs:
        parser.error("expected at least one INPUT (image, folder or video)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        items = list_inputs(args.inputs)  # every input checked before the model is loaded
        model, cfg = load_for_inference(args.ckpt, args.config, args.overrides)
        model = load_model(cfg, args.ckpt, model)
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
