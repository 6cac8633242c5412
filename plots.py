"""Pictures of a run: training curves from log.jsonl and the confusion matrix of an evaluation.

    python plots.py runs/NAME                  # (re)draw curves.png (log.jsonl) and confusion.png (eval.json)
    python plots.py runs/NAME/eval_val_ss.json # draw eval_val_ss_confusion.png beside it

train.py and evaluate.py draw them too; without matplotlib (requirements-plot.txt) they are skipped with one note.
"""

import argparse
import importlib.util
import json
import os
import sys

import numpy as np

_warned = False
MISSING = ("note: curves.png and confusion.png need matplotlib (pip install -r requirements-plot.txt); the run goes on "
           "without them")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where it is missing (said in one line on stderr, once a
    process: an optional package, not an error)."""
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            print(MISSING, file=sys.stderr)
            _warned = True
        return None
    return plt


def missing_note():
    """The one line saying what pictures need, where matplotlib is missing (and no second note later); else None."""
    global _warned
    if importlib.util.find_spec("matplotlib") is not None:
        return None
    _warned = True
    return MISSING


def read_log(path):
    """(training records, validation records) of a log.jsonl; a line cut short by a crash ends the reading."""
    train, val = [], []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                break
            (val if "val_miou" in record else train).append(record)
    return train, val


def save(fig, plt, path):
    """Write the figure atomically (a picture being redrawn is never seen half-written)."""
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def plot_curves(log_path, out_path):
    """curves.png: the optimized loss and each head's, lr, throughput, and val mIoU (where the run validated).
    Returns out_path, or None where there is nothing to draw or no matplotlib."""
    train, val = read_log(log_path)
    if not train or (plt := pyplot()) is None:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    its = [r["iter"] for r in train]
    marker = "o" if len(its) <= 10 else None  # a few logged points (one alone draws no line) are seen as dots
    loss_ax, lr_ax, speed_ax, miou_ax = axes.ravel()
    for key in ["loss"] + sorted(k for k in train[-1] if k.startswith("loss_") and k != "loss_sums"):
        label = f"loss = {train[-1].get('loss_sums', 'total')}" if key == "loss" else key
        loss_ax.plot(its, [r.get(key) for r in train], label=label, lw=2 if key == "loss" else 1, marker=marker)
    loss_ax.set(title="training loss", xlabel="iteration", yscale="log")
    loss_ax.legend()
    lr_ax.plot(its, [r["lr"] for r in train], marker=marker)
    lr_ax.set(title="learning rate (base group)", xlabel="iteration")
    speed_ax.plot(its, [r["images_per_s"] for r in train], marker=marker)
    speed_ax.set(title="throughput", xlabel="iteration", ylabel="images/s", ylim=(0, None))
    if val:
        miou = [100 * r["val_miou"] if r["val_miou"] is not None else np.nan for r in val]
        miou_ax.plot([r["iter"] for r in val], miou, marker="o")
        if not np.isnan(miou).all():  # the label extends toward the middle of the plot, never past its edge
            best = int(np.nanargmax(miou))
            right_half = 2 * best >= len(val) - 1 and len(val) > 1
            miou_ax.annotate(f"best {miou[best]:.1f} @ {val[best]['iter']}", (val[best]["iter"], miou[best]),
                             textcoords="offset points", xytext=(-6 if right_half else 6, -14),
                             ha="right" if right_half else "left", va="top")
            miou_ax.set_ylim(bottom=min(0.0, np.nanmin(miou)))
    else:
        miou_ax.text(0.5, 0.5, "no validation during training (eval_every=0)", ha="center", va="center",
                     transform=miou_ax.transAxes)
    miou_ax.set(title="val mIoU (%)", xlabel="iteration")
    first, last = min([its[0]] + [r["iter"] for r in val[:1]]), max([its[-1]] + [r["iter"] for r in val[-1:]])
    pad = max(1, (last - first) * 0.03)
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        ax.set_xlim(first - pad, last + pad)  # one iteration axis for the four panels
    fig.tight_layout()
    save(fig, plt, out_path)
    return out_path


MAX_CONFUSION = 30  # more classes than this: the confusion picture shows those with the lowest IoU


def lowest(keys, k=MAX_CONFUSION):
    """The indices of the k lowest keys, in index order; None (n/a) comes after every number, ties by index."""
    return sorted(sorted(range(len(keys)), key=lambda i: (keys[i] is None, keys[i] or 0))[:k])


def plot_confusion(results, out_path):
    """The row-normalized confusion matrix of evaluate() results (rows: truth, columns: prediction), class names on
    both axes and each class's IoU beside its row. Returns out_path, or None without labels or matplotlib."""
    if not results.get("confusion") or (plt := pyplot()) is None:
        return None
    confusion, names = np.asarray(results["confusion"], np.float64), list(results["iou"])
    rows, total = confusion.sum(1, keepdims=True), len(names)
    normalized = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    shown = range(total)
    if total > MAX_CONFUSION:  # ADE20K, COCO-Stuff: the classes with the lowest IoU (n/a: never seen, left out)
        shown = lowest(list(results["iou"].values()))
        normalized, names = normalized[np.ix_(shown, shown)], [names[i] for i in shown]
    n = len(names)
    size = max(6.0, 0.45 * n + 3)
    longest = max(len(name) for name in names) + 11  # " (IoU 62.5)"
    extra = max(0.0, 0.09 * (longest - 16))  # room for long class names, which would be cut at the edge
    fig, ax = plt.subplots(figsize=(size + 1.5 + extra, size + extra))
    image = ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's pixels")
    ious = ["n/a" if v is None else f"{100 * v:.1f}" for v in (list(results["iou"].values())[i] for i in shown)]
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), [f"{name} (IoU {iou})" for name, iou in zip(names, ious, strict=True)])
    for i, j in zip(*np.nonzero(normalized >= 0.005), strict=True) if n <= 25 else ():
        ax.text(j, i, f"{100 * normalized[i, j]:.0f}", ha="center", va="center", fontsize=7,
                color="white" if normalized[i, j] > 0.5 else "black")
    miou, run = results.get("miou"), (results.get("config") or {}).get("run_name")
    scorer = results.get("scored_by", "torch")  # an exported file's matrix says which one it is
    what = f"{run + ', ' if run else ''}{results['split']} split, {results['mode']}"
    what += f", {scorer}" if scorer != "torch" else ""
    what += f", the {n} of {total} classes with the lowest IoU" if n < total else ""
    ax.set(xlabel="predicted", ylabel="true", title=f"{what}: mIoU {100 * miou:.2f}" if miou is not None else what)
    fig.tight_layout()
    save(fig, plt, out_path)
    return out_path


def confusion_path(json_path):
    return os.path.splitext(json_path)[0] + "_confusion.png"


def sweep_summary(plt, summary):
    """A column per split. Top: a bar per variant at its mean mIoU (from 0) with its interval (drawn within 0-100; the
    table has the numbers), a dot per seed, the baseline's mean dashed. Below, where there is a baseline: each
    difference to it with its Welch interval, red where the interval is below 0, green above, grey across it."""
    variants, level, n = summary["variants"], round(100 * summary["confidence"]), len(summary["variants"])
    splits = [s for s in ("val", "test") if any(e[s] for e in variants)]
    compared = any(e[s] and e[s]["vs_baseline"] for e in variants for s in splits)
    fig, axes = plt.subplots(1 + compared, len(splits), figsize=(len(splits) * max(6.0, 1.0 * n + 2),
                                                                 5 + 4 * compared), squeeze=False)
    for column, split in enumerate(splits):
        entries = [(x, e[split]) for x, e in enumerate(variants) if e[split]]
        ax, means = axes[0][column], [100 * s["mean"] for _, s in entries]
        ends = [(max(0.0, 100 * s["mean_interval"][0]), min(100.0, 100 * s["mean_interval"][1]))
                if s["mean_interval"] else (m, m) for m, (_, s) in zip(means, entries, strict=True)]
        ax.bar([x for x, _ in entries], means, yerr=[[m - lo for m, (lo, _) in zip(means, ends, strict=True)],
                                                     [hi - m for m, (_, hi) in zip(means, ends, strict=True)]],
               capsize=5, color="#9ecae1", edgecolor="#3182bd", zorder=1)
        for x, s in entries:
            k = len(s["miou"])
            ax.scatter([x + (0.0 if k == 1 else -0.2 + 0.4 * i / (k - 1)) for i in range(k)],
                       [100 * v for v in s["miou"]], color="black", s=16, zorder=3)
        base = next((e[split] for e in variants if e["variant"] == summary["baseline"]), None)
        if base and compared:
            ax.axhline(100 * base["mean"], color="#3182bd", linestyle="--", linewidth=1, zorder=2,
                       label=f"{summary['baseline']} mean")
            ax.legend(loc="upper right")  # above the bars: the axis leaves them the top quarter
        top = min(100.0, max(100 * v for _, s in entries for v in [*s["miou"], *(s["mean_interval"] or ())]))
        ax.set_ylim(0, max(1.35 * top, 1.0))  # never 0 to 0, where every seed scored 0
        ax.set(title=f"{split}: mean mIoU\n{level}% interval of the mean (t), a dot per seed", ylabel="mIoU (%)")
        if compared:
            ax = axes[1][column]
            ax.axhline(0, color="black", linewidth=1, zorder=1)
            for x, vs in ((x, s["vs_baseline"]) for x, s in entries if s["vs_baseline"]):
                diff, interval = 100 * vs["diff"], vs["low"] is not None  # none where a side has 1 seed
                color = "#7f7f7f" if not interval or vs["low"] <= 0 <= vs["high"] else \
                    "#d62728" if vs["high"] < 0 else "#2ca02c"
                ax.errorbar([x], [diff], yerr=[[diff - 100 * vs["low"]], [100 * vs["high"] - diff]] if interval
                            else None, fmt="o", color=color, capsize=5, zorder=3)
            ax.set(title=f"{split}: difference to {summary['baseline']}\n{level}% interval (Welch); red/green: 0 "
                   "outside",
                   ylabel="mIoU difference (points)")
        for ax in axes[:, column]:
            ax.set_xticks(range(n), [e["variant"] for e in variants], rotation=30, ha="right")
            ax.set_xlim(-0.6, n - 0.4)
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def sweep_curves(plt, summary, curves):
    """Left: val mIoU against iteration, a thin line per seed and the mean over the seeds thick, a colour per variant.
    Right: IoU per class, the mean over the seeds, a bar per variant (test where every variant was scored on it, else
    val; past MAX_CONFUSION classes, those whose means differ most between the variants). One legend below both.
    `curves`: {variant: [(seed, [(iteration, val mIoU)])]}, from the runs' log.jsonl."""
    variants = [e for e in summary["variants"] if e["val"]]
    split = "test" if all(e["test"] for e in variants) else "val"
    colours, columns = plt.get_cmap("tab10").colors, 3
    rows = -(-len(variants) // columns)
    height = 5.5 + 0.3 * rows
    fig, (curve_ax, class_ax) = plt.subplots(1, 2, figsize=(15, height), gridspec_kw={"width_ratios": [1, 1.6]})
    for k, entry in enumerate(variants):
        colour, runs = colours[k % len(colours)], curves.get(entry["variant"], [])
        for _, points in runs:
            curve_ax.plot(*zip(*[(i, 100 * m) for i, m in points], strict=True), color=colour, lw=0.8, alpha=0.45)
        shared = sorted(set.intersection(*[{i for i, _ in points} for _, points in runs])) if runs else []
        if shared:
            curve_ax.plot(shared, [100 * np.mean([dict(points)[i] for _, points in runs]) for i in shared],
                          color=colour, lw=2.5, marker="o", ms=4)
    if not curve_ax.lines:
        curve_ax.text(0.5, 0.5, "no validation during training (eval_every=0)", ha="center", va="center",
                      transform=curve_ax.transAxes)
    curve_ax.set(title="val mIoU during training: a thin line per seed, their mean thick", xlabel="iteration",
                 ylabel="mIoU (%)")
    names = list(variants[0][split]["class_iou"]) if variants else []
    table = np.array([[np.nan if (v := e[split]["class_iou"].get(name)) is None else 100 * v for name in names]
                      for e in variants]).reshape(len(variants), len(names))
    shown, many = range(len(names)), len(names) > MAX_CONFUSION
    if many:  # one variant: its lowest classes; more: the largest spreads (fmax/fmin skip a variant's n/a)
        keys = table[0] if len(variants) == 1 else np.fmin.reduce(table, 0) - np.fmax.reduce(table, 0)
        shown = lowest([None if np.isnan(v) else float(v) for v in keys])  # n/a everywhere: last
    width = 0.8 / max(len(variants), 1)
    for k, entry in enumerate(variants):
        seeds = len(entry["val"]["seeds"])
        class_ax.bar([j + (k - (len(variants) - 1) / 2) * width for j in range(len(shown))],
                     [table[k, i] for i in shown], width, color=colours[k % len(colours)],
                     label=f"{entry['variant']} ({seeds} seed{'s' if seeds > 1 else ''})")
    slanted = len(shown) > 8
    class_ax.set_xticks(range(len(shown)), [names[i] for i in shown], rotation=45 if slanted else 0,
                        ha="right" if slanted else "center")
    what = f", the {len(shown)} of {len(names)} classes " + ("that differ most" if len(variants) > 1 else
                                                             "with the lowest IoU") if many else ""
    class_ax.set(title=f"{split}: IoU per class, mean over the seeds{what}", ylabel="IoU (%)", ylim=(0, 100))
    for ax in (curve_ax, class_ax):
        ax.grid(axis="y", alpha=0.3)
    bottom = (0.3 * rows + 0.05) / height
    if variants:
        fig.legend(*class_ax.get_legend_handles_labels(), loc="lower center", ncol=min(columns, len(variants)),
                   frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("path", help="a run directory (curves) or an evaluation JSON (confusion)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        print("error: plots.py draws with matplotlib, which is not installed; pip install -r requirements-plot.txt",
              file=sys.stderr)
        return 2
    try:
        if os.path.isdir(args.path):  # a run folder: its curves, and the confusion of its final evaluation
            written = [plot_curves(os.path.join(args.path, "log.jsonl"), os.path.join(args.path, "curves.png"))]
            if os.path.isfile(os.path.join(args.path, "eval.json")):
                with open(os.path.join(args.path, "eval.json")) as f:
                    written.append(plot_confusion(json.load(f), os.path.join(args.path, "confusion.png")))
        else:
            with open(args.path) as f:
                written = [plot_confusion(json.load(f), confusion_path(args.path))]
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot draw {args.path}: {exc}", file=sys.stderr)
        return 2
    written = [out for out in written if out is not None]
    if not written:
        print(f"error: nothing drawn for {args.path}: it holds no training records or no labelled results",
              file=sys.stderr)
        return 1
    print("\n".join(f"wrote {out}" for out in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
