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
import os
import re
import shlex
import signal
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
from evaluate import read_results
from stats import BASELINE, CONFIDENCE, format_summary, mean, split_summary

RUN_FOLDER = re.compile(r"(?P<variant>.+)_seed(?P<seed>\d+)")
# Keys that may differ between a run and the sweep's record of it without changing its result.
UNSCORED_KEYS = ("seed", "run_name", "out_dir", "resume", "workers", "eval_workers", "log_every", "dist_timeout")
# What a run writes before its first last.pth: a folder holding only these is started again from scratch.
UNSAVED_FILES = ("config.json", "log.jsonl", "curves.png", "confusion.png", "model_best.pth")
DOING = {"new": "training", "resume": "resuming", "finish": "finishing", "evaluate": "evaluating"}



class SweepError(ValueError):
    """Bad input, found before anything is trained: one line, exit 2."""


class Terminated(BaseException):
    """SIGTERM outside train.py's training loop (inside it, train.py stops the run itself)."""


def raise_terminated(signum, frame):
    raise Terminated


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


def check_existing(run):
    """A run folder from an earlier sweep: another model is refused (its weights would not fit), other changes said."""
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


def collect_curves(sweep_dir, summary):
    """{variant: [(seed, [(iteration, val mIoU)])]}: the validation records in the log.jsonl of the summary's runs."""
    curves = {}
    for entry in summary["variants"]:
        for seed in entry["val"]["seeds"]:
            try:
                _, val = plots.read_log(os.path.join(sweep_dir, f"{entry['variant']}_seed{seed}", "log.jsonl"))
            except (OSError, ValueError):  # a folder copied without its log, or a log that is not text: no curve
                continue
            if points := [(r["iter"], r["val_miou"]) for r in val if r["val_miou"] is not None]:
                curves.setdefault(entry["variant"], []).append((seed, points))
    return curves


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


def write_summary(sweep_dir, order=(), quiet=False):
    """summary.md, summary.json, summary.png and summary_curves.png from the eval JSONs (and logs) in sweep_dir; prints
    it (`quiet`: where it is)."""
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
        plots.save(plots.sweep_summary(plt, summary), plt, os.path.join(sweep_dir, "summary.png"))
        plots.save(plots.sweep_curves(plt, summary, collect_curves(sweep_dir, summary)), plt,
                   os.path.join(sweep_dir, "summary_curves.png"))
        png = "summary.png, summary_curves.png"
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
