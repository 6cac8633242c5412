"""Evaluate a BiSeNet checkpoint: mIoU as the official Cityscapes toolkit computes it.

    python evaluate.py --ckpt runs/NAME/model_final.pth [--config NAME] [mode=ss|ssc|msf|mscf] [key=value ...]
    torchrun --nproc_per_node=N evaluate.py --ckpt PATH ...      # each process scores its share
    python evaluate.py --ckpt PATH save_dir=DIR [save_color=true] [val_split=test]   # predictions as PNGs
    python evaluate.py --ckpt PATH backend=openvino|onnxruntime [backend_model=FILE]   # export.py's file, on the CPU

Results go to eval_SPLIT_MODE.json next to the checkpoint. The README's table says what each mode does and
docs/evaluation.md what save_dir writes.
"""

import argparse
import json
import math
import os
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import plots
from checkpoint import CheckpointError, load_for_inference, save_checkpoint, write_atomically
from configs import ConfigError, add_config_args, format_config
from datasets import FONT, IGNORE, MIN_ROW, DatasetError, build_dataset, class_table, legend, loader_workers, read_image
from distributed import Distributed, LaunchError, timeout_message
from model import inference_model
from runtime import BackendError, BackendModel, check_labels_mode, load_model, model_path
from transform import EvalTransform, normalize

SHOWN_CLASSES = 30  # the terminal's per-class table lists every class up to this many
_WARNED = set()  # the eval JSONs read_results has warned about
# mode: (sliding crops, multi-scale and flip)
MODES = {"ss": (False, False), "ssc": (True, False), "msf": (False, True), "mscf": (True, True)}


# ---- the math: confusion matrix and IoU ----

def confusion_update(confusion, pred, label, ignore_index=IGNORE):
    """Add one prediction's pixels to a (C, C) int64 confusion matrix (rows truth, columns prediction). A class outside
    0..C-1 (a model of more classes than the config's) is a ConfigError: it would land in another cell, or past it."""
    n = confusion.shape[0]
    valid = label != ignore_index
    pred = pred[valid].long()
    low, high = (int(pred.min()), int(pred.max())) if pred.numel() else (0, 0)
    if not 0 <= low <= high < n:
        bad = high if high >= n else low
        raise ConfigError(f"a prediction holds class {bad}, outside 0..{n - 1}: the model predicts other classes "
                          f"than num_classes={n}")
    index = label[valid].long() * n + pred  # int64: uint8 labels would wrap at 256
    confusion += torch.bincount(index, minlength=n * n).reshape(n, n)
    return confusion


def iou_from_confusion(confusion):
    """Per-class IoU = TP / (TP + FP + FN), NaN where the denominator is 0; the mean skips NaN classes,
    as the official toolkit does (a class absent from both truth and prediction does not count)."""
    confusion = confusion.double()
    tp = confusion.diag()
    denom = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))
    miou = iou[~iou.isnan()].mean().item() if (~iou.isnan()).any() else float("nan")
    accuracy = (tp.sum() / confusion.sum()).item() if confusion.sum() > 0 else float("nan")
    return iou, miou, accuracy


# ---- inference ----

def crop_starts(length, crop, stride):
    """Start offsets of windows of size `crop` every `stride` pixels, the last one ending at `length`."""
    if length <= crop:
        return [0]
    return list(range(0, length - crop, stride)) + [length - crop]


def eval_crop_size(cfg):
    """The sliding-window size (H, W): eval_crop, or the training crop_size where eval_crop is empty."""
    return tuple(cfg.eval_crop or cfg.crop_size)


def crop_scores(model, crops, flip, fusion):
    """Scores (N, C, h, w) of a batch of crops: softmax, plus with flip the mirrored crops' softmax mirrored back.
    "exp" fusion (the original implementation's) takes exp of that; "mean" halves the sum: scores stay probabilities."""
    batch = torch.cat([crops, crops.flip(-1)]) if flip else crops
    probs = model(batch).float().softmax(1)
    if flip:
        probs = probs[: len(crops)] + probs[len(crops):].flip(-1)
    if fusion == "exp":
        return probs.exp()
    return probs / 2 if flip else probs


def sliding_scores(model, image, crop_hw, stride_frac, batch_size, flip, fusion):
    """Scores (C, H, W) of an image (1, 3, H, W), padded bottom/right to the crop where smaller, from overlapping crops:
    "exp" fusion adds their scores (as the original implementation), "mean" averages them."""
    _, _, h, w = image.shape
    ch, cw = crop_hw
    padded = F.pad(image, (0, max(0, cw - w), 0, max(0, ch - h)))
    ph, pw = padded.shape[-2:]
    boxes = [(y, x) for y in crop_starts(ph, ch, max(1, int(ch * stride_frac)))
             for x in crop_starts(pw, cw, max(1, int(cw * stride_frac)))]
    scores, counts = None, torch.zeros((1, ph, pw), device=image.device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        crops = torch.cat([padded[:, :, y:y + ch, x:x + cw] for y, x in chunk])
        out = crop_scores(model, crops, flip, fusion)
        if scores is None:
            scores = torch.zeros((out.shape[1], ph, pw), device=image.device)
        for (y, x), score in zip(chunk, out, strict=True):
            scores[:, y:y + ch, x:x + cw] += score
            counts[:, y:y + ch, x:x + cw] += 1
    if fusion == "mean":
        scores /= counts
    return scores[:, :h, :w]


def add_resized(total, scores, size, chunk=16):
    """total (C, *size) += `scores` (C, h, w) resized bilinearly to `size`, `chunk` classes at a time: with 150 classes
    the only full-size maps are the sum and the scores themselves (total None: a zero sum is made)."""
    if total is None:
        total = scores.new_zeros((scores.shape[0], *size))
    for c in range(0, scores.shape[0], chunk):
        part = scores[c:c + chunk]
        total[c:c + chunk] += part if part.shape[-2:] == size else \
            F.interpolate(part[None], size, mode="bilinear", align_corners=False)[0]
    return total


def predict_scores(model, image, cfg, mode, size=None):
    """Class scores (C, *size) (default: the image's size) of a normalized image (1, 3, H, W) in evaluation `mode`:
    argmax is the prediction. Each scale's scores are added into the sum as they come: one scale's map at a time."""
    sliding, multi = MODES[mode]
    scales, flip = (cfg.eval_scales, True) if multi else ((1.0,), False)
    h, w = image.shape[-2:]
    total = None
    for scale in scales:
        scaled = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = image if scaled == (h, w) else F.interpolate(image, scaled, mode="bilinear", align_corners=False)
        if sliding:
            scores = sliding_scores(model, x, eval_crop_size(cfg), cfg.eval_stride, cfg.eval_batch, flip,
                                    cfg.eval_fusion)
        else:
            scores = crop_scores(model, x, flip, cfg.eval_fusion)[0]
        total = add_resized(total, scores, size or (h, w))
        del scores, x
    return total / len(scales) if cfg.eval_fusion == "mean" else total


def predict(model, image, cfg, mode):
    """Class ids (H, W) int64 of a normalized image (1, 3, H, W) in evaluation `mode`: argmax of predict_scores. With
    eval_short_side the image is scored resized to that short side, its scores resized back to (H, W)."""
    h, w = image.shape[-2:]
    if cfg.eval_short_side and min(h, w) != cfg.eval_short_side:
        factor = cfg.eval_short_side / min(h, w)
        image = F.interpolate(image, (round(h * factor), round(w * factor)), mode="bilinear", align_corners=False)
    # ss in one pass: softmax (and exp) keep the order of the logits, so their argmax is the same and costs less
    if mode == "ss":
        scores = model(image)[0]
        scores = scores if scores.shape[-2:] == (h, w) else add_resized(None, scores, (h, w))
    else:
        scores = predict_scores(model, image, cfg, mode, (h, w))
    # max(0).indices: argmax(0) gives the same indices but is several times slower on a (C, H, W) CPU tensor
    return scores.max(0).indices


def predict_image(model, image, cfg, mode, device):
    """Class ids (H, W) on `device` of a uint8 RGB image (H, W, 3): a labels file (export.py --argmax) takes it as the
    BGR frame OpenCV decodes and normalizes it in its graph; any other model predicts on it normalized on `device`."""
    if isinstance(model, BackendModel) and model.outputs_labels:
        bgr = cv2.cvtColor(np.ascontiguousarray(image.cpu().numpy()), cv2.COLOR_RGB2BGR)  # 40x faster than flip(-1)
        return model.labels(bgr[None])[0].to(device)
    return predict(model, normalize(image[None].to(device, non_blocking=True), cfg.mean, cfg.std), cfg, mode)


# ---- the evaluation loop ----

def save_prediction(save_dir, relative_path, pred, table, color):
    """The prediction in the dataset's own label values at save_dir/labelIds/RELATIVE_PATH (Cityscapes: CITY/NAME.png,
    what the toolkit and the server read), and with `color` in the class colors at save_dir/color/RELATIVE_PATH."""
    write_png(os.path.join(save_dir, "labelIds", relative_path), table.to_values(pred))
    if color:
        write_png(os.path.join(save_dir, "color", relative_path), table.colorize(pred)[..., ::-1])


def comparison(image_rgb, truth, pred, table, gap=4):
    """RGB uint8 picture: the image, its ground truth and the prediction side by side (class colors; ignored pixels
    of the truth black), `gap` white columns apart, each under its title, and a legend of the classes in either."""
    h, w = image_rgb.shape[:2]
    space = np.full((h, gap, 3), 255, np.uint8)
    present = np.concatenate([truth.ravel(), pred.ravel()])
    panels = np.concatenate([image_rgb, space, table.colorize(truth), space, table.colorize(pred), space,
                             legend(present, h, table)], axis=1)
    row = max(MIN_ROW, h // 12)
    header = np.full((row, panels.shape[1], 3), 255, np.uint8)
    for i, title in enumerate(("image", "truth (void black)", "prediction")):
        cv2.putText(header, title, (i * (w + gap) + 2, row - row // 4), FONT, row / 40, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, panels], axis=0)


def write_png(path, array):
    """cv2.imwrite into a folder it creates; an OSError naming the path where it fails (cv2 returns False instead)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, np.ascontiguousarray(array)):
        raise OSError(f"cannot write {path}: check that its folder is writable and the disk not full")


def eval_dataset(cfg, split=None):
    """The dataset evaluate() scores: `split` (default cfg.val_split) with the evaluation transform."""
    return build_dataset(cfg, split or cfg.val_split, EvalTransform.from_config(cfg))


@torch.inference_mode()
def evaluate(model, dataset, cfg, proc, mode=None):
    """Score `model` (a BiSeNet or a runtime.BackendModel) on an eval_dataset in `mode`: a strict-JSON dict (None where
    a figure is undefined). Under torchrun each rank takes every world-th image (no padding, no duplicates) and the
    confusion matrices are summed, as one process would. A split without labels is only predicted (save_dir)."""
    mode = mode or cfg.eval_mode
    if not dataset.has_labels and not cfg.save_dir:
        raise ConfigError(f"the {dataset.split} split has no labels, so there is nothing to score: pass save_dir=DIR "
                          "to write its predictions (label-id PNGs for the benchmark server)")
    if not isinstance(dataset.transform, EvalTransform):
        raise TypeError("evaluate() takes a dataset with its evaluation transform: eval_dataset(cfg, split)")
    count = min(cfg.eval_images, len(dataset)) if cfg.eval_images else len(dataset)  # eval_images: a quick look
    shard = range(proc.rank, count, proc.world)  # the loader keeps this order, so each item's index is known
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=shard, pin_memory=proc.device.type == "cuda",
                                         **loader_workers(cfg.eval_workers))
    # a folded channels_last copy on the images' device (`model` stays as it is); an exported file runs on the CPU
    net = model if isinstance(model, BackendModel) else inference_model(model, cfg.eval_amp, proc.device)
    check_labels_mode(net, mode, cfg.eval_short_side)
    table = class_table(cfg)
    confusion = torch.zeros((cfg.num_classes, cfg.num_classes), dtype=torch.int64, device=proc.device)
    scorer = "" if not isinstance(model, BackendModel) else f" {model.backend} {os.path.basename(model.path)}"
    progress = tqdm(zip(shard, loader, strict=True), desc=f"eval {mode}{scorer}", total=len(shard),
                    disable=not proc.main, dynamic_ncols=True)
    for index, (image, label) in progress:
        pred = predict_image(net, image, cfg, mode, proc.device)  # uint8 from the loader
        if dataset.has_labels:
            confusion_update(confusion, pred, label.to(proc.device).long())
        if cfg.save_dir:
            pred_ids = pred.cpu().numpy().astype(np.uint8)
            save_prediction(cfg.save_dir, dataset.output_path(index), pred_ids, table, cfg.save_color)
            if cfg.save_color and dataset.has_labels:
                write_png(os.path.join(cfg.save_dir, "compare", dataset.output_path(index)),
                          comparison(read_image(dataset.samples[index][0]), label.numpy(), pred_ids, table)[..., ::-1])
    results = {"mode": mode, "split": dataset.split, "images": count, "labels": dataset.has_labels,
               "scored_by": scorer.strip() or "torch", "miou": None, "pixel_accuracy": None, "iou": None,
               "confusion": None}
    if dataset.has_labels:
        confusion = proc.all_sum(confusion).cpu()
        iou, miou, accuracy = iou_from_confusion(confusion)
        results.update(miou=_none_if_nan(miou), pixel_accuracy=_none_if_nan(accuracy), confusion=confusion.tolist(),
                       iou={name: _none_if_nan(v) for name, v in zip(table.names, iou.tolist(), strict=True)})
    return {**results, "config": cfg.to_dict()}


def _none_if_nan(value):
    return None if math.isnan(value) else value


def format_results(results):
    """The per-class table printed on the terminal, or for a split without labels where its predictions went."""
    where = f"{results['mode']} on {results['images']} {results['split']} images"
    if results["config"].get("eval_images"):
        where += " (eval_images: the first ones only)"
    if results.get("scored_by", "torch") != "torch":
        where += f", scored by {results['scored_by']}"
    if not results["labels"]:
        return (f"{where}: the {results['split']} split has no labels, so nothing was scored; label-id predictions "
                f"are in {os.path.join(results['config']['save_dir'], 'labelIds')}")

    def percent(value):
        return "n/a" if value is None else f"{100 * value:.2f}"

    classes = [(name, percent(iou)) for name, iou in results["iou"].items()]
    if len(classes) > SHOWN_CLASSES:  # ADE20K, COCO-Stuff: the best and the worst, by IoU (n/a last)
        ranked = sorted(results["iou"].items(), key=lambda item: -1 if item[1] is None else item[1], reverse=True)
        half = SHOWN_CLASSES // 2
        classes = [(name, percent(iou)) for name, iou in ranked[:half]] + [
            (f"({len(ranked) - 2 * half} more)", "...")] + [(name, percent(iou)) for name, iou in ranked[-half:]]
        where += f"; {len(ranked)} classes by IoU, every one in the results JSON"
    rows = [("class", "IoU"), *classes, ("-" * 16, "-" * 8),
            ("pixel accuracy", percent(results["pixel_accuracy"])), ("mIoU", percent(results["miou"]))]
    lines = [f"{name:<16}{value:>8}" for name, value in rows]
    return "\n".join(lines + [f"({where}; mIoU over classes present in truth or prediction)"])


# ---- command line ----

def write_results(results, path):
    """The results as strict JSON (json.dumps refuses NaN rather than write a file other parsers reject), written
    atomically (checkpoint.write_atomically): a full disk leaves the earlier file whole, and the error names it."""
    text = json.dumps(results, indent=1, allow_nan=False)
    write_atomically(path, lambda f: f.write(text.encode()))


def read_results(path):
    """An eval JSON's results where it holds a score, else None (missing, cut short by a kill, or unscored); one whose
    figures are not evaluate.py's (a string, NaN, outside 0..1: edited by hand) is left out with a warning."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or results.get("miou") is None:
        return None
    iou = results.get("iou")
    figures = [results["miou"], *(iou.values() if isinstance(iou, dict) else ["no iou"])]  # None: a class not scored
    if isinstance(results.get("mode"), str) and all(v is None or type(v) in (int, float) and 0 <= v <= 1
                                                    for v in figures):
        return results
    if path not in _WARNED:
        _WARNED.add(path)
        print(f"warning: {path} does not hold evaluate.py's results (miou {results['miou']!r}): left out; "
              "delete it to score the run again", file=sys.stderr)
    return None


def results_name(cfg, ckpt, results):
    """eval_SPLIT_MODE.json, plus an exported file's backend and name so that its results sit beside the model's."""
    if cfg.backend == "torch":
        return f"eval_{cfg.val_split}_{results['mode']}.json"
    stem = os.path.splitext(os.path.basename(model_path(cfg, ckpt)))[0]
    return f"eval_{cfg.val_split}_{results['mode']}_{cfg.backend}_{stem}.json"


class Validator:
    """Validation during training (eval_every) by evaluate(): a log.jsonl record, model_best.pth, pictures redrawn."""

    def __init__(self, cfg, proc, run_dir, best, dataset):
        self.cfg, self.proc, self.run_dir, self.best, self.dataset = cfg, proc, run_dir, dict(best), dataset
        self.best_path = os.path.join(run_dir, "model_best.pth")

    def __call__(self, raw_model, iteration, log_path):
        """Validate; returns the evaluate() results. The model is left in training mode."""
        self.proc.sync_buffers(raw_model)  # BatchNorm statistics as one model, under torchrun
        t0 = time.perf_counter()
        results = evaluate(raw_model, self.dataset, self.cfg, self.proc)
        raw_model.train()
        miou = results["miou"]
        record = {"iter": iteration, "val_miou": miou, "val_pixel_accuracy": results["pixel_accuracy"],
                  "val_iou": results["iou"], "val_seconds": time.perf_counter() - t0, "time": time.time()}
        improved = miou is not None and (self.best["miou"] is None or miou > self.best["miou"])
        if improved:
            self.best = {"iter": iteration, "miou": miou}
        if self.proc.main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if improved:
                save_checkpoint(self.best_path, {"model": raw_model.state_dict(), "config": self.cfg.to_dict(),
                                                 "iteration": iteration, "miou": miou})
            best = "" if self.best["miou"] is None else f"; best {100 * self.best['miou']:.2f} at {self.best['iter']}"
            tqdm.write(f"iteration {iteration}: val mIoU {100 * (miou or 0):.2f} ({record['val_seconds']:.0f} s){best}")
            draw_pictures(self.run_dir, results)
        return results


def draw_pictures(run_dir, results=None):
    """curves.png from log.jsonl and, given evaluation results, confusion.png (skipped without matplotlib)."""
    plots.plot_curves(os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "curves.png"))
    if results is not None:
        plots.plot_confusion(results, os.path.join(run_dir, "confusion.png"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="model_final.pth or last.pth of a run")
    args = add_config_args(parser).parse_args(argv)
    proc = None
    try:
        model, cfg = load_for_inference(args.ckpt, args.config, args.overrides)
        model = load_model(cfg, args.ckpt, model)
        with Distributed(cfg.dist_timeout) as proc:
            if proc.main:
                print(format_config(cfg))
            results = evaluate(model, eval_dataset(cfg), cfg, proc)
            if proc.main:
                print(format_results(results))
                out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), results_name(cfg, args.ckpt, results))
                write_results(results, out)
                plots.plot_confusion(results, plots.confusion_path(out))
                kinds = ("labelIds", "color", "compare") if cfg.save_color else ("labelIds",)
                saved = ", ".join(os.path.join(cfg.save_dir, kind) for kind in kinds)
                print(f"results: {out}" + (f"; predictions: {saved}" if cfg.save_dir else ""))
    # OSError: a folder or file not writable
    except (LaunchError, ConfigError, CheckpointError, DatasetError, BackendError, OSError) as exc:
        print(f"error: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        message = timeout_message(exc, proc, cfg.dist_timeout)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
