"""Seeds and spread: train every (variant, seed) pair of a study, then summarize the mIoU with confidence intervals.

    python sweep.py --config camvid_ablation --variants baseline,ablation_no_sp,"arm=false global_pool=false" \\
                    --seeds 0,1,2 [key=value ...]
    python sweep.py ... --test                        # also score each run's test split once, when it finishes
    python sweep.py --config camvid_ablation --summary-only      # rebuild the summary from what exists
    python sweep.py ... --commands > jobs.txt                     # one train.py line per run, for a scheduler

A variant is `baseline` (the --config itself), a preset name (its settings on top of --config: ablation_no_sp is
camvid_ablation with spatial_path=none) or a quoted set of key=value overrides (a list value keeps its commas:
"crop_size=128,128"). The key=value overrides after the options apply to every run, the variant's on top of them.
Each pair is trained as train.py trains it, one after another in this process, in OUT_DIR/sweep_NAME/VARIANT_seedS
(NAME: --name, default the --config name). Rerunning the same command skips finished runs (eval.json written) and
resumes a stopped one from its last.pth; Ctrl-C or SIGTERM stop the current run as train.py does (last.pth written,
exit 130 or 143).

summary.md, summary.json and summary.png in the sweep folder come from the runs' eval JSONs alone (eval.json for val,
eval_test_MODE.json for test), rewritten after every run the sweep finishes, so runs added later (more seeds) count at
the next run or --summary-only: per variant each seed's mIoU, the mean, sample std, min-max, the 95% interval of the
mean (Student's t), the difference of means to baseline with its 95% interval by Welch's t, and the mean IoU per
class; the picture adds the differences with their intervals. Choose on val; test is reported beside.
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
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import evaluate
import plots
import train
from checkpoint import CheckpointError, load_for_inference, save_checkpoint, write_atomically
from cityscapes import DatasetError
from configs import MODEL_KEYS, PRESETS, ConfigError, add_config_args, get_config, upgrade_stored
from datasets import build_dataset
from distributed import Distributed

BASELINE = "baseline"
CONFIDENCE = 0.95
RUN_FOLDER = re.compile(r"(?P<variant>.+)_seed(?P<seed>\d+)")
# Keys that may differ between a run and the sweep's record of it without changing its result.
UNSCORED_KEYS = ("seed", "run_name", "out_dir", "resume", "workers", "eval_workers", "log_every", "dist_timeout")
# What a run writes before its first last.pth: a folder holding only these is started again from scratch.
UNSAVED_FILES = ("config.json", "log.jsonl", "curves.png", "confusion.png", "model_best.pth")


class SweepError(ValueError):
    """Bad input, found before anything is trained: one line, exit 2."""


class Terminated(BaseException):
    """SIGTERM outside train.py's training loop (inside it, train.py stops the run itself)."""


# ---- statistics ----
# Student's t quantile written out (incomplete beta): scipy is not among the project's packages, and a table would
# not cover Welch's fractional degrees of freedom.

mean = statistics.mean  # ValueError (StatisticsError) for no values
sample_std = statistics.stdev  # n - 1 in the denominator; ValueError for fewer than 2 values


def _beta_fraction(a, b, x):
    """The continued fraction of the regularized incomplete beta function, by the modified Lentz method (Numerical
    Recipes, 6.4); it converges fast for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300

    def nonzero(v):
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 / nonzero(1 + numerator * d)
            c = nonzero(1 + numerator / c)
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            return h
    raise ArithmeticError(f"the incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def regularized_beta(a, b, x):
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1 - front * _beta_fraction(b, a, 1 - x) / b


def t_upper_tail(t, df):
    """P(T > t) for Student's t with `df` degrees of freedom (any positive real; math.inf: the normal), t >= 0."""
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2))
    return 0.5 * regularized_beta(df / 2, 0.5, df / (df + t * t))


def t_quantile(p, df):
    """The Student t inverse CDF: the t with P(T <= t) = p, by bisection on the upper tail (exact to float
    precision: the tail is computed directly, not as 1 - CDF)."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0 (got p={p}, df={df})")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    if p == 0.5:
        return 0.0
    tail = 1 - p
    low, high = 0.0, 1.0
    while t_upper_tail(high, df) > tail:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if t_upper_tail(middle, df) > tail else (low, middle)
    return (low + high) / 2


def mean_interval(values, confidence=CONFIDENCE):
    """(low, high): the `confidence` interval of the mean, mean -+ t(n - 1) s / sqrt(n)."""
    n = len(values)
    half = t_quantile(1 - (1 - confidence) / 2, n - 1) * sample_std(values) / math.sqrt(n)
    return mean(values) - half, mean(values) + half


def welch_interval(a, b, confidence=CONFIDENCE):
    """(mean(a) - mean(b), low, high, df): the difference of means with its `confidence` interval by Welch's t, df
    by Welch-Satterthwaite. Where both samples have no spread the interval is the difference itself (df inf)."""
    ua, ub = sample_std(a) ** 2 / len(a), sample_std(b) ** 2 / len(b)
    diff = mean(a) - mean(b)
    if ua + ub == 0:
        return diff, diff, diff, math.inf
    df = (ua + ub) ** 2 / (ua ** 2 / (len(a) - 1) + ub ** 2 / (len(b) - 1))
    half = t_quantile(1 - (1 - confidence) / 2, df) * math.sqrt(ua + ub)
    return diff, diff - half, diff + half, df


# ---- variants and runs ----

def override_text(key, value):
    """key=value as the command line writes it (bools true/false, lists comma-separated)."""
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, (tuple, list)):
        value = ",".join(str(v) for v in value)
    return f"{key}={value}"


def check_items(items, option):
    if not items:
        raise SweepError(f"{option} is empty; expected a comma-separated list")
    duplicates = sorted({s for s in items if items.count(s) > 1})
    if duplicates:
        raise SweepError(f"{option} names {', '.join(map(str, duplicates))} more than once")
    return items


def split_variants(text):
    """--variants split at its commas, except those of a list value: a piece that does not start with a letter
    ("128" of crop_size=128,128) continues the override before it."""
    pieces = []
    for piece in (p.strip() for p in (text or "").split(",")):
        # "128" of crop_size=128,128, or "b" of class_names=a,b (no "=" and no preset of that name): the list goes on
        goes_on = not piece[:1].isalpha() or ("=" not in piece and piece != BASELINE and piece not in PRESETS)
        if pieces and piece and goes_on and "=" in pieces[-1]:
            pieces[-1] += "," + piece
        elif piece:
            pieces.append(piece)
    return check_items(pieces, "--variants")


def parse_seeds(text):
    seeds = [s.strip() for s in (text or "").split(",") if s.strip()]
    if not all(s.isdigit() and int(s) < 2**32 for s in seeds):
        raise SweepError(f"--seeds {text}: expected integers in 0..{2**32 - 1}, e.g. 0,1,2")
    return check_items([int(s) for s in seeds], "--seeds")


def variant_overrides(variant):
    """The key=value overrides variant `variant` puts on top of --config."""
    if variant == BASELINE:
        return []
    if variant in PRESETS:
        return [override_text(k, v) for k, v in PRESETS[variant].items()]
    items = variant.split()
    if not all("=" in item for item in items):
        raise SweepError(f"unknown variant {variant!r}: expected {BASELINE}, a preset ({', '.join(PRESETS)}) or "
                         "key=value overrides")
    return items


def variant_folder(variant):
    """The variant's name in folder names: arm=false global_pool=false -> arm-false+global_pool-false."""
    if variant == BASELINE or variant in PRESETS:
        return variant
    return "+".join(re.sub(r"[^A-Za-z0-9._-]+", "-", item) for item in variant.split())


def check_reserved(overrides, where, allowed=()):
    hints = {"seed": "--seeds", "run_name": "each run's folder is VARIANT_seedS",
             "resume": "rerun the same command to continue", "out_dir": "a common override"}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in hints and key not in allowed:
            raise SweepError(f"{item} in {where}: the sweep sets {key} ({hints[key]})")


def read_variants(text, config, common):
    """[(folder name, overrides, config)] of --variants, checked: each a valid config, no two the same."""
    variants, by_config, by_folder = [], {}, {}
    for variant in split_variants(text):
        overrides = variant_overrides(variant)
        check_reserved(overrides, f"variant {variant!r}")
        try:
            cfg = get_config(config, [*common, *overrides])
        except ConfigError as exc:
            raise SweepError(f"variant {variant!r}: {exc}") from None
        key, folder = json.dumps(cfg.to_dict()), variant_folder(variant)
        if key in by_config:
            raise SweepError(f"variants {by_config[key]!r} and {variant!r} train the same config")
        if folder in by_folder:
            raise SweepError(f"variants {by_folder[folder]!r} and {variant!r} have the same folder name {folder}")
        by_config[key], by_folder[folder] = variant, variant
        variants.append((folder, overrides, cfg))
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


def read_results(path):
    """An eval JSON's results where it holds a score, else None (missing, cut short by a kill, or unscored). A file
    whose figures are not evaluate's (edited by hand: a string, NaN, a number outside 0..1) is left out with a
    warning, once per file: the run counts as not scored."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or results.get("miou") is None:
        return None
    iou = results.get("iou")
    if not (_fraction(results["miou"]) and isinstance(iou, dict) and isinstance(results.get("mode"), str)
            and all(v is None or _fraction(v) for v in iou.values())):
        if path not in _WARNED:
            _WARNED.add(path)
            print(f"warning: {path} does not hold evaluate.py's results (miou {results['miou']!r}): left out; "
                  "delete it to score the run again", file=sys.stderr)
        return None
    return results


_WARNED = set()  # the results files read_results has warned about


def _fraction(value):
    """A real number in 0..1 (not NaN, not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def results_file_on_test(cfg):
    """What evaluate.py writes beside the checkpoint for the test split."""
    return f"eval_test_{cfg.eval_mode}.json"


def check_existing(run):
    """A run folder from an earlier sweep: its model must be the one this sweep asks (SweepError), and other
    differences are said (warning)."""
    try:
        with open(run.path("config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return
    asked = json.loads(json.dumps(run.cfg.to_dict()))  # lists where the config has tuples, as in the file
    saved = upgrade_stored(saved)
    wrong = [k for k in MODEL_KEYS if k in saved and k in asked and saved[k] != asked[k]]
    if wrong:
        trained = ", ".join(override_text(k, saved[k]) for k in wrong)
        raise SweepError(f"{run.run_dir} was trained with {trained}, but variant {run.variant} asks "
                         f"{', '.join(override_text(k, asked[k]) for k in wrong)}: its checkpoint would not fit; "
                         "pass another --name or move the folder away")
    differ = [k for k in saved if k in asked and k not in UNSCORED_KEYS and saved[k] != asked[k]]
    if differ:
        print(f"warning: {run.run_dir} was started with {', '.join(override_text(k, saved[k]) for k in differ)}; "
              f"this sweep asks {', '.join(override_text(k, asked[k]) for k in differ)}", file=sys.stderr)


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
            ckpt = train.load_training_state(run.path("last.pth"))
        except CheckpointError as exc:
            raise SweepError(str(exc)) from None
        done, asked = ckpt["iteration"], run.cfg.max_iter
        if done < asked:
            return "resume"
        if done == asked == ckpt["config"]["max_iter"]:
            return "finish"  # stopped between its last checkpoint and its final weights
        raise SweepError(f"{run.path('last.pth')} holds iteration {done}: max_iter={asked} leaves nothing to train")
    left = os.listdir(run.run_dir) if os.path.isdir(run.run_dir) else []
    unknown = [n for n in left if n not in UNSAVED_FILES and not train.TEMP_FILE.fullmatch(n)]
    if unknown:
        raise SweepError(f"{run.run_dir} holds {', '.join(sorted(unknown))} but no checkpoint to continue from: "
                         "move them away to train the run again")
    return "new"


def plan_runs(config, variants, seeds, common, sweep_dir):
    runs = []
    for folder, overrides, _ in variants:
        for seed in seeds:
            name = f"{folder}_seed{seed}"
            every = [*common, *overrides, f"seed={seed}", f"out_dir={sweep_dir}", f"run_name={name}"]
            run = Run(folder, seed, os.path.join(sweep_dir, name), config, every, get_config(config, every))
            run.state = run_state(run)
            runs.append(run)
    return runs


def check_test_split(runs):
    """--test: a labelled test split, and final weights for every run still to score on it."""
    cfg = runs[0].cfg
    try:
        dataset = build_dataset(cfg, "test")
    except DatasetError as exc:
        raise SweepError(f"--test: {str(exc).splitlines()[0]}") from None
    if not dataset.has_labels:
        raise SweepError("--test: the test split has no labels, so there is nothing to score")
    for run in runs:
        if run.state == "done" and read_results(run.path(results_file_on_test(run.cfg))) is None \
                and not os.path.isfile(run.path("model_final.pth")):
            raise SweepError(f"--test: {run.run_dir} has no model_final.pth to score")


# ---- running ----

@contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated (train.py's training loop puts its own handler in place for its duration)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def evaluate_final(run):
    """eval.json of a run whose final weights exist: the final evaluation train.py runs."""
    try:
        model, cfg = load_for_inference(run.path("model_final.pth"), None, run.overrides)
        with Distributed(cfg.dist_timeout) as proc:
            train.final_evaluation(cfg, proc, model, run.run_dir)
    except (CheckpointError, ConfigError, DatasetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_one(run):
    """Do what is left of `run` (its state); returns the exit code of train.py, or 2 for a failed evaluation."""
    if run.state == "new":
        for name in os.listdir(run.run_dir) if os.path.isdir(run.run_dir) else []:
            os.remove(run.path(name))  # what a run writes before its first checkpoint (run_state checked)
        return train.main(["--config", run.config, *run.overrides])
    if run.state == "resume":
        return train.main([f"resume={run.path('last.pth')}", *run.overrides])
    if run.state == "finish":
        ckpt = train.load_training_state(run.path("last.pth"))
        save_checkpoint(run.path("model_final.pth"), {"model": ckpt["model"], "config": ckpt["config"]})
    return evaluate_final(run)


def ended(what, code, rerun):
    """Say why the sweep ends early (a run stopped by a signal, or failed) and how to go on; returns `code`."""
    how = "stopped" if code in (130, 143) else f"failed (exit {code}, above)"
    print(f"sweep {'stopped' if code in (130, 143) else 'ended'}: {what} {how}; {rerun}", file=sys.stderr)
    return code


def duration(seconds):
    minutes = round(seconds / 60)
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


DOING = {"new": "training", "resume": "resuming", "finish": "finishing", "evaluate": "evaluating"}


def train_runs(runs, rerun, test=False, finished=lambda: None):
    """Each run's work, in order; a progress line per finished run, and with `test` its test split scored right away
    (score_test), while its final weights are surely there: a sweep folder kept without checkpoints (results/, where
    git ignores *.pth) then holds both scores. `finished()` after each run done here (the summary brought up to
    date, so a study stopped between runs has its summary). Returns 0, or the exit code that stopped it."""
    trained = []  # seconds of each run trained (or resumed) here: the estimate of the time left
    start = time.perf_counter()
    for i, run in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] {run.variant} seed {run.seed}"
        if run.state == "done":
            miou = read_results(run.path("eval.json"))["miou"]
            print(f"{label}: finished before (val mIoU {100 * miou:.2f}), skipped", flush=True)
            continue
        print(f"{label}: {DOING[run.state]} {run.run_dir}", flush=True)
        t0 = time.perf_counter()
        code = run_one(run)
        if code:
            return ended(f"{run.variant} seed {run.seed}", code, rerun)
        if run.state in ("new", "resume"):
            trained.append(time.perf_counter() - t0)
        left = sum(r.state in ("new", "resume") for r in runs[i:])
        estimate = f"about {duration(mean(trained) * left)} left ({left} to train)" if left and trained else \
            f"{left} to train" if left else "nothing left to train"
        miou = read_results(run.path("eval.json"))["miou"]
        print(f"{label}: val mIoU {100 * miou:.2f} in {duration(time.perf_counter() - t0)}; elapsed "
              f"{duration(time.perf_counter() - start)}, {estimate}", flush=True)
        code = score_test([run], rerun) if test else 0  # nothing is chosen on it: the same as scoring it at the end
        if code:
            return code
        keep_final_weights_only(run)
        finished()
    return 0


def print_commands(runs, test=False):
    """--commands: one shell line per run left to train, for any scheduler to run (a SLURM job array, GNU parallel,
    one GPU each): train.py as this sweep would run it, then with --test evaluate.py on the test split.
    --summary-only collects the results. Runs stopped after their training are named on stderr: the sweep itself
    (without --commands) finishes them."""
    for run in runs:
        if run.state in ("new", "resume"):
            start = ["--config", run.config] if run.state == "new" else [f"resume={run.path('last.pth')}"]
            line = shlex.join(["python", "train.py", *start, *run.overrides])
            if test:
                line += " && " + shlex.join(["python", "evaluate.py", "--ckpt", run.path("model_final.pth"),
                                             "val_split=test"])
            print(line)
        elif run.state != "done":
            print(f"note: {run.run_dir} is trained; rerun this sweep without --commands to "
                  f"{'evaluate' if run.state == 'evaluate' else 'finish'} it", file=sys.stderr)
    return 0


def keep_final_weights_only(run):
    """A finished run keeps model_final.pth, the weights its eval JSONs score; last.pth and model_best.pth (about
    50 MB each for BiSeNetV1) go: a 21-run study keeps 21 files instead of 63."""
    for name in ("last.pth", "model_best.pth"):
        if os.path.isfile(run.path(name)):
            os.remove(run.path(name))


def score_test(runs, rerun):
    """The test split scored by evaluate.py from each run's final weights, once."""
    for run in runs:
        if read_results(run.path(results_file_on_test(run.cfg))) is not None:
            print(f"test {run.variant} seed {run.seed}: scored before, skipped")
            continue
        print(f"test {run.variant} seed {run.seed}: scoring {run.path('model_final.pth')}", flush=True)
        code = evaluate.main(["--ckpt", run.path("model_final.pth"), "val_split=test"])
        if code:
            return ended(f"scoring {run.variant} seed {run.seed} on test", code, rerun)
    return 0


# ---- the summary ----

def collect(sweep_dir):
    """{variant: [(seed, val results, test results or None)]} of the finished runs in sweep_dir, by seed."""
    runs = {}
    for name in sorted(os.listdir(sweep_dir)) if os.path.isdir(sweep_dir) else []:
        match = RUN_FOLDER.fullmatch(name)
        val = read_results(os.path.join(sweep_dir, name, "eval.json")) if match else None
        if val is None:
            continue
        test = read_results(os.path.join(sweep_dir, name, f"eval_test_{val['mode']}.json"))
        runs.setdefault(match["variant"], []).append((int(match["seed"]), val, test))
    return {variant: sorted(found, key=lambda r: r[0]) for variant, found in runs.items()}


def class_means(results):
    """{class: mean IoU over the results where the class was scored (None where it never was)}."""
    names = list(results[0]["iou"])
    values = {n: [r["iou"][n] for r in results if r["iou"].get(n) is not None] for n in names}
    return {n: mean(v) if v else None for n, v in values.items()}


def split_summary(scored, baseline, confidence):
    """The figures of one split: scored = [(seed, results)]; baseline: the baseline's (None for itself)."""
    if not scored:
        return None
    mious = [r["miou"] for _, r in scored]
    summary = {"seeds": [s for s, _ in scored], "miou": mious, "mean": mean(mious), "std": None,
               "min": min(mious), "max": max(mious), "mean_interval": None, "vs_baseline": None,
               "class_iou": class_means([r for _, r in scored])}
    if len(mious) > 1:
        summary["std"] = sample_std(mious)
        summary["mean_interval"] = list(mean_interval(mious, confidence))
    if baseline:
        base = [r["miou"] for _, r in baseline]
        vs = {"diff": mean(mious) - mean(base), "low": None, "high": None, "df": None}
        if len(mious) > 1 and len(base) > 1:
            diff, low, high, df = welch_interval(mious, base, confidence)
            vs.update(low=low, high=high, df=None if math.isinf(df) else df)
        summary["vs_baseline"] = vs
    return summary


def differences(base_config, config):
    """What a variant's runs were trained with where the baseline's differ (the run's own keys left out)."""
    return [override_text(k, v) for k, v in config.items()
            if k not in UNSCORED_KEYS and k in base_config and base_config[k] != v]


def summarize(runs, order=(), confidence=CONFIDENCE):
    """The summary of collect()'s runs: variants in `order`, then the baseline, then the others by name."""
    order = [*order, BASELINE]
    names = [v for v in dict.fromkeys(order) if v in runs] + sorted(v for v in runs if v not in order)
    base = runs.get(BASELINE)
    variants = []
    for name in names:
        entry = {"variant": name, "differs": differences(base[0][1]["config"], runs[name][0][1]["config"])
                 if base else None}
        for index, split in ((1, "val"), (2, "test")):
            scored = [(r[0], r[index]) for r in runs[name] if r[index] is not None]
            baseline = None if base is None or name == BASELINE else \
                [(r[0], r[index]) for r in base if r[index] is not None]
            entry[split] = split_summary(scored, baseline, confidence)
        variants.append(entry)
    return {"confidence": confidence, "baseline": BASELINE if base else None,
            "unit": "fractions, as in the eval JSONs (x 100: %)", "variants": variants}


def percent(value, signed=False):
    return "" if value is None else f"{100 * value:{'+' if signed else ''}.2f}"


def split_table(summary, split):
    level = round(100 * summary["confidence"])
    rows = [f"| variant | seeds: mIoU | mean [{level}% interval] | std | min-max | vs {BASELINE} [{level}% "
            "interval] | df |", "|---|---|---|---|---|---|---|"]
    for entry in summary["variants"]:
        s = entry[split]
        if s is None:
            continue
        seeds = ", ".join(f"{seed}: {percent(m)}" for seed, m in zip(s["seeds"], s["miou"], strict=True))
        interval = f" [{percent(s['mean_interval'][0])}, {percent(s['mean_interval'][1])}]" if s["mean_interval"] \
            else ""
        vs, df = "", ""
        if s["vs_baseline"]:
            v = s["vs_baseline"]
            vs = percent(v["diff"], True) + (f" [{percent(v['low'], True)}, {percent(v['high'], True)}]"
                                             if v["low"] is not None else "")
            df = "" if v["df"] is None else f"{v['df']:.1f}"
        rows.append(f"| {entry['variant']} | {seeds} | {percent(s['mean'])}{interval} | {percent(s['std'])} | "
                    f"{percent(s['min'])}-{percent(s['max'])} | {vs} | {df} |")
    return rows


def class_table(summary, split):
    entries = [e for e in summary["variants"] if e[split]]
    names = list(entries[0][split]["class_iou"])
    rows = [f"| variant | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    rows += [f"| {e['variant']} | " + " | ".join(percent(e[split]["class_iou"].get(n)) for n in names) + " |"
             for e in entries]
    return rows


def format_summary(summary, sweep_dir):
    level = round(100 * summary["confidence"])
    lines = [f"# Sweep {sweep_dir}", "",
             f"mIoU in %, from the runs' eval JSONs (val: eval.json; test: eval_test_MODE.json). The {level}% interval "
             "of the mean is Student's t with n - 1 degrees of freedom; vs baseline is the difference of the means "
             f"with its {level}% interval by Welch's t (df: Welch-Satterthwaite). Choose on val; test is reported "
             "beside.", ""]
    if summary["baseline"] is None:
        lines += [f"No {BASELINE} runs: no differences.", ""]
    else:
        lines += ["| variant | differs from baseline |", "|---|---|"]
        lines += [f"| {e['variant']} | {' '.join(e['differs']) or '-'} |" for e in summary["variants"]] + [""]
    few = sorted({e["variant"] for e in summary["variants"] for split in ("val", "test")
                  if e[split] and len(e[split]["miou"]) == 2})
    if few:
        lines += [f"Warning: {', '.join(few)} {'has' if len(few) == 1 else 'have'} 2 seeds: the {level}% interval of "
                  "a mean of 2 reaches 12.7 standard errors either side (t with 1 degree of freedom), against 4.3 "
                  "with 3 seeds; run 3 or more seeds (--seeds 0,1,2) to read the differences.", ""]
    for split in ("val", "test"):
        if any(e[split] for e in summary["variants"]):
            lines += [f"## {split} mIoU", "", *split_table(summary, split), "",
                      f"## {split} IoU per class (mean over seeds)", "", *class_table(summary, split), ""]
    return "\n".join(lines)


def plot_summary(summary, path):
    """summary.png (summary_figure). Returns path, or None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    plt = plots.pyplot()
    plots.save(summary_figure(plt, summary), plt, path)
    return path


def summary_figure(plt, summary):
    """A column per split. Top: a bar per variant at its mean mIoU (from 0), its interval of the mean, a dot per seed,
    the baseline's mean as a dashed line. Below, where there is a baseline: each variant's difference to it with its
    Welch interval, red where the interval is below 0, green above, grey where it holds 0."""
    splits = [s for s in ("val", "test") if any(e[s] for e in summary["variants"])]
    compared = any(e[s] and e[s]["vs_baseline"] for e in summary["variants"] for s in splits)
    n = len(summary["variants"])
    fig, axes = plt.subplots(1 + compared, len(splits), figsize=(len(splits) * max(6.0, 1.0 * n + 2),
                                                                 5 + 4 * compared), squeeze=False)
    level = round(100 * summary["confidence"])
    names = [e["variant"] for e in summary["variants"]]
    for column, split in enumerate(splits):
        entries = [(x, e[split]) for x, e in enumerate(summary["variants"]) if e[split]]
        base = next((e[split] for e in summary["variants"] if e["variant"] == BASELINE), None)
        mean_panel(axes[0][column], entries, base["mean"] if base and compared else None, split, level)
        if compared:
            difference_panel(axes[1][column], entries, split, level)
        for ax in axes[:, column]:
            ax.set_xticks(range(n), names, rotation=30, ha="right")
            ax.set_xlim(-0.6, n - 0.4)
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def mean_panel(ax, entries, baseline_mean, split, level):
    """Bars at the means with their intervals, a dot per seed, the baseline's mean (if any) as a dashed line."""
    means = [100 * s["mean"] for _, s in entries]
    # an interval of few seeds can reach past what an mIoU can be: drawn within 0-100 (the table has the numbers)
    errors = [[m - max(0.0, 100 * s["mean_interval"][0]) if s["mean_interval"] else 0 for m, (_, s) in
               zip(means, entries, strict=True)],
              [min(100.0, 100 * s["mean_interval"][1]) - m if s["mean_interval"] else 0 for m, (_, s) in
               zip(means, entries, strict=True)]]
    ax.bar([x for x, _ in entries], means, yerr=errors, capsize=5, color="#9ecae1", edgecolor="#3182bd", zorder=1)
    for x, s in entries:
        k = len(s["miou"])
        offsets = [0.0] if k == 1 else [-0.2 + 0.4 * i / (k - 1) for i in range(k)]
        ax.scatter([x + o for o in offsets], [100 * v for v in s["miou"]], color="black", s=16, zorder=3)
    if baseline_mean is not None:
        ax.axhline(100 * baseline_mean, color="#3182bd", linestyle="--", linewidth=1, zorder=2,
                   label=f"{BASELINE} mean")
        ax.legend(loc="upper right")  # above the bars: the axis leaves them the top quarter
    top = min(100.0, max(100 * v for _, s in entries for v in [*s["miou"], *(s["mean_interval"] or ())]))
    ax.set_ylim(0, max(1.35 * top, 1.0))  # never 0 to 0, where every seed scored 0
    ax.set(title=f"{split}: mean mIoU\n{level}% interval of the mean (t), a dot per seed", ylabel="mIoU (%)")


def difference_panel(ax, entries, split, level):
    """Each variant's difference of means to the baseline with its Welch interval; a line at 0."""
    ax.axhline(0, color="black", linewidth=1, zorder=1)
    for x, s in entries:
        vs = s["vs_baseline"]
        if vs is None:
            continue
        diff = 100 * vs["diff"]
        if vs["low"] is None:
            ax.scatter([x], [diff], color="#7f7f7f", s=30, zorder=3)
            continue
        color = "#d62728" if vs["high"] < 0 else "#2ca02c" if vs["low"] > 0 else "#7f7f7f"
        ax.errorbar([x], [diff], yerr=[[diff - 100 * vs["low"]], [100 * vs["high"] - diff]], fmt="o", color=color,
                    capsize=5, zorder=3)
    ax.set(title=f"{split}: difference to {BASELINE}\n{level}% interval (Welch); red/green: 0 outside",
           ylabel="mIoU difference (points)")


def write_summary(sweep_dir, order=(), quiet=False):
    """summary.md, summary.json and summary.png from the eval JSONs in sweep_dir; prints the summary (`quiet`: only
    where it is)."""
    runs = collect(sweep_dir)
    if not runs:
        raise SweepError(f"no finished runs in {sweep_dir} (VARIANT_seedS folders with an eval.json)")
    summary = summarize(runs, order)
    text = format_summary(summary, sweep_dir)
    write_atomically(os.path.join(sweep_dir, "summary.md"), lambda f: f.write(text.encode()))
    data = json.dumps({"sweep_dir": sweep_dir, **summary}, indent=1, allow_nan=False)
    write_atomically(os.path.join(sweep_dir, "summary.json"), lambda f: f.write(data.encode()))
    picture = plot_summary(summary, os.path.join(sweep_dir, "summary.png"))
    if not quiet:
        print(text)
    png = "summary.png" if picture else \
        "no summary.png: matplotlib is not installed (pip install -r requirements-plot.txt)"
    print(f"summary: {os.path.join(sweep_dir, 'summary.md')} (and summary.json; {png})")


# ---- command line ----

def sweep(args, rerun):
    if "RANK" in os.environ:
        raise SweepError("sweep.py runs its runs in one process: start it with python, not torchrun")
    config = args.config or "cityscapes"
    check_reserved(args.overrides, "the common overrides", allowed=("out_dir",))
    try:
        base = get_config(config, args.overrides)
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    name = args.name or config
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SweepError(f"--name {name!r}: expected a folder name (letters, digits, . _ -)")
    sweep_dir = os.path.join(base.out_dir, f"sweep_{name}")
    if args.summary_only:
        if args.test:
            raise SweepError("--summary-only reads what exists; --test scores: run without --summary-only")
        order = [variant_folder(v) for v in split_variants(args.variants)] if args.variants else []
        write_summary(sweep_dir, order)
        return 0
    if args.variants is None or args.seeds is None:
        raise SweepError("--variants and --seeds are required (or --summary-only)")
    variants = read_variants(args.variants, config, args.overrides)
    seeds = parse_seeds(args.seeds)
    runs = plan_runs(config, variants, seeds, args.overrides, sweep_dir)
    if args.test:
        check_test_split(runs)
    if args.commands:
        return print_commands(runs, args.test)
    counts = {s: sum(r.state == s for r in runs) for s in ("done", "resume", "new")}
    print(f"sweep {sweep_dir}: {len(runs)} runs ({len(variants)} variants x {len(seeds)} seeds); "
          f"{counts['done']} finished, {counts['resume']} to resume, {counts['new']} to train", flush=True)
    order = [v[0] for v in variants]
    code = train_runs(runs, rerun, args.test, lambda: write_summary(sweep_dir, order, quiet=True)) or \
        (score_test(runs, rerun) if args.test else 0)
    if code:
        return code
    write_summary(sweep_dir, order)
    return 0


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
    try:
        with sigterm_raises():
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


if __name__ == "__main__":
    sys.exit(main())
