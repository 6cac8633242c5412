"""Export a BiSeNet checkpoint to ONNX for deployment, and check the file against PyTorch with onnxruntime.

    python export.py --ckpt runs/NAME/model_final.pth [--output FILE.onnx] [--argmax] [--no-fold] [--opset 17]
                     [--config NAME] [key=value ...]

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
"""

import argparse
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn

from checkpoint import CheckpointError, load_for_inference
from configs import ConfigError, add_config_args
from model import fold_batchnorm

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


class ExportError(RuntimeError):
    """An export that cannot be done or a file that does not match PyTorch."""


class _WithArgmax(nn.Module):
    """The model with the per-pixel argmax in the graph, so a deployment reads train ids directly."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).argmax(1)


def _require(name):
    """Import onnx / onnxruntime, which only requirements-dev.txt installs."""
    try:
        return __import__(name)
    except ImportError as err:
        raise ExportError(
            f"the {name} package is needed to export and check ONNX files but is not installed; "
            "pip install -r requirements-dev.txt"
        ) from err


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
        with torch.no_grad():
            torch.onnx.export(module, (sample,), path, dynamo=False, opset_version=opset, input_names=["image"],
                              output_names=[output], dynamic_axes=dynamic)
    onnx.checker.check_model(path)
    return path


def verify_onnx(path, model, sizes, batch=1, seed=0):
    """Run the ONNX file `path` with onnxruntime on the CPU and compare it with `model` (PyTorch) on random
    normalized images of each (H, W) in `sizes`, `batch` at a time.

    Returns {"max_abs_diff": worst logit difference, "within_tolerance": whether at every size the worst difference
    is at most ATOL + RTOL * the largest |logit| (both None for a --argmax file), "argmax_agreement": lowest fraction
    of pixels with the same class, "sizes": per size these figures and the "tolerance"}.
    """
    session = _require("onnxruntime").InferenceSession(path, providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    per_size = [_compare(session, output, model, torch.randn(batch, 3, h, w, generator=generator)) for h, w in sizes]
    for (h, w), result in zip(sizes, per_size, strict=True):
        result["size"] = [batch, 3, h, w]
    diffs = [r["max_abs_diff"] for r in per_size]
    return {
        "max_abs_diff": None if None in diffs else max(diffs),
        "within_tolerance": None if None in diffs else all(r["within_tolerance"] for r in per_size),
        "argmax_agreement": min(r["argmax_agreement"] for r in per_size),
        "sizes": per_size,
    }


def _compare(session, output, model, image):
    device = next(model.parameters()).device
    was_training = model.training
    with torch.no_grad():
        expected = model.eval()(image.to(device)).float().cpu().numpy()
    model.train(was_training)
    result = session.run([output], {"image": image.numpy()})[0]
    labels = result if output == "labels" else result.argmax(1)
    if labels.shape != expected.argmax(1).shape:
        raise ExportError(f"onnxruntime gave {output} of shape {result.shape} for an image of shape "
                          f"{tuple(image.shape)}; PyTorch gives logits of shape {expected.shape}")
    agreement = float((labels == expected.argmax(1)).mean())
    if output == "labels":
        return {"max_abs_diff": None, "tolerance": None, "within_tolerance": None, "argmax_agreement": agreement}
    diff, tolerance = float(np.abs(result - expected).max()), ATOL + RTOL * float(np.abs(expected).max())
    return {"max_abs_diff": diff, "tolerance": tolerance, "within_tolerance": diff <= tolerance,
            "argmax_agreement": agreement}


# ---- command line ----

def default_output(ckpt, argmax):
    return os.path.join(os.path.dirname(os.path.abspath(ckpt)), "model_argmax.onnx" if argmax else "model.onnx")


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
    return add_config_args(parser).parse_args(argv)


def check_report(path, report):
    """Raise ExportError when the file does not reproduce PyTorch within the tolerances."""
    diff, agreement = report["max_abs_diff"], report["argmax_agreement"]
    if report["within_tolerance"] is False or agreement < MIN_AGREEMENT:
        raise ExportError(f"{path} does not match PyTorch: max abs logit diff {diff}, argmax agreement {agreement}; "
                          f"expected at most {ATOL} + {RTOL} * the largest |logit| and at least {MIN_AGREEMENT}")


def format_report(report):
    lines = []
    for r in report["sizes"]:
        diff = "n/a (labels)"
        if r["max_abs_diff"] is not None:
            diff = f"{r['max_abs_diff']:.2e} (tolerance {r['tolerance']:.2e})"
        lines.append(f"onnxruntime vs PyTorch at {'x'.join(map(str, r['size']))}: max abs logit diff {diff}, "
                     f"argmax agreement {100 * r['argmax_agreement']:.3f}%")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    try:
        model, _ = load_for_inference(args.ckpt, args.config, args.overrides)
        path = args.output or default_output(args.ckpt, args.argmax)
        export_onnx(model if args.no_fold else fold_batchnorm(model), path, args.argmax, args.opset)
        # against the unfolded model, so that the figures cover folding and export together
        report = verify_onnx(path, model, VERIFY_SIZES, batch=2)
        print(f"wrote {path}\n" + format_report(report))
        check_report(path, report)
    except (ConfigError, CheckpointError, ExportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
