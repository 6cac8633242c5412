"""Export a BiSeNet checkpoint to ONNX (and OpenVINO, INT8) for deployment, and check the files against PyTorch.

    python export.py --ckpt runs/NAME/model_final.pth [--output FILE.onnx] [--argmax [--labels-upsample bilinear]]
                     [--no-fold] [--opset 17] [--openvino] [--int8 [--calib-size 300] [--check-size 50]]
                     [--config NAME] [key=value ...]

Input "image": float32 (N, 3, H, W), normalized as in training, any size; output "logits" (N, C, H, W). With --argmax
the labels model: input "image" uint8 (N, H, W, 3), BGR as OpenCV decodes it, normalized in the graph; output
"labels" uint8 (N, H, W). docs/deploy.md has the details. Packages: requirements-deploy.txt.
"""

import argparse
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, load_for_inference
from configs import ConfigError, add_config_args
from datasets import DatasetError
from evaluate import confusion_update, eval_dataset, iou_from_confusion
from layers import resize
from model import fold_batchnorm
from runtime import BackendError, onnxruntime_runner, openvino_runner, require, signal_stack_kept
from transform import normalize

MIN_OPSET = 17  # the oldest opset this export is verified with
# Odd sizes other than the export size, so that a size frozen into the graph during tracing would show.
VERIFY_SIZES = ((199, 393), (321, 655))
# Float32 rounding differs between runtimes and grows with the logits: measured 8e-6 at logits up to 10, 1.4e-6 times
# the largest logit beyond. A flat 1e-4 would fail a correct export of a model with large logits.
ATOL, RTOL = 1e-4, 1e-5
MIN_AGREEMENT = 0.999  # pixels whose two best logits tie within that rounding may flip class
MIN_INT8_AGREEMENT = 0.9  # INT8 moves logits by far more than rounding; below this the quantization went wrong
CALIB_SEED = 0  # the order calibration and check images are taken in: the same at every export


class ExportError(BackendError):
    """An export that cannot be done or a file that does not match PyTorch."""


# the labels model's ways to the frame's size (LabelsModel); the first is --labels-upsample's default
LABELS_UPSAMPLES = ("half", "bilinear", "nearest")


class LabelsModel(nn.Module):
    """What export.py --argmax writes: uint8 BGR frames (N, H, W, 3), as OpenCV decodes them, to uint8 class ids
    (N, H, W). The channel order, / 255 and mean/std are the graph's first ops, computed as transform.normalize does
    (folding them into the first convolution would change its zero padding); the order is reversed by a Gather, as a
    Slice of step -1 (Tensor.flip) runs in OpenVINO's reference kernel: 10 ms a 512x1024 frame on 2 AMX cores.
    `upsample` "bilinear": the logits resized to the frame, then the argmax (evaluate.py's ss mode); "half": the
    logits resized (bilinear) to half the frame's size, rounded up, the argmax there, and each label copied to its 2x2
    pixels: a quarter of the resize and the argmax, boundaries on a 2-pixel grid; "nearest": the argmax at the head's
    1/8 size, the labels resized (nearest): the argmax over 64 times fewer pixels, boundaries on an 8-pixel grid."""

    def __init__(self, model, mean, std, upsample=LABELS_UPSAMPLES[0]):
        super().__init__()
        if upsample not in LABELS_UPSAMPLES:
            raise ExportError(f"labels upsample {upsample!r}: expected one of {', '.join(LABELS_UPSAMPLES)}")
        if (classes := model.arch["num_classes"]) > 255:
            raise ExportError(f"a labels model gives uint8 class ids, but the model has {classes} classes: expected "
                              "at most 255; export its logits (without --argmax)")
        self.model, self.mean, self.std, self.upsample = model, mean, std, upsample
        self.train(model.training)

    def forward(self, frames):
        x = normalize(frames[..., [2, 1, 0]], self.mean, self.std)  # BGR -> RGB, as the model was trained
        if self.upsample == "bilinear":
            return self.model(x).argmax(1).to(torch.uint8)
        logits = self.model(x, resize_logits=False)
        if self.upsample == "nearest":
            labels = logits.argmax(1).to(torch.uint8)
            return F.interpolate(labels[:, None], size=frames.shape[1:3], mode="nearest")[:, 0]
        height, width = frames.shape[1:3]
        h, w = (height + 1) // 2, (width + 1) // 2
        labels = resize(logits, (h, w), "bilinear").argmax(1).to(torch.uint8)
        # copied by a broadcast, not a nearest resize: with a resize after it, OpenVINO runs the argmax over
        # channels-last bf16 logits, several times slower than over the planar f32 ones it reorders them to here
        n = labels.shape[0]
        return labels[:, :, None, :, None].expand(n, h, 2, w, 2).reshape(n, 2 * h, 2 * w)[:, :height, :width]


def export_onnx(model, path, opset=17, sample_hw=(256, 512)):
    """Write `model` (eval mode, folded or not; a LabelsModel for a labels file) to the ONNX file `path`, traced at
    `sample_hw`; returns `path`."""
    onnx = require("onnx")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: expected {MIN_OPSET} or newer")
    if model.training:
        raise ExportError("export_onnx needs a model in eval mode (model.eval()): training mode returns a tuple")
    device = next(model.parameters()).device
    if isinstance(model, LabelsModel):
        output = "labels"
        image_axes = output_axes = {0: "batch", 1: "height", 2: "width"}
        sample = torch.randint(0, 256, (1, *sample_hw, 3), dtype=torch.uint8, device=device)
    else:
        output = "logits"
        image_axes = output_axes = {0: "batch", 2: "height", 3: "width"}
        sample = torch.randn(1, 3, *sample_hw, device=device)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # The TorchScript exporter (dynamo=False): the torch.export one needs onnxscript, not a requirement. Tracing
    # records the sizes read from x.shape as Shape/Gather ops, so they follow the input at run time.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # "the legacy exporter": the choice made above
        warnings.filterwarnings("ignore", "Exporting to ONNX opset version")  # an opset it lacks: ExportError below
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # normalize's mean and std: constants
        try:
            torch.onnx.export(model, (sample,), path, dynamo=False, opset_version=opset, input_names=["image"],
                              output_names=[output], dynamic_axes={"image": image_axes, output: output_axes})
        except RuntimeError as err:
            if "opset" not in str(err).lower():
                raise
            raise ExportError(f"--opset {opset}: {str(err).strip().splitlines()[0]}; expected {MIN_OPSET} or a "
                              "newer opset this torch exports") from None
    onnx.checker.check_model(path)
    return path


def export_openvino(onnx_path, path):
    """Convert the ONNX file to an OpenVINO IR at `path` (.xml + .bin) in fp32 (save_model's default halves it)."""
    ov = require("openvino")
    ov.save_model(ov.convert_model(onnx_path), path, compress_to_fp16=False)
    return path


class SplitImages:
    """Up to `size` whole images of `split` in a fixed shuffled order, read while iterated (300 Cityscapes frames hold
    7.5 GB), as the exported file takes them: normalized as evaluation does (arrays (1, 3, H, W)) or with `frames`
    uint8 BGR (1, H, W, 3) for a labels file. Whole frames: INT8 calibrated on them agreed with fp32 on 99.6% of CamVid
    val's pixels, calibrated on training crops 99.3%."""

    def __init__(self, cfg, split, size, frames=False, seed=CALIB_SEED):
        self.dataset, self.mean, self.std, self.frames = eval_dataset(cfg, split), cfg.mean, cfg.std, frames
        self.indices = [int(i) for i in np.random.default_rng(seed).permutation(len(self.dataset))[:size]]

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return (self.file_input(image) for image, _ in self.labelled())

    def labelled(self):
        """(uint8 RGB image (1, H, W, 3), int64 label (H, W)) tensors, in the order of iteration."""
        for i in self.indices:
            image, label = self.dataset[i]
            yield image[None], label.long()

    def normalized(self, image):
        return normalize(image, self.mean, self.std)

    def file_input(self, image):
        """The array the exported file takes for a labelled() image."""
        return np.ascontiguousarray(image.numpy()[..., ::-1]) if self.frames else self.normalized(image).numpy()


def quantize_int8(xml_path, path, images):
    """Write an INT8 copy of the OpenVINO IR `xml_path` at `path`, NNCF calibrated on `images` (SplitImages)."""
    ov, nncf = require("openvino"), require("nncf")
    # full bias correction: on CamVid val 99.75% agreement with fp32, not 99.65% (4x the quantization time, the same
    # inference speed); results/camvid/int8_calibration_val.json holds the choices measured
    with signal_stack_kept():  # NNCF compiles and runs the model on this thread
        quantized = nncf.quantize(ov.Core().read_model(xml_path), nncf.Dataset(images), subset_size=len(images),
                                  fast_bias_correction=False)
    ov.save_model(quantized, path, compress_to_fp16=False)
    return path


def random_images(sizes, batch=1):
    """Random normalized images (batch, 3, H, W), one batch per (H, W) in `sizes`: what the fp32 checks run."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, h, w, generator=generator) for h, w in sizes]


def random_frames(sizes, batch=1):
    """Random uint8 frames (batch, H, W, 3), one batch per (H, W) in `sizes`: what the checks of a labels file run."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (batch, h, w, 3), generator=generator, dtype=torch.uint8) for h, w in sizes]


def verify(run, model, sizes, batch=1):
    """`run` (a runtime runner) against the PyTorch `model` (a LabelsModel for a labels file) on random_images (or
    random_frames): the worst "max_abs_diff", "within_tolerance" (None for a labels file) and "argmax_agreement", and
    each batch's in "sizes"."""
    inputs = (random_frames if isinstance(model, LabelsModel) else random_images)(sizes, batch)
    sizes = [dict(_compare(run, model, x), size=list(x.shape)) for x in inputs]
    diffs = [r["max_abs_diff"] for r in sizes]
    return {"max_abs_diff": None if None in diffs else max(diffs),
            "within_tolerance": None if None in diffs else all(r["within_tolerance"] for r in sizes),
            "argmax_agreement": min(r["argmax_agreement"] for r in sizes), "sizes": sizes}


def _compare(run, model, x):  # model: in eval mode
    with torch.no_grad():
        expected = model(x.to(next(model.parameters()).device)).cpu().numpy()
    result = run(x.numpy())
    labels, expected_labels = (a if a.ndim == 3 else a.argmax(1) for a in (result, expected))  # ndim 3: labels
    if labels.shape != expected_labels.shape:
        raise ExportError(f"the exported file gave an output of shape {result.shape} for an input of shape "
                          f"{tuple(x.shape)}; PyTorch gives one of shape {expected.shape}")
    report = {"max_abs_diff": None, "tolerance": None, "within_tolerance": None,
              "argmax_agreement": float((labels == expected_labels).mean())}
    if result.ndim == 4:
        expected = expected.astype(np.float32)
        diff, tolerance = float(np.abs(result - expected).max()), ATOL + RTOL * float(np.abs(expected).max())
        report.update(max_abs_diff=diff, tolerance=tolerance, within_tolerance=diff <= tolerance)
    return report


def check_report(path, report):
    """Raise ExportError when the file does not reproduce PyTorch within the tolerances."""
    diff, agreement = report["max_abs_diff"], report["argmax_agreement"]
    if report["within_tolerance"] is False or agreement < MIN_AGREEMENT:
        raise ExportError(f"{path} does not match PyTorch: max abs logit diff {diff}, argmax agreement {agreement}; "
                          f"expected at most {ATOL} + {RTOL} * the largest |logit| and at least {MIN_AGREEMENT}")


def check_int8_report(path, report):
    """Raise ExportError when an INT8 file (not held to the fp32 tolerance) agrees with PyTorch on too few pixels."""
    if (agreement := report["argmax_agreement"]) < MIN_INT8_AGREEMENT:
        raise ExportError(f"{path} agrees with PyTorch on only {100 * agreement:.1f}% of the pixels; expected at least "
                          f"{100 * MIN_INT8_AGREEMENT:.0f}%: try a larger --calib-size, or use the fp32 file")


def compare_on_split(run, model, images, num_classes):
    """{"miou_torch", "miou_file", "argmax_agreement", "images"}: the fp32 `model`'s and the file's mIoU on `images`
    (SplitImages; evaluate.py's ss mode), and the lowest per-image share of pixels where they agree."""
    confusions = [torch.zeros((num_classes, num_classes), dtype=torch.int64) for _ in range(2)]
    agreements, device = [], next(model.parameters()).device
    for image, label in images.labelled():
        with torch.no_grad():
            expected = model(images.normalized(image).to(device)).float().cpu()[0].max(0).indices
        out = torch.from_numpy(run(images.file_input(image))[0])
        pred = out.long() if out.ndim == 2 else out.max(0).indices  # a labels file gives the labels themselves
        agreements.append(float((pred == expected).float().mean()))
        for confusion, labels in zip(confusions, (expected, pred), strict=True):
            confusion_update(confusion, labels, label)
    miou_torch, miou_file = (float(iou_from_confusion(c)[1]) for c in confusions)
    return {"miou_torch": miou_torch, "miou_file": miou_file, "argmax_agreement": min(agreements),
            "images": len(agreements)}


def default_output(ckpt, argmax):
    return os.path.join(os.path.dirname(os.path.abspath(ckpt)), "model_argmax.onnx" if argmax else "model.onnx")


def openvino_paths(onnx_path):
    """(fp32 IR, INT8 IR) paths beside the ONNX file: X.onnx -> X.xml, X_int8.xml."""
    base = os.path.splitext(onnx_path)[0]
    return base + ".xml", base + "_int8.xml"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="model_final.pth or last.pth of a run")
    parser.add_argument("--output", help="ONNX file (default: model.onnx / model_argmax.onnx beside the checkpoint)")
    parser.add_argument("--argmax", action="store_true",
                        help='the labels model: uint8 BGR frames (N, H, W, 3) in, "labels" uint8 (N, H, W) out')
    parser.add_argument("--labels-upsample", choices=LABELS_UPSAMPLES,
                        help="with --argmax: half (default; logits to half the size, argmax, each label to 2x2 "
                             "pixels), bilinear (logits to full size, then argmax) or nearest (argmax at 1/8 of the "
                             "size, labels upsampled)")
    parser.add_argument("--no-fold", action="store_true", help="keep the BatchNorm layers instead of folding them")
    parser.add_argument("--opset", type=int, default=17, help=f"ONNX opset ({MIN_OPSET} or newer)")
    parser.add_argument("--openvino", action="store_true", help="also write an fp32 OpenVINO IR: FILE.xml + .bin")
    parser.add_argument("--int8", action="store_true", help="also write FILE_int8.xml (NNCF); implies --openvino")
    parser.add_argument("--calib-size", type=int, default=300, help="training images INT8 is calibrated on")
    parser.add_argument("--check-size", type=int, default=50, help="val images INT8 is checked on")
    args = add_config_args(parser).parse_args(argv)
    for name in ("calib_size", "check_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive number of images")
    if args.labels_upsample and not args.argmax:
        parser.error(f"--labels-upsample {args.labels_upsample}: it applies to the labels model; add --argmax")
    args.openvino, args.labels_upsample = args.openvino or args.int8, args.labels_upsample or LABELS_UPSAMPLES[0]
    return args


def format_report(report, runtime="onnxruntime"):
    return "\n".join(
        f"{runtime} vs PyTorch at {'x'.join(map(str, r['size']))}: max abs logit diff "
        + ("n/a (labels)" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e} (tolerance {r['tolerance']:.2e})")
        + f", argmax agreement {100 * r['argmax_agreement']:.3f}%" for r in report["sizes"])


def export_openvino_files(args, model, reference, cfg, onnx_path):
    """--openvino and --int8: write, report on and check the IR files converted from `onnx_path`; `reference`: what
    the fp32 file must reproduce (`model`, or its LabelsModel), `model`: what INT8 is scored against."""
    xml_path, int8_path = openvino_paths(onnx_path)
    report = verify(openvino_runner(export_openvino(onnx_path, xml_path)), reference, VERIFY_SIZES, batch=2)
    print(f"wrote {xml_path}\n" + format_report(report, "OpenVINO"))
    check_report(xml_path, report)
    if args.int8:
        calibration = SplitImages(cfg, cfg.train_split, args.calib_size, frames=args.argmax)
        quantize_int8(xml_path, int8_path, calibration)
        # INT8 is made for real images: a trained model's INT8 copy agrees less on random noise (CamVid: 88%)
        report = compare_on_split(openvino_runner(int8_path), model,
                                  SplitImages(cfg, cfg.val_split, args.check_size, frames=args.argmax), cfg.num_classes)
        print(f"wrote {int8_path} (calibrated on {len(calibration)} {cfg.train_split} images)\n"
              f"OpenVINO INT8 vs PyTorch on {report['images']} {cfg.val_split} images: mIoU "
              f"{100 * report['miou_file']:.2f} vs {100 * report['miou_torch']:.2f} (fp32), lowest argmax agreement "
              f"{100 * report['argmax_agreement']:.2f}%; the whole split: python evaluate.py --ckpt {args.ckpt} "
              "backend=openvino backend_model=" + int8_path)
        check_int8_report(int8_path, report)


def main(argv=None):
    args = parse_args(argv)
    try:
        model, cfg = load_for_inference(args.ckpt, args.config, args.overrides)
        path = args.output or default_output(args.ckpt, args.argmax)
        for name in ["onnx", "onnxruntime"] + ["openvino"] * args.openvino + ["nncf"] * args.int8:
            require(name)  # a missing package named at once, not after minutes of export
        exported, reference = model if args.no_fold else fold_batchnorm(model), model
        if args.argmax:
            exported, reference = (LabelsModel(m, cfg.mean, cfg.std, args.labels_upsample) for m in (exported, model))
        export_onnx(exported, path, args.opset)
        # against the unfolded model, so that the figures cover folding and export together
        report = verify(onnxruntime_runner(path), reference, VERIFY_SIZES, batch=2)
        print(f"wrote {path}\n" + format_report(report))
        check_report(path, report)
        if args.openvino:
            export_openvino_files(args, model, reference, cfg, path)
    except (ConfigError, CheckpointError, DatasetError, BackendError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
