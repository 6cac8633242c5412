"""Export a BiSeNet checkpoint to ONNX (and OpenVINO, INT8) for deployment, and check the files against PyTorch.

    python export.py --ckpt runs/NAME/model_final.pth [--output FILE.onnx] [--argmax] [--no-fold] [--opset 17]
                     [--openvino] [--int8 [--calib-size 300] [--check-size 50]] [--config NAME] [key=value ...]

The model is built from the checkpoint's config (--config NAME and overrides as in evaluate.py) without the aux
heads, its BatchNorms are folded into the convolutions (--no-fold keeps them), and the file gets dynamic batch,
height and width: any N, H, W works, not only multiples of 32.

Input "image": float32 (N, 3, H, W), RGB scaled to [0, 1], then normalized per channel as (x - mean) / std with the
config's mean and std (ImageNet statistics by default), exactly what evaluate.py feeds the model.
Output "logits": float32 (N, num_classes, H, W); with --argmax "labels": int64 (N, H, W) class ids (train ids:
datasets.class_table(cfg).to_values maps them to the dataset's label values, Cityscapes label ids for Cityscapes).

The default output is model.onnx (model_argmax.onnx with --argmax) next to the checkpoint. After writing it, the
file is run with onnxruntime on the CPU at sizes other than the export size and compared with PyTorch: the command
fails where the largest logit difference exceeds 1e-4 + 1e-5 * the largest |logit| (float32 rounding grows with
the logits' scale) or where fewer than 99.9% of the pixels get the same class.

--openvino also writes an OpenVINO IR converted from that ONNX file (FILE.xml + FILE.bin beside FILE.onnx; model.xml
by default), in fp32, checked the same way with OpenVINO on the CPU in f32. --int8 (implies --openvino) also writes
FILE_int8.xml / .bin: NNCF post-training quantization calibrated on --calib-size whole images of the training split
(normalized as evaluation does; a fixed shuffled order, the same images every time). INT8 cannot meet the fp32 logit
tolerance: it is checked on --check-size images of the val split instead, with the mIoU of PyTorch (fp32) and of the
INT8 file on them printed side by side, and the command fails where they agree on fewer than 90% of the pixels.
evaluate.py and demo.py run these files with backend=openvino or backend=onnxruntime. The packages come from
requirements-deploy.txt.
"""

import argparse
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn

from checkpoint import CheckpointError, load_for_inference
from cityscapes import DatasetError
from configs import ConfigError, add_config_args
from evaluate import confusion_update, eval_dataset, iou_from_confusion
from model import fold_batchnorm
from runtime import BackendError, onnxruntime_runner, openvino_runner, require
from transform import normalize

MIN_OPSET = 17  # the oldest opset this export is verified with
# Verification sizes: odd, so that they are not multiples of 32, and other than the export size, so that a size
# frozen into the graph during tracing would show.
VERIFY_SIZES = ((199, 393), (321, 655))
# The check passes where max |onnxruntime - PyTorch| <= ATOL + RTOL * max |PyTorch logit|, per verification size.
# Float32 rounding differs between the two runtimes (folding adds its own) and grows with the scale of the
# activations: measured at VERIFY_SIZES, batch 2, max abs diffs of 8e-6 for random weights and for the synthetic
# preset's 300-iteration model (logits up to 6 on random images, 10 on its val images), and 1.4e-6 times the
# largest logit with the classifier scaled up (7e-5 at logits up to 50, 1.4e-4 at 100). A flat 1e-4 (what the
# tests use, on small logits) would fail a correct export of a model with large logits; the RTOL term keeps a 7x
# margin there and adds next to nothing for logits of a few units.
ATOL, RTOL = 1e-4, 1e-5
# Pixels whose two best logits tie within that rounding may flip class, hence not 100% agreement.
MIN_AGREEMENT = 0.999
# An INT8 file moves logits by far more than rounding; below this agreement the quantization has gone wrong.
MIN_INT8_AGREEMENT = 0.9
CALIB_SEED = 0  # the order the calibration and check images are taken in: the same at every export


class ExportError(BackendError):
    """An export that cannot be done or a file that does not match PyTorch."""


class _WithArgmax(nn.Module):
    """The model with the per-pixel argmax in the graph, so a deployment reads train ids directly."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).argmax(1)


_require = require  # onnx, onnxruntime, openvino, nncf: requirements-deploy.txt


def export_onnx(model, path, argmax=False, opset=17, sample_hw=(256, 512)):
    """Write `model` (an eval-mode BiSeNet, folded or not) to the ONNX file `path`; returns `path`.

    Input "image" (N, 3, H, W) float32; output "logits" (N, C, H, W), or "labels" (N, H, W) int64 with `argmax`.
    `sample_hw` is the size traced; batch, height and width stay dynamic in the file.
    """
    onnx = _require("onnx")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: expected {MIN_OPSET} or newer")
    if model.training:
        raise ExportError("export_onnx needs a model in eval mode (model.eval()): training mode returns a tuple")
    output = "labels" if argmax else "logits"
    module = _WithArgmax(model) if argmax else model
    sample = torch.randn(1, 3, *sample_hw, device=next(model.parameters()).device)
    image_axes = {0: "batch", 2: "height", 3: "width"}
    dynamic = {"image": image_axes, output: {0: "batch", 1: "height", 2: "width"} if argmax else image_axes}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # The TorchScript exporter (dynamo=False): the torch.export-based one needs the onnxscript package, which is not
    # a requirement. Tracing records the interpolation sizes taken from x.shape as Shape/Gather ops, so the exact
    # feature sizes stay computed from the input at run time (verify_onnx checks that at other, odd sizes).
    with warnings.catch_warnings():
        # it warns that it is the legacy exporter, and about its own internals: a choice made above, not a user's
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "Exporting to ONNX opset version")  # an opset it lacks: ExportError below
        with torch.no_grad():
            try:
                torch.onnx.export(module, (sample,), path, dynamo=False, opset_version=opset, input_names=["image"],
                                  output_names=[output], dynamic_axes=dynamic)
            except RuntimeError as err:
                if "opset" not in str(err).lower():
                    raise
                raise ExportError(f"--opset {opset}: {str(err).strip().splitlines()[0]}; expected {MIN_OPSET} or a "
                                  "newer opset this torch exports") from None
    onnx.checker.check_model(path)
    return path


def export_openvino(onnx_path, path):
    """Convert the ONNX file `onnx_path` to an OpenVINO IR at `path` (.xml, with its .bin beside it), kept in fp32
    (save_model would halve the weights to fp16 by default); returns `path`."""
    ov = _require("openvino")
    ov.save_model(ov.convert_model(onnx_path), path, compress_to_fp16=False)
    return path


class SplitImages:
    """Up to `size` whole images (1, 3, H, W) float32 of `split`, normalized as evaluation normalizes them, in a
    fixed shuffled order: INT8 calibration sees what inference sees (on CamVid val, whole training frames gave 99.6%
    agreement with fp32 where training-transform crops gave 99.3%). Read while iterated: 300 Cityscapes frames would
    hold 7.5 GB. Iterating gives the image arrays; `labelled()` gives (image tensor, label tensor) pairs."""

    def __init__(self, cfg, split, size, seed=CALIB_SEED):
        self.dataset = eval_dataset(cfg, split)
        self.mean, self.std = cfg.mean, cfg.std  # the checkpoint's, as evaluation uses them
        self.indices = [int(i) for i in np.random.default_rng(seed).permutation(len(self.dataset))[:size]]

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return (image.numpy() for image, _ in self.labelled())

    def labelled(self):
        """(normalized float32 image (1, 3, H, W), int64 label (H, W)) pairs, as evaluation feeds the model."""
        for i in self.indices:
            image, label = self.dataset[i]
            yield normalize(image[None], self.mean, self.std), label.long()


def quantize_int8(xml_path, path, crops):
    """Write an INT8 copy of the OpenVINO IR `xml_path` at `path`: NNCF post-training quantization calibrated on
    `crops` (arrays (1, 3, H, W): SplitImages); returns `path`."""
    ov, nncf = _require("openvino"), _require("nncf")
    # full bias correction: on CamVid val it raised agreement with fp32 from 99.65% to 99.75% (4x the quantization
    # time, the same inference speed); results/camvid/int8_calibration_val.json holds the choices measured
    quantized = nncf.quantize(ov.Core().read_model(xml_path), nncf.Dataset(crops), subset_size=len(crops),
                              fast_bias_correction=False)
    ov.save_model(quantized, path, compress_to_fp16=False)
    return path


def random_images(sizes, batch=1, seed=0):
    """Random normalized images (batch, 3, H, W), one batch per (H, W) in `sizes`: what the fp32 checks run."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, h, w, generator=generator) for h, w in sizes]


def verify(run, model, images):
    """Compare `run` (a function float32 array (N, 3, H, W) -> logits (N, C, H, W) or labels (N, H, W), e.g.
    runtime.onnxruntime_runner(path)) with `model` (PyTorch) on each batch of `images`.

    Returns {"max_abs_diff": worst logit difference, "within_tolerance": whether for every batch the worst difference
    is at most ATOL + RTOL * the largest |logit| (both None for a --argmax file), "argmax_agreement": lowest fraction
    of pixels with the same class, "sizes": per batch these figures, its "size" and the "tolerance"}.
    """
    per_size = [_compare(run, model, image) for image in images]
    for image, result in zip(images, per_size, strict=True):
        result["size"] = list(image.shape)
    diffs = [r["max_abs_diff"] for r in per_size]
    return {
        "max_abs_diff": None if None in diffs else max(diffs),
        "within_tolerance": None if None in diffs else all(r["within_tolerance"] for r in per_size),
        "argmax_agreement": min(r["argmax_agreement"] for r in per_size),
        "sizes": per_size,
    }


def verify_onnx(path, model, sizes, batch=1, seed=0):
    """verify() of the ONNX file `path` run with onnxruntime on the CPU, on random_images(sizes, batch, seed)."""
    return verify(onnxruntime_runner(path), model, random_images(sizes, batch, seed))


def verify_openvino(path, model, sizes, batch=1, seed=0):
    """verify() of the OpenVINO file `path` run on the CPU in f32, on random_images(sizes, batch, seed)."""
    return verify(openvino_runner(path), model, random_images(sizes, batch, seed))


def _compare(run, model, image):
    device = next(model.parameters()).device
    was_training = model.training
    with torch.no_grad():
        expected = model.eval()(image.to(device)).float().cpu().numpy()
    model.train(was_training)
    result = run(image.numpy())
    is_labels = result.ndim == 3  # a --argmax file
    labels = result if is_labels else result.argmax(1)
    if labels.shape != expected.argmax(1).shape:
        raise ExportError(f"the exported file gave an output of shape {result.shape} for an image of shape "
                          f"{tuple(image.shape)}; PyTorch gives logits of shape {expected.shape}")
    agreement = float((labels == expected.argmax(1)).mean())
    if is_labels:
        return {"max_abs_diff": None, "tolerance": None, "within_tolerance": None, "argmax_agreement": agreement}
    diff, tolerance = float(np.abs(result - expected).max()), ATOL + RTOL * float(np.abs(expected).max())
    return {"max_abs_diff": diff, "tolerance": tolerance, "within_tolerance": diff <= tolerance,
            "argmax_agreement": agreement}


# ---- command line ----

def default_output(ckpt, argmax):
    return os.path.join(os.path.dirname(os.path.abspath(ckpt)), "model_argmax.onnx" if argmax else "model.onnx")


def openvino_paths(onnx_path):
    """(fp32 IR, INT8 IR) paths beside the ONNX file: X.onnx -> X.xml, X_int8.xml."""
    base = os.path.splitext(onnx_path)[0]
    return base + ".xml", base + "_int8.xml"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="model_final.pth or last.pth of a run")
    parser.add_argument("--output", help="ONNX file to write (default: model.onnx or model_argmax.onnx next to "
                                         "the checkpoint)")
    parser.add_argument("--argmax", action="store_true", help='output "labels" (N, H, W) int64 train ids instead '
                                                              'of "logits" (N, C, H, W) float32')
    parser.add_argument("--no-fold", action="store_true", help="keep the BatchNorm layers instead of folding them "
                                                               "into the convolutions")
    parser.add_argument("--opset", type=int, default=17, help=f"ONNX opset ({MIN_OPSET} or newer)")
    parser.add_argument("--openvino", action="store_true", help="also write an OpenVINO IR (fp32) beside the ONNX "
                                                                "file: FILE.xml + FILE.bin")
    parser.add_argument("--int8", action="store_true", help="also write an INT8 OpenVINO IR (FILE_int8.xml) "
                                                            "quantized with NNCF; implies --openvino")
    parser.add_argument("--calib-size", type=int, default=300, help="training images the INT8 quantization is "
                                                                    "calibrated on (default 300)")
    parser.add_argument("--check-size", type=int, default=50, help="val images INT8 is checked on against PyTorch "
                                                                   "(default 50)")
    args = add_config_args(parser).parse_args(argv)
    for name in ("calib_size", "check_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive number of images")
    args.openvino = args.openvino or args.int8
    return args


def check_report(path, report):
    """Raise ExportError when the file does not reproduce PyTorch within the tolerances."""
    diff, agreement = report["max_abs_diff"], report["argmax_agreement"]
    if report["within_tolerance"] is False or agreement < MIN_AGREEMENT:
        raise ExportError(f"{path} does not match PyTorch: max abs logit diff {diff}, argmax agreement {agreement}; "
                          f"expected at most {ATOL} + {RTOL} * the largest |logit| and at least {MIN_AGREEMENT}")


def check_int8_report(path, report):
    """Raise ExportError when the INT8 file's argmax agrees with PyTorch on too few pixels (its logits are not held
    to the fp32 tolerance)."""
    agreement = report["argmax_agreement"]
    if agreement < MIN_INT8_AGREEMENT:
        raise ExportError(f"{path} agrees with PyTorch on only {100 * agreement:.1f}% of the pixels; expected at least "
                          f"{100 * MIN_INT8_AGREEMENT:.0f}%: try a larger --calib-size, or use the fp32 file")


def compare_on_split(run, model, images, num_classes):
    """PyTorch `model` (fp32) and `run` (an exported file's runner) on the labelled `images` (SplitImages): each's
    mIoU against the labels (as evaluate.py's ss mode scores, on these images only) and the lowest per-image share
    of pixels where they agree. Returns {"miou_torch", "miou_file", "argmax_agreement", "images"}."""
    confusions = [torch.zeros((num_classes, num_classes), dtype=torch.int64) for _ in range(2)]
    agreements = []
    device = next(model.parameters()).device
    for image, label in images.labelled():
        with torch.no_grad():
            expected = model(image.to(device)).float().cpu()[0].max(0).indices
        out = torch.from_numpy(run(image.numpy())[0])
        pred = out.long() if out.ndim == 2 else out.max(0).indices  # a --argmax file gives the labels themselves
        agreements.append(float((pred == expected).float().mean()))
        for confusion, labels in zip(confusions, (expected, pred), strict=True):
            confusion_update(confusion, labels, label)
    miou_torch, miou_file = (float(iou_from_confusion(c)[1]) for c in confusions)
    return {"miou_torch": miou_torch, "miou_file": miou_file, "argmax_agreement": min(agreements),
            "images": len(agreements)}


def format_report(report, runtime="onnxruntime"):
    lines = []
    for r in report["sizes"]:
        diff = "n/a (labels)"
        if r["max_abs_diff"] is not None:
            diff = f"{r['max_abs_diff']:.2e} (tolerance {r['tolerance']:.2e})"
        lines.append(f"{runtime} vs PyTorch at {'x'.join(map(str, r['size']))}: max abs logit diff {diff}, "
                     f"argmax agreement {100 * r['argmax_agreement']:.3f}%")
    return "\n".join(lines)


def export_openvino_files(args, model, cfg, onnx_path):
    """--openvino and --int8: write, report on and check the IR files converted from `onnx_path`."""
    xml_path, int8_path = openvino_paths(onnx_path)
    export_openvino(onnx_path, xml_path)
    report = verify_openvino(xml_path, model, VERIFY_SIZES, batch=2)
    print(f"wrote {xml_path}\n" + format_report(report, "OpenVINO"))
    check_report(xml_path, report)
    if args.int8:
        calibration = SplitImages(cfg, cfg.train_split, args.calib_size)
        quantize_int8(xml_path, int8_path, calibration)
        # INT8 is made for real images: a trained model's INT8 copy agrees less on random noise (CamVid: 88%)
        report = compare_on_split(openvino_runner(int8_path), model, SplitImages(cfg, cfg.val_split, args.check_size),
                                  cfg.num_classes)
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
        # before any work: a missing package is named at once, not after minutes of export
        for name in ["onnx", "onnxruntime"] + ["openvino"] * args.openvino + ["nncf"] * args.int8:
            _require(name)
        export_onnx(model if args.no_fold else fold_batchnorm(model), path, args.argmax, args.opset)
        # against the unfolded model, so that the figures cover folding and export together
        report = verify_onnx(path, model, VERIFY_SIZES, batch=2)
        print(f"wrote {path}\n" + format_report(report))
        check_report(path, report)
        if args.openvino:
            export_openvino_files(args, model, cfg, path)
    except (ConfigError, CheckpointError, DatasetError, BackendError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
