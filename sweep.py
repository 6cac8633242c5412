"""Seeds and spread: train every (variant, seed) pair of a study, then summarize the mIoU with confidence intervals.

    python sweep.py --config camvid_ablation --variants baseline,ablation_no_sp,"arm=false global_pool=false" \\
                    --seeds 0,1,2 [key=value ...]
    python sweep.py ... --test                        # also score each run's test split once, when it finishes
    python sweep.py --config camvid_ablation --summary-only      # rebuild the summary from what exists
    python sweep.py ... --commands > jobs.txt                     # one train.py line per run, for a scheduler

A variant is `baseline` (the --config), a preset name (on top of --config) or quoted key=value overrides (a list keeps
its commas: "crop_size=128,128"); key=value after the options applies to every run. Runs train one after another in
OUT_DIR/sweep_NAME/VARIANT_seedS; rerunning the command skips finished runs and resumes a stopped one (Ctrl-C, SIGTERM:
exit 130, 143). summary.md, .json and .png come from the runs' eval JSONs: mean mIoU with its 95% interval (Student's
t), difference to baseline with its 95% interval (Welch's t), IoU per class. Choose on val; test is reported beside.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import statistics
import sys
import time
from dataclasses import dataclass

import checkpoint
import evaluate
import plots
import train
from configs import MODEL_KEYS, PRESETS, ConfigError, add_config_args, get_config, upgrade_stored
from datasets import DatasetError, build_dataset
from distributed import Distributed

BASELINE = "baseline"
CONFIDENCE = 0.95
RUN_FOLDER = re.compile(r"(?P<variant>.+)_seed(?P<seed>\d+)")
# Keys that may differ between a run and the sweep's record of it without changing its result.
UNSCORED_KEYS = ("seed", "run_name", "out_dir", "resume", "workers", "eval_workers", "log_every", "dist_timeout")
# What a run writes before its first last.pth: a folder holding only these is started again from scratch.
UNSAVED_FILES = ("config.json", "log.jsonl", "curves.png", "confusion.png", "model_best.pth")
DOING = {"new": "training", "resume": "resuming", "finish": "finishing", "evaluate": "evaluating"}
mean = statistics.mean  # ValueError (StatisticsError) for no values
sample_std = statistics.stdev  # n - 1 in the denominator; ValueError for fewer than 2 values
_WARNED = set()  # the eval JSONs read_results has warned about


class SweepError(ValueError):
    """Bad input, found before anything is trained: one line, exit 2."""


class Terminated(BaseException):
    """SIGTERM outside train.py's training loop (inside it, train.py stops the run itself)."""


def raise_terminated(signum, frame):
    raise Terminated


# ---- statistics: Student's t written out, as scipy is no dependency and a table misses Welch's fractional df ----

def t_upper_tail(t, df):
    """P(T > t), t >= 0: I_x(df / 2, 1 / 2) / 2 at x = df / (df + t^2), the regularized incomplete beta by its series of
    positive terms (DLMF 8.17.8) where x <= 1/2, else by I_x(a, b) = 1 - I_(1-x)(b, a); float precision to df 100."""
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2))
    x = df / (df + t * t)
    a, b, y = (df / 2, 0.5, x) if x <= 0.5 else (0.5, df / 2, 1 - x)
    total, term, n = 0.0, 1.0, 0
    while term > 1e-17 * total:
        total, term, n = total + term, term * (a + b + n) / (a + 1 + n) * y, n + 1
    beta = total * math.exp(a * math.log(y) + b * math.log1p(-y) + math.lgamma(a + b) - math.lgamma(a)
                            - math.lgamma(b)) / a
    return 0.5 * (beta if x <= 0.5 else 1 - beta)


def t_quantile(p, df):
    """The t with P(T <= t) = p, by bisection on the upper tail."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0 (got p={p}, df={df})")
    if p <= 0.5:
        return 0.0 if p == 0.5 else -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_upper_tail(high, df) > 1 - p:
        low, high = high, 2 * high
    while low < (middle := (low + high) / 2) < high:
        low, high = (middle, high) if t_upper_tail(middle, df) > 1 - p else (low, middle)
    return middle


def mean_interval(values, confidence=CONFIDENCE):
    """(low, high): the `confidence` interval of the mean, mean -+ t(n - 1) s / sqrt(n)."""
    half = t_quantile(1 - (1 - confidence) / 2, len(values) - 1) * sample_std(values) / math.sqrt(len(values))
    return mean(values) - half, mean(values) + half


def welch_interval(a, b, confidence=CONFIDENCE):
    """(mean(a) - mean(b), low, high, df) by Welch's t, df by Welch-Satterthwaite (inf where neither has spread)."""
    ua, ub, diff = sample_std(a) ** 2 / len(a), sample_std(b) ** 2 / len(b), mean(a) - mean(b)
    if ua + ub == 0:
        return diff, diff, diff, math.inf
    df = (ua + ub) ** 2 / (ua ** 2 / (len(a) - 1) + ub ** 2 / (len(b) - 1))
    half = t_quantile(1 - (1 - confidence) / 2, df) * math.sqrt(ua + ub)
    return diff, diff - half, diff + half, df


# ---- variants and runs ----

def override_text(key, value):
    """key=value as the command line writes it (bools true/false, lists comma-separated)."""
    text = str(value).lower() if isinstance(value, bool) else \
        ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
    return f"{key}={text}"


def checked_list(items, option):
    if not items:
        raise SweepError(f"{option} is empty; expected a comma-separated list")
    if duplicates := sorted({s for s in items if items.count(s) > 1}):
        raise SweepError(f"{option} names {', '.join(map(str, duplicates))} more than once")
    return items


def split_variants(text):
    """--variants at its commas, but a piece naming no variant ("128" of crop_size=128,128) goes on the one before."""
    pieces = []
    for piece in filter(None, (p.strip() for p in (text or "").split(","))):
        goes_on = not piece[0].isalpha() or ("=" not in piece and piece != BASELINE and piece not in PRESETS)
        if pieces and goes_on and "=" in pieces[-1]:
            pieces[-1] += "," + piece
        else:
            pieces.append(piece)
    return checked_list(pieces, "--variants")


def parse_seeds(text):
    seeds = [s.strip() for s in (text or "").split(",") if s.strip()]
    if not all(s.isdigit() and int(s) < 2**32 for s in seeds):
        raise SweepError(f"--seeds {text}: expected integers in 0..{2**32 - 1}, e.g. 0,1,2")
    return checked_list([int(s) for s in seeds], "--seeds")


def variant_overrides(variant):
    """The key=value overrides variant `variant` puts on top of --config."""
    if variant in PRESETS:
        return [override_text(k, v) for k, v in PRESETS[variant].items()]
    if variant != BASELINE and not all("=" in item for item in variant.split()):
        raise SweepError(f"unknown variant {variant!r}: expected {BASELINE}, a preset ({', '.join(PRESETS)}) or "
                         "key=value overrides")
    return [] if variant == BASELINE else variant.split()


def variant_folder(variant):
    """The variant's name in folder names: arm=false global_pool=false -> arm-false+global_pool-false."""
    if variant == BASELINE or variant in PRESETS:
        return variant
    return "+".join(re.sub(r"[^A-Za-z0-9._-]+", "-", item) for item in variant.split())


def check_reserved(overrides, where, allowed=()):
    hints = {"seed": "--seeds", "run_name": "each run's folder is VARIANT_seedS",
             "resume": "rerun the same command to continue", "out_dir": "a common override"}
    for item in overrides:
        if (key := item.split("=", 1)[0].strip()) in hints and key not in allowed:
            raise SweepError(f"{item} in {where}: the sweep sets {key} ({hints[key]})")


def read_variants(text, config, common):
    """[(folder name, overrides)] of --variants, checked: each a valid config, no two the same."""
    variants, by_config, by_folder = [], {}, {}
    for variant in split_variants(text):
        check_reserved(overrides := variant_overrides(variant), f"variant {variant!r}")
        try:
            cfg = json.dumps(get_config(config, [*common, *overrides]).to_dict())
        except ConfigError as exc:
            raise SweepError(f"variant {variant!r}: {exc}") from None
        if (other := by_config.setdefault(cfg, variant)) != variant:
            raise SweepError(f"variants {other!r} and {variant!r} train the same config")
        if (other := by_folder.setdefault(folder := variant_folder(variant), variant)) != variant:
            raise SweepError(f"variants {other!r} and {variant!r} have the same folder name {folder}")
        variants.append((folder, overrides))
    return variants


@dataclass
class Run:
    variant: str  # the variant's folder name
    seed: int
    run_dir: str
    config: str  # the preset (--config)
    overrides: list  # on top of it: the common ones, the variant's, seed, out_dir, run_name
    cfg: object
    state: str = "new"  # done | evaluate (final weights, no eval.json) | finish (last.pth at max_iter) | resume | new

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def test_results(self):
        return read_results(self.path(f"eval_test_{self.cfg.eval_mode}.json"))  # evaluate.py's name for them


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


def check_existing(run):
    """A run folder from an earlier sweep: another model is refused (its checkpoint would not fit), other differences
    are said."""
    try:
        with open(run.path("config.json")) as f:
            saved = upgrade_stored(json.load(f))
    except (OSError, ValueError):
        return
    asked = json.loads(json.dumps(run.cfg.to_dict()))  # lists where the config has tuples, as in the file

    def said(config, keys):
        return ", ".join(override_text(k, config[k]) for k in keys)

    if wrong := [k for k in MODEL_KEYS if k in saved and k in asked and saved[k] != asked[k]]:
        raise SweepError(f"{run.run_dir} was trained with {said(saved, wrong)}, but variant {run.variant} asks "
                         f"{said(asked, wrong)}: its checkpoint would not fit; pass another --name or move the folder "
                         "away")
    if differ := [k for k in saved if k in asked and k not in UNSCORED_KEYS and saved[k] != asked[k]]:
        print(f"warning: {run.run_dir} was started with {said(saved, differ)}; this sweep asks {said(asked, differ)}",
              file=sys.stderr)


def run_state(run):
    """What is left to do in the run's folder (Run.state); SweepError where it cannot be continued."""
    if any(os.path.isfile(run.path(n)) for n in ("eval.json", "model_final.pth", "last.pth")):
        check_existing(run)
    if read_results(run.path("eval.json")) is not None:
        return "done"
    if os.path.isfile(run.path("model_final.pth")):
        return "evaluate"
    if os.path.isfile(run.path("last.pth")):
        try:
            ckpt = checkpoint.load_training_state(run.path("last.pth"))
        except checkpoint.CheckpointError as exc:
            raise SweepError(str(exc)) from None
        if (done := ckpt["iteration"]) < run.cfg.max_iter:
            return "resume"
        if done == run.cfg.max_iter == ckpt["config"]["max_iter"]:
            return "finish"  # stopped between its last checkpoint and its final weights
        raise SweepError(f"{run.path('last.pth')} holds iteration {done}: max_iter={run.cfg.max_iter} leaves nothing "
                         "to train")
    left = os.listdir(run.run_dir) if os.path.isdir(run.run_dir) else []
    if unknown := sorted(n for n in left if n not in UNSAVED_FILES and not checkpoint.TEMP_FILE.fullmatch(n)):
        raise SweepError(f"{run.run_dir} holds {', '.join(unknown)} but no checkpoint to continue from: move them "
                         "away to train the run again")
    return "new"


def plan_runs(config, variants, seeds, common, sweep_dir, test=False):
    """A Run per (variant, seed) with its state; `test`: a labelled test split and final weights to score on it."""
    runs = []
    for (folder, overrides), seed in ((v, s) for v in variants for s in seeds):
        every = [*common, *overrides, f"seed={seed}", f"out_dir={sweep_dir}", f"run_name={folder}_seed{seed}"]
        runs.append(Run(folder, seed, os.path.join(sweep_dir, f"{folder}_seed{seed}"), config, every,
                        get_config(config, every)))
        runs[-1].state = run_state(runs[-1])
    if test:
        try:
            if not build_dataset(runs[0].cfg, "test").has_labels:
                raise SweepError("--test: the test split has no labels, so there is nothing to score")
        except DatasetError as exc:
            raise SweepError(f"--test: {str(exc).splitlines()[0]}") from None
        for run in runs:
            if run.state == "done" and run.test_results() is None and not os.path.isfile(run.path("model_final.pth")):
                raise SweepError(f"--test: {run.run_dir} has no model_final.pth to score")
    return runs


# ---- running ----

def run_one(run):
    """Do what is left of `run` (its state); returns train.py's exit code, or 2 for a failed evaluation."""
    if run.state == "new":
        for name in os.listdir(run.run_dir) if os.path.isdir(run.run_dir) else []:
            os.remove(run.path(name))  # what a run writes before its first checkpoint (run_state checked)
        return train.main(["--config", run.config, *run.overrides])
    if run.state == "resume":
        return train.main([f"resume={run.path('last.pth')}", *run.overrides])
    if run.state == "finish":  # last.pth at max_iter holds the final weights
        ckpt = checkpoint.load_training_state(run.path("last.pth"))
        checkpoint.save_checkpoint(run.path("model_final.pth"), {"model": ckpt["model"], "config": ckpt["config"]})
    try:  # the final evaluation train.py runs
        model, cfg = checkpoint.load_for_inference(run.path("model_final.pth"), None, run.overrides)
        with Distributed(cfg.dist_timeout) as proc:
            train.final_evaluation(cfg, proc, model, run.run_dir)
    except (checkpoint.CheckpointError, ConfigError, DatasetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def ended(what, code, rerun):
    """Say why the sweep ends early (a run stopped by a signal, or failed) and how to go on; returns `code`."""
    how = ("stopped", "stopped") if code in (130, 143) else ("ended", f"failed (exit {code}, above)")
    print(f"sweep {how[0]}: {what} {how[1]}; {rerun}", file=sys.stderr)
    return code


def duration(seconds):
    minutes = round(seconds / 60)
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes} min" if minutes < 60 else \
        f"{minutes // 60} h {minutes % 60} min"


def train_runs(runs, rerun, test=False, finished=lambda: None):
    """Each run's work in order with a progress line; with `test` its test split scored right away, while its final
    weights are surely there; then `finished()` (the summary brought up to date). Returns 0 or the code that stopped."""
    trained, start = [], time.perf_counter()  # seconds of each run trained here: the estimate of the time left
    for i, run in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] {run.variant} seed {run.seed}"
        if run.state == "done":
            print(f"{label}: finished before (val mIoU {100 * read_results(run.path('eval.json'))['miou']:.2f}), "
                  "skipped", flush=True)
            continue
        print(f"{label}: {DOING[run.state]} {run.run_dir}", flush=True)
        t0 = time.perf_counter()
        if code := run_one(run):
            return ended(f"{run.variant} seed {run.seed}", code, rerun)
        if run.state in ("new", "resume"):
            trained.append(time.perf_counter() - t0)
        left = sum(r.state in ("new", "resume") for r in runs[i:])
        estimate = f"about {duration(mean(trained) * left)} left ({left} to train)" if left and trained else \
            f"{left} to train" if left else "nothing left to train"
        print(f"{label}: val mIoU {100 * read_results(run.path('eval.json'))['miou']:.2f} in "
              f"{duration(time.perf_counter() - t0)}; elapsed {duration(time.perf_counter() - start)}, {estimate}",
              flush=True)
        if code := score_test([run], rerun) if test else 0:  # nothing is chosen on test: as well scored now
            return code
        keep_final_weights_only(run)
        finished()
    return 0


def keep_final_weights_only(run):
    """last.pth and model_best.pth go (about 50 MB each): the eval JSONs score model_final.pth."""
    for name in ("last.pth", "model_best.pth"):
        if os.path.isfile(run.path(name)):
            os.remove(run.path(name))


def score_test(runs, rerun):
    """The test split scored by evaluate.py from each run's final weights, once."""
    for run in runs:
        if run.test_results() is not None:
            print(f"test {run.variant} seed {run.seed}: scored before, skipped")
            continue
        print(f"test {run.variant} seed {run.seed}: scoring {run.path('model_final.pth')}", flush=True)
        if code := evaluate.main(["--ckpt", run.path("model_final.pth"), "val_split=test"]):
            return ended(f"scoring {run.variant} seed {run.seed} on test", code, rerun)
    return 0


def print_commands(runs, test=False):
    """--commands: a shell line per run left to train, train.py as this sweep runs it (with --test, then evaluate.py on
    the test split), for any scheduler; runs stopped after their training are left to the sweep itself."""
    for run in runs:
        if run.state in ("new", "resume"):
            start = ["--config", run.config] if run.state == "new" else [f"resume={run.path('last.pth')}"]
            print(shlex.join(["python", "train.py", *start, *run.overrides]) + (" && " + shlex.join(
                ["python", "evaluate.py", "--ckpt", run.path("model_final.pth"), "val_split=test"]) if test else ""))
        elif run.state != "done":
            print(f"note: {run.run_dir} is trained; rerun this sweep without --commands to "
                  f"{'evaluate' if run.state == 'evaluate' else 'finish'} it", file=sys.stderr)
    return 0


# ---- the summary ----

def collect(sweep_dir):
    """{variant: [(seed, val results, test results or None)]} of the finished runs in sweep_dir, by seed."""
    runs = {}
    for name in sorted(os.listdir(sweep_dir)) if os.path.isdir(sweep_dir) else []:
        match = RUN_FOLDER.fullmatch(name)
        if match and (val := read_results(os.path.join(sweep_dir, name, "eval.json"))) is not None:
            test = read_results(os.path.join(sweep_dir, name, f"eval_test_{val['mode']}.json"))
            runs.setdefault(match["variant"], []).append((int(match["seed"]), val, test))
    return {variant: sorted(found, key=lambda r: r[0]) for variant, found in runs.items()}


def split_summary(scored, baseline, confidence):
    """The figures of one split: scored = [(seed, results)]; baseline: the baseline's (None for itself)."""
    if not scored:
        return None
    mious = [r["miou"] for _, r in scored]
    iou = {n: [r["iou"][n] for _, r in scored if r["iou"].get(n) is not None] for n in scored[0][1]["iou"]}
    summary = {"seeds": [s for s, _ in scored], "miou": mious, "mean": mean(mious), "std": None,
               "min": min(mious), "max": max(mious), "mean_interval": None, "vs_baseline": None,
               "class_iou": {n: mean(v) if v else None for n, v in iou.items()}}  # None: never scored
    if len(mious) > 1:
        summary.update(std=sample_std(mious), mean_interval=list(mean_interval(mious, confidence)))
    if baseline:
        base = [r["miou"] for _, r in baseline]
        vs = summary["vs_baseline"] = {"diff": mean(mious) - mean(base), "low": None, "high": None, "df": None}
        if len(mious) > 1 and len(base) > 1:
            _, low, high, df = welch_interval(mious, base, confidence)
            vs.update(low=low, high=high, df=None if math.isinf(df) else df)
    return summary


def summarize(runs, order=(), confidence=CONFIDENCE):
    """The summary of collect()'s runs: variants in `order`, then the baseline, then the others by name."""
    order = [*order, BASELINE]
    names = [v for v in dict.fromkeys(order) if v in runs] + sorted(v for v in runs if v not in order)
    base = runs.get(BASELINE)
    base_config = base[0][1]["config"] if base else {}
    variants = []
    for name in names:
        entry = {"variant": name, "differs": [override_text(k, v) for k, v in runs[name][0][1]["config"].items()
                                              if k not in UNSCORED_KEYS and k in base_config and base_config[k] != v]
                 if base else None}
        for index, split in ((1, "val"), (2, "test")):
            scored = [(r[0], r[index]) for r in runs[name] if r[index] is not None]
            baseline = [(r[0], r[index]) for r in base if r[index] is not None] if base and name != BASELINE else None
            entry[split] = split_summary(scored, baseline, confidence)
        variants.append(entry)
    return {"confidence": confidence, "baseline": BASELINE if base else None,
            "unit": "fractions, as in the eval JSONs (x 100: %)", "variants": variants}


def percent(value, signed=False, interval=None):
    """value x 100 with 2 decimals ("" for None), then the interval (low, high) in brackets where there is one."""
    text = "" if value is None else f"{100 * value:{'+' if signed else ''}.2f}"
    return text + (f" [{percent(interval[0], signed)}, {percent(interval[1], signed)}]" if interval else "")


def format_summary(summary, sweep_dir):
    variants, level = summary["variants"], round(100 * summary["confidence"])
    lines = [f"# Sweep {sweep_dir}", "",
             f"mIoU in %, from the runs' eval JSONs (val: eval.json; test: eval_test_MODE.json). The {level}% interval "
             "of the mean is Student's t with n - 1 degrees of freedom; vs baseline is the difference of the means "
             f"with its {level}% interval by Welch's t (df: Welch-Satterthwaite). Choose on val; test is reported "
             "beside.", ""]
    lines += [f"No {BASELINE} runs: no differences.", ""] if summary["baseline"] is None else \
        ["| variant | differs from baseline |", "|---|---|",
         *(f"| {e['variant']} | {' '.join(e['differs']) or '-'} |" for e in variants), ""]
    if few := sorted({e["variant"] for e in variants for s in ("val", "test") if e[s] and len(e[s]["miou"]) == 2}):
        lines += [f"Warning: {', '.join(few)} {'has' if len(few) == 1 else 'have'} 2 seeds: the {level}% interval of "
                  "a mean of 2 reaches 12.7 standard errors either side (t with 1 degree of freedom), against 4.3 "
                  "with 3 seeds; run 3 or more seeds (--seeds 0,1,2) to read the differences.", ""]
    for split in ("val", "test"):
        if not (entries := [(e["variant"], e[split]) for e in variants if e[split]]):
            continue
        lines += [f"## {split} mIoU", "", f"| variant | seeds: mIoU | mean [{level}% interval] | std | min-max | vs "
                  f"{BASELINE} [{level}% interval] | df |", "|---|---|---|---|---|---|---|"]
        for name, s in entries:
            vs = s["vs_baseline"] or {"diff": None, "low": None, "df": None}
            seeds = ", ".join(f"{seed}: {percent(m)}" for seed, m in zip(s["seeds"], s["miou"], strict=True))
            lines.append(f"| {name} | {seeds} | {percent(s['mean'], interval=s['mean_interval'])} | "
                         f"{percent(s['std'])} | {percent(s['min'])}-{percent(s['max'])} | "
                         f"{percent(vs['diff'], True, vs['low'] is not None and (vs['low'], vs['high']))} | "
                         f"{'' if vs['df'] is None else format(vs['df'], '.1f')} |")
        classes = list(entries[0][1]["class_iou"])
        lines += ["", f"## {split} IoU per class (mean over seeds)", "", f"| variant | {' | '.join(classes)} |",
                  "|---|" + "---|" * len(classes), *(f"| {name} | " + " | ".join(
                      percent(s["class_iou"].get(c)) for c in classes) + " |" for name, s in entries), ""]
    return "\n".join(lines)


def summary_figure(plt, summary):
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
        base = next((e[split] for e in variants if e["variant"] == BASELINE), None)
        if base and compared:
            ax.axhline(100 * base["mean"], color="#3182bd", linestyle="--", linewidth=1, zorder=2,
                       label=f"{BASELINE} mean")
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
            ax.set(title=f"{split}: difference to {BASELINE}\n{level}% interval (Welch); red/green: 0 outside",
                   ylabel="mIoU difference (points)")
        for ax in axes[:, column]:
            ax.set_xticks(range(n), [e["variant"] for e in variants], rotation=30, ha="right")
            ax.set_xlim(-0.6, n - 0.4)
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def write_summary(sweep_dir, order=(), quiet=False):
    """summary.md, summary.json and summary.png from the eval JSONs in sweep_dir; prints it (`quiet`: where it is)."""
    if not (runs := collect(sweep_dir)):
        raise SweepError(f"no finished runs in {sweep_dir} (VARIANT_seedS folders with an eval.json)")
    summary = summarize(runs, order)
    text, data = format_summary(summary, sweep_dir), json.dumps({"sweep_dir": sweep_dir, **summary}, indent=1,
                                                                allow_nan=False)
    for name, content in (("summary.md", text), ("summary.json", data)):
        checkpoint.write_atomically(os.path.join(sweep_dir, name), lambda f, content=content: f.write(content.encode()))
    png = "no summary.png: matplotlib is not installed (pip install -r requirements-plot.txt)"
    if importlib.util.find_spec("matplotlib") is not None:
        plt = plots.pyplot()
        plots.save(summary_figure(plt, summary), plt, os.path.join(sweep_dir, "summary.png"))
        png = "summary.png"
    if not quiet:
        print(text)
    print(f"summary: {os.path.join(sweep_dir, 'summary.md')} (and summary.json; {png})")


# ---- command line ----

def sweep(args, rerun):
    if "RANK" in os.environ:
        raise SweepError("sweep.py runs its runs in one process: start it with python, not torchrun")
    config = args.config or "cityscapes"
    name = args.name or config
    check_reserved(args.overrides, "the common overrides", allowed=("out_dir",))
    try:
        sweep_dir = os.path.join(get_config(config, args.overrides).out_dir, f"sweep_{name}")
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SweepError(f"--name {name!r}: expected a folder name (letters, digits, . _ -)")
    if args.summary_only:
        if args.test:
            raise SweepError("--summary-only reads what exists; --test scores: run without --summary-only")
        write_summary(sweep_dir, [variant_folder(v) for v in split_variants(args.variants)] if args.variants else [])
        return 0
    if args.variants is None or args.seeds is None:
        raise SweepError("--variants and --seeds are required (or --summary-only)")
    variants, seeds = read_variants(args.variants, config, args.overrides), parse_seeds(args.seeds)
    runs = plan_runs(config, variants, seeds, args.overrides, sweep_dir, args.test)
    if args.commands:
        return print_commands(runs, args.test)
    counts = {s: sum(r.state == s for r in runs) for s in ("done", "resume", "new")}
    print(f"sweep {sweep_dir}: {len(runs)} runs ({len(variants)} variants x {len(seeds)} seeds); "
          f"{counts['done']} finished, {counts['resume']} to resume, {counts['new']} to train", flush=True)
    order = [folder for folder, _ in variants]
    code = train_runs(runs, rerun, args.test, lambda: write_summary(sweep_dir, order, quiet=True)) or \
        (score_test(runs, rerun) if args.test else 0)
    if not code:
        write_summary(sweep_dir, order)
    return code


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--variants", help=f"comma-separated: {BASELINE}, preset names, quoted key=value sets")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--name", help="the sweep folder is OUT_DIR/sweep_NAME (default: the --config name)")
    parser.add_argument("--test", action="store_true", help="also score the test split once per run")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the summary from the eval JSONs")
    parser.add_argument("--commands", action="store_true", help="print one train.py command per run left to train, "
                                                                "for a scheduler to run; --summary-only collects them")
    args = add_config_args(parser).parse_intermixed_args(argv)  # options and key=value in any order
    rerun = ("finished runs are kept and a stopped one continues from its last.pth: rerun the same command, "
             f"python sweep.py {shlex.join(argv)}")
    previous = signal.signal(signal.SIGTERM, raise_terminated)  # train.py's training loop sets its own meanwhile
    try:
        return sweep(args, rerun)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full or read-only disk under the summary files: write_atomically names the file
        print(f"error: {exc.strerror or exc}; the runs' own files are kept: {rerun}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        ctrl_c = isinstance(exc, KeyboardInterrupt)
        print(f"interrupted ({'Ctrl-C' if ctrl_c else 'SIGTERM'}): {rerun}", file=sys.stderr)
        return 130 if ctrl_c else 143
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
