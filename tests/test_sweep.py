import json
import math
import os
import re
import shutil
import signal
import sys
import warnings

import pytest
import torch

import checkpoint
import evaluate
import plots
import stats
import sweep
import train
from configs import PRESETS, get_config

# ---- statistics, against numbers worked by hand ----


def test_mean_and_sample_std_by_hand():
    values = [2, 4, 4, 4, 5, 5, 7, 9]
    # mean 40 / 8 = 5; squared deviations 9 1 1 1 0 0 4 16 = 32; sample variance 32 / 7 = 4.571429
    assert stats.mean(values) == 5
    assert stats.sample_std(values) == pytest.approx(math.sqrt(32 / 7), rel=1e-12)
    with pytest.raises(ValueError):
        stats.sample_std([1.0])


@pytest.mark.parametrize("p, df, expected", [
    (0.975, 1, 12.706),  # the textbook table (two-sided 95%)
    (0.975, 2, 4.303),
    (0.975, 3, 3.182),
    (0.975, 4, 2.776),
    (0.975, 10, 2.228),
    (0.975, 30, 2.042),
    (0.975, 1000, 1.962),
    (0.95, 10, 1.812),
    (0.995, 5, 4.032),
    (0.975, math.inf, 1.960),  # the normal
])
def test_t_quantile_matches_the_textbook_table(p, df, expected):
    assert stats.t_quantile(p, df) == pytest.approx(expected, abs=5e-4)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-expected, abs=5e-4)


def test_t_quantile_matches_the_closed_forms():
    for p in (0.6, 0.9, 0.975, 0.999):
        # df = 1 (Cauchy): t = tan(pi (p - 1/2)); df = 2: t = (2p - 1) sqrt(2 / (4 p (1 - p)))
        assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-10)
    assert stats.t_quantile(0.5, 7) == 0
    # a fractional df (Welch's) lies between its neighbours: t(2) = 4.303 > t(2.5) > t(3) = 3.182; scipy's
    # stats.t.ppf(0.975, 2.5) = 3.574655 (computed outside the tests: scipy is no dependency)
    assert stats.t_quantile(0.975, 2.5) == pytest.approx(3.574655, abs=1e-6)


def test_welch_interval_by_hand():
    # a = 61 63 65: mean 63, variance (4 + 0 + 4) / 2 = 4; b = 59 60 61 60: mean 60, variance (1 + 0 + 1 + 0) / 3 = 2/3
    # squared standard errors: 4 / 3 = 1.333333 and (2/3) / 4 = 0.166667; se = sqrt(1.5) = 1.224745
    # df = 1.5^2 / (1.333333^2 / 2 + 0.166667^2 / 3) = 2.25 / (0.888889 + 0.009259) = 2.505155
    # t(0.975, 2.505155) = 3.569398 (scipy.stats.t.ppf, outside the tests); half width 3.569398 x 1.224745 = 4.371602
    diff, low, high, df = stats.welch_interval([61, 63, 65], [59, 60, 61, 60])
    assert diff == pytest.approx(3)
    assert df == pytest.approx(2.25 / (16 / 9 / 2 + 1 / 36 / 3), rel=1e-12) == pytest.approx(2.505155, abs=1e-6)
    assert (low, high) == pytest.approx((3 - 4.371602, 3 + 4.371602), abs=1e-6)
    # equal spreads: 1 2 3 against 4 5 6, variances 1 and 1, se = sqrt(1/3 + 1/3) = 0.816497,
    # df = (2/3)^2 / (2 (1/3)^2 / 2) = 4, t(0.975, 4) = 2.776445: -3 -+ 2.266958
    assert stats.welch_interval([1, 2, 3], [4, 5, 6]) == pytest.approx((-3, -5.266958, -0.733042, 4), abs=1e-6)
    # b without spread: df = n_a - 1 = 1, se = sqrt(2 / 2) = 1, t(0.975, 1) = tan(0.475 pi) = 12.706205
    assert stats.welch_interval([1, 3], [5, 5, 5]) == pytest.approx((-3, -15.706205, 9.706205, 1), abs=1e-6)


def test_interval_of_the_mean_by_hand():
    # 60 62 64: mean 62, s = 2, t(0.975, 2) = 4.302653: 62 -+ 4.302653 x 2 / sqrt(3) = 62 -+ 4.968275
    assert stats.mean_interval([60, 62, 64]) == pytest.approx((57.031725, 66.968275), abs=1e-6)


# ---- variants ----


def test_variants_split_at_their_commas_and_get_folder_names():
    text = "baseline, ablation_no_sp,crop_size=128,128,arm=false global_pool=false,scales=0.5, 1.0"
    assert sweep.split_variants(text) == ["baseline", "ablation_no_sp", "crop_size=128,128",
                                          "arm=false global_pool=false", "scales=0.5,1.0"]
    assert sweep.variant_folder("arm=false global_pool=false") == "arm-false+global_pool-false"
    assert sweep.variant_folder("crop_size=128,128") == "crop_size-128-128"
    assert sweep.variant_folder("ablation_no_sp") == "ablation_no_sp"


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_variant_is_its_preset_written_as_overrides(name):
    cfg = get_config("cityscapes", sweep.variant_overrides(name))
    assert {k: getattr(cfg, k) for k in PRESETS[name]} == dict(PRESETS[name])


def test_the_ablation_preset_is_camvid_on_a_schedule_for_21_runs_in_8_hours():
    # the camvid recipe with the paper's ARM and global pooling, which the study measures and camvid now leaves out
    study = get_config("camvid_ablation").to_dict()
    camvid = get_config("camvid", ["arm=true", "global_pool=true"]).to_dict()
    changed = {k for k in study if study[k] != camvid[k]}
    assert changed <= {"max_iter", "warmup_iters", "ckpt_every", "eval_every", "run_name", "amp"}
    assert study["amp"] == "none"  # one arithmetic on every CPU the study is resumed on
    # the camvid run: 2700 iterations in 104 min on 2 CPU cores (benchmarks/measured.md); validation 15 s each
    seconds_per_run = study["max_iter"] * 104 * 60 / 2700 + 15 * study["max_iter"] / max(study["eval_every"], 1)
    assert 21 * seconds_per_run <= 8 * 3600


# ---- the summary, from eval JSONs written by hand ----


def write_eval(run_dir, miou, iou, split="val", spatial_path="conv"):
    os.makedirs(run_dir, exist_ok=True)
    config = {"seed": int(run_dir.rsplit("seed", 1)[1]), "run_name": os.path.basename(run_dir),
              "spatial_path": spatial_path, "max_iter": 500}
    results = {"mode": "ss", "split": split, "miou": miou, "iou": iou, "config": config}
    with open(os.path.join(run_dir, "eval.json" if split == "val" else "eval_test_ss.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture
def hand_sweep(tmp_path):
    root = str(tmp_path / "sweep_camvid")
    for seed, miou, road, car in ((0, 0.60, 0.90, 0.30), (1, 0.62, 0.92, 0.34), (2, 0.64, 0.94, None)):
        write_eval(f"{root}/baseline_seed{seed}", miou, {"road": road, "car": car})
    for seed, miou in ((0, 0.56), (1, 0.58), (2, 0.60)):
        write_eval(f"{root}/ablation_no_sp_seed{seed}", miou, {"road": 0.8, "car": None}, spatial_path="none")
    for seed, miou in ((0, 0.50), (1, 0.54)):  # seed 2 of the baseline was not scored on test
        write_eval(f"{root}/baseline_seed{seed}", miou, {"road": 0.7, "car": 0.2}, split="test")
    for seed, miou in ((0, 0.48), (1, 0.50), (2, 0.52)):
        write_eval(f"{root}/ablation_no_sp_seed{seed}", miou, {"road": 0.6, "car": None}, split="test",
                   spatial_path="none")
    # not finished: a run folder without eval.json, one whose eval.json a kill cut short, and a stray folder
    os.makedirs(f"{root}/ablation_no_sp_seed3")
    with open(f"{root}/ablation_no_sp_seed3/config.json", "w") as f:
        f.write("{}")
    os.makedirs(f"{root}/ablation_no_sp_seed4")
    with open(f"{root}/ablation_no_sp_seed4/eval.json", "w") as f:
        f.write('{"mode": "ss", "miou": 0.9')
    os.makedirs(f"{root}/notes")
    return tmp_path, root


def test_the_summary_is_computed_from_the_eval_jsons_alone(hand_sweep, capsys):
    tmp_path, root = hand_sweep
    assert sweep.main(["--config", "camvid", f"out_dir={tmp_path}", "--summary-only"]) == 0
    with open(f"{root}/summary.json") as f:
        summary = json.load(f)
    base, ablation = summary["variants"]
    assert (base["variant"], ablation["variant"], summary["baseline"]) == ("baseline", "ablation_no_sp", "baseline")
    assert ablation["differs"] == ["spatial_path=none"] and base["differs"] == []
    val = base["val"]
    assert val["seeds"] == [0, 1, 2] and val["miou"] == [0.60, 0.62, 0.64]
    # 0.60 0.62 0.64: mean 0.62, s = 0.02, interval 0.62 -+ 4.302653 x 0.02 / sqrt(3) = 0.62 -+ 0.049683
    assert (val["mean"], val["std"], val["min"], val["max"]) == pytest.approx((0.62, 0.02, 0.60, 0.64))
    assert val["mean_interval"] == pytest.approx([0.62 - 0.049683, 0.62 + 0.049683], abs=1e-6)
    assert val["vs_baseline"] is None
    assert val["class_iou"] == pytest.approx({"road": 0.92, "car": 0.32})  # car: seeds 0 and 1 only
    # 0.56 0.58 0.60 against 0.60 0.62 0.64: both variances 0.0004, se = sqrt(2 x 0.0004 / 3) = 0.016330,
    # df = 4, t(0.975, 4) = 2.776445: -0.04 -+ 0.045339
    vs = ablation["val"]["vs_baseline"]
    assert (vs["diff"], vs["low"], vs["high"], vs["df"]) == pytest.approx((-0.04, -0.085339, 0.005339, 4), abs=1e-6)
    assert ablation["val"]["class_iou"] == pytest.approx({"road": 0.8, "car": None})
    # test: 0.48 0.50 0.52 (variance 0.0004) against 0.50 0.54 (variance 0.0008): squared standard errors
    # 0.0004 / 3 = 0.000133 and 0.0008 / 2 = 0.0004, se = sqrt(0.000533) = 0.023094,
    # df = 0.000533^2 / (0.000133^2 / 2 + 0.0004^2 / 1) = 1.684211, t(0.975, 1.684211) = 5.176232 (scipy, outside the
    # tests): half width 0.119540
    test = ablation["test"]
    assert (test["mean"], test["std"]) == pytest.approx((0.50, 0.02))
    assert base["test"]["miou"] == [0.50, 0.54] and base["test"]["std"] == pytest.approx(math.sqrt(0.0008))
    vs = test["vs_baseline"]
    assert (vs["diff"], vs["low"], vs["high"], vs["df"]) == pytest.approx((-0.02, -0.13954, 0.09954, 1.684211),
                                                                          abs=1e-5)
    with open(f"{root}/summary.md") as f:
        text = f.read()
    assert "| baseline | 0: 60.00, 1: 62.00, 2: 64.00 | 62.00 [57.03, 66.97] | 2.00 | 60.00-64.00 |  |  |" in text
    assert "| ablation_no_sp | 0: 56.00, 1: 58.00, 2: 60.00 | 58.00 [53.03, 62.97] | 2.00 | 56.00-60.00 | " \
           "-4.00 [-8.53, +0.53] | 4.0 |" in text
    assert "| ablation_no_sp | 80.00 |  |" in text and "| baseline | 92.00 | 32.00 |" in text
    assert "## test mIoU" in text and "| ablation_no_sp | spatial_path=none |" in text
    assert os.path.getsize(f"{root}/summary.png") > 0
    assert text in capsys.readouterr().out


def errorbars(ax):
    """[(x, y, low, high, colour)] of the error bars drawn on ax."""
    from matplotlib.colors import to_hex

    out = []
    for container in ax.containers:
        if hasattr(container, "has_yerr") and container.has_yerr and container[0] is not None:
            x, y = (float(v[0]) for v in container[0].get_data())
            (_, low), (_, high) = container[2][0].get_segments()[0]
            out.append((x, y, float(low), float(high), to_hex(container[0].get_color())))
    return out


def test_the_summary_picture_draws_the_means_from_zero_and_the_differences_with_their_intervals(hand_sweep):
    pytest.importorskip("matplotlib")
    _, root = hand_sweep
    summary = sweep.summarize(sweep.collect(root))
    plt = plots.pyplot()
    fig = plots.sweep_summary(plt, summary)
    try:
        (val_means, test_means), (val_diffs, test_diffs) = fig.axes[:2], fig.axes[2:]
        # val: baseline 0.60 0.62 0.64, ablation 0.56 0.58 0.60 (the numbers of the summary test above)
        assert [p.get_height() for p in val_means.patches] == pytest.approx([62.0, 58.0])
        assert val_means.get_ylim()[0] == 0  # bars from zero: their lengths compare
        dashed = [line for line in val_means.lines if line.get_linestyle() == "--"]
        assert len(dashed) == 1 and list(dashed[0].get_ydata()) == pytest.approx([62.0, 62.0])
        seeds = sorted(float(y) for c in val_means.collections if c.get_offsets().shape[0] == 3
                       for _, y in c.get_offsets())
        assert seeds == pytest.approx([56, 58, 60, 60, 62, 64])
        # the difference -4.00 [-8.53, +0.53] holds 0: grey, at the ablation's x (1)
        [(x, y, low, high, colour)] = errorbars(val_diffs)
        assert (x, y, low, high) == pytest.approx((1, -4.0, -8.5339, 0.5339), abs=1e-3)
        assert colour == "#7f7f7f"
        # test: 0.48 0.50 0.52 against 0.50 0.54, -2.00 [-13.95, +9.95]
        [(x, y, low, high, colour)] = errorbars(test_diffs)
        assert (x, y, low, high, colour) == pytest.approx((1, -2.0, -13.954, 9.954, "#7f7f7f"), abs=1e-3)
        assert [p.get_height() for p in test_means.patches] == pytest.approx([52.0, 50.0])
    finally:
        plt.close(fig)


@pytest.mark.parametrize("low, high, colour", [(-0.05, -0.01, "#d62728"), (0.01, 0.05, "#2ca02c"),
                                               (-0.01, 0.05, "#7f7f7f")])
def test_a_difference_whose_interval_leaves_out_zero_is_drawn_red_below_and_green_above(low, high, colour):
    pytest.importorskip("matplotlib")

    def split(m, vs):
        return {"seeds": [0, 1], "miou": [m - 0.01, m + 0.01], "mean": m, "mean_interval": [m - 0.1, m + 0.1],
                "vs_baseline": vs}
    summary = {"confidence": 0.95, "baseline": "baseline", "variants": [
        {"variant": "baseline", "val": split(0.5, None), "test": None},
        {"variant": "arm=false", "val": split(0.5, {"diff": (low + high) / 2, "low": low, "high": high}),
         "test": None}]}
    plt = plots.pyplot()
    fig = plots.sweep_summary(plt, summary)
    try:
        [(_, y, got_low, got_high, got_colour)] = errorbars(fig.axes[1])
        assert (y, got_low, got_high, got_colour) == pytest.approx((50 * (low + high), 100 * low, 100 * high, colour))
    finally:
        plt.close(fig)


def test_a_sweep_whose_seeds_all_scored_zero_draws_without_a_warning():
    pytest.importorskip("matplotlib")
    zero = {"seeds": [0, 1], "miou": [0.0, 0.0], "mean": 0.0, "mean_interval": [0.0, 0.0], "vs_baseline": None}
    summary = {"confidence": 0.95, "baseline": "baseline",
               "variants": [{"variant": "baseline", "val": zero, "test": None}]}
    plt = plots.pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns about a 0-to-0 axis
        fig = plots.sweep_summary(plt, summary)
    try:
        assert fig.axes[0].get_ylim() == (0, 1)
    finally:
        plt.close(fig)


def test_the_summary_skips_its_picture_without_matplotlib_in_one_line(hand_sweep, monkeypatch, capsys):
    tmp_path, root = hand_sweep
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert sweep.main(["--config", "camvid", f"out_dir={tmp_path}", "--summary-only"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "matplotlib" in line]
    assert lines == [f"summary: {root}/summary.md (and summary.json; no summary.png: matplotlib is not installed "
                     "(pip install -r requirements-plot.txt))"]
    assert not os.path.exists(f"{root}/summary.png") and os.path.isfile(f"{root}/summary.md")


# ---- bad input: one line, exit 2, nothing trained ----


@pytest.mark.parametrize("argv, words", [
    (["--variants", "baseline,ablation_no_spp", "--seeds", "0"], "unknown variant 'ablation_no_spp': expected"),
    (["--variants", "arm=maybe", "--seeds", "0"], "variant 'arm=maybe': bad value for arm"),
    (["--variants", "colour=red", "--seeds", "0"], "variant 'colour=red': unknown config key 'colour'"),
    (["--variants", "baseline", "--seeds", "0,1,0"], "--seeds names 0 more than once"),
    (["--variants", "baseline,ablation_no_sp,baseline", "--seeds", "0"], "--variants names baseline more than once"),
    (["--variants", "baseline,arm=false", "--seeds", "0"], "variants 'baseline' and 'arm=false' train the same config"),
    (["--variants", "data_root=a/b,data_root=a:b", "--seeds", "0"],
     "variants 'data_root=a/b' and 'data_root=a:b' have the same folder name data_root-a-b"),
    (["--variants", ",", "--seeds", "0"], "--variants is empty"),
    (["--variants", "baseline", "--seeds", ""], "--seeds is empty"),
    (["--variants", "baseline", "--seeds", "0,x"], "--seeds 0,x: expected integers in 0..4294967295"),
    (["--variants", "baseline", "--seeds", "0", "seed=3"],
     "seed=3 in the common overrides: the sweep sets seed (--seeds)"),
    (["--variants", "run_name=x", "--seeds", "0"], "run_name=x in variant 'run_name=x': the sweep sets run_name"),
    (["--seeds", "0"], "--variants and --seeds are required"),
    (["--variants", "baseline", "--seeds", "0", "--config", "nope"], "unknown config 'nope'"),
    (["--variants", "baseline", "--seeds", "0", "--name", "a/b"], "--name 'a/b': expected a folder name"),
    (["--summary-only", "--test"], "--summary-only reads what exists"),
    (["--summary-only"], "no finished runs in"),
    (["--variants", "baseline", "--seeds", "0", "--test", "data_root=/no/such/folder"],
     "--test: image folder not found: /no/such/folder/test"),
])
def test_bad_input_is_one_line_and_trains_nothing(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail("trained"))
    monkeypatch.setattr(evaluate, "main", lambda argv: pytest.fail("evaluated"))
    assert sweep.main(["--config", "camvid", f"out_dir={tmp_path}", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and words in err, err


def test_a_variant_whose_checkpoint_would_not_fit_its_folder_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail("trained"))
    run_dir = tmp_path / "sweep_camvid" / "ablation_no_sp_seed0"
    run_dir.mkdir(parents=True)  # a run of another sweep under this name: trained with spatial_path=conv
    (run_dir / "config.json").write_text(json.dumps(get_config("camvid", ["seed=0"]).to_dict()))
    (run_dir / "last.pth").write_bytes(b"a checkpoint")
    assert sweep.main(["--config", "camvid", f"out_dir={tmp_path}", "--variants", "baseline,ablation_no_sp",
                       "--seeds", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"error: {run_dir} was trained with spatial_path=conv, but variant ablation_no_sp "
                                 "asks spatial_path=none: its checkpoint would not fit; pass another --name or move "
                                 "the folder away\n")


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_between_runs_ends_the_sweep_with_the_command_to_continue(signum, code, said, tmp_path,
                                                                        monkeypatch, capsys):
    # outside train.py's training loop (its data preparation, its final evaluation), where train.py has no handler
    # raise_signal signals this thread: os.kill of the process may land on another thread, whose flag the main
    # thread only sees some bytecodes later (a flaky failure under load)
    monkeypatch.setattr(train, "main", lambda argv: signal.raise_signal(signum))
    argv = ["--config", "camvid", f"out_dir={tmp_path}", "--variants", "baseline", "--seeds", "0"]
    handler = signal.getsignal(signal.SIGTERM)
    # Python's own Ctrl-C handler, as in a terminal: a shell starts a background job (`pytest ... &`) with SIGINT
    # ignored, and Python then keeps it ignored
    interactive = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert sweep.main(argv) == code
    finally:
        signal.signal(signal.SIGINT, interactive)
    assert signal.getsignal(signal.SIGTERM) is handler
    err = capsys.readouterr().err
    assert err == (f"interrupted ({said}): finished runs are kept and a stopped one continues from its last.pth: "
                   f"rerun the same command, python sweep.py --config camvid out_dir={tmp_path} --variants baseline "
                   "--seeds 0\n")


# ---- a sweep stopped by Ctrl-C, continued ----


def sweep_args(root, out, *extra):
    from conftest import FOLDER_OVERRIDES
    return ["--config", "camvid", "--variants", "baseline,ablation_no_sp", "--seeds", "0", *FOLDER_OVERRIDES,
            f"data_root={root}", f"out_dir={out}", "crop_size=24,32", "scales=1,1", "batch_size=2", "max_iter=4",
            "warmup_iters=1", "log_every=1", "ckpt_every=1", "workers=0", "eval_workers=0", "amp=none",
            "channels_last=false", "eval_every=0", *extra]


def files_and_times(run_dir):
    return {n: os.stat(os.path.join(run_dir, n)).st_mtime_ns for n in sorted(os.listdir(run_dir))}


def train_records(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line)["iter"] for line in f if '"loss"' in line]


def test_a_rerun_skips_finished_runs_and_resumes_the_stopped_one(tiny_folder, tmp_path, monkeypatch, capsys):
    first, second = tmp_path / "sweep_camvid" / "baseline_seed0", tmp_path / "sweep_camvid" / "ablation_no_sp_seed0"
    step, calls = train.train_step, []

    def ctrl_c_in_the_second_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # iteration 1 of the second run (the first run takes 4): as if Ctrl-C was pressed
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", ctrl_c_in_the_second_run)
    monkeypatch.setattr(sweep, "keep_final_weights_only", lambda run: None)  # the states below need last.pth
    assert sweep.main(sweep_args(tiny_folder, tmp_path)) == 130
    err = capsys.readouterr().err
    # train.py finishes the iteration that was running when the signal came (2), writes last.pth and stops
    assert "stopped by SIGINT after iteration 2" in err
    assert "sweep stopped: ablation_no_sp seed 0 stopped; finished runs are kept and a stopped one continues from " \
           "its last.pth: rerun the same command, python sweep.py --config camvid" in err
    assert torch.load(second / "last.pth", weights_only=True)["iteration"] == 2
    assert not (second / "model_final.pth").exists() and (first / "eval.json").is_file()
    # the summary was brought up to date when the first run finished: it holds that run alone
    with open(tmp_path / "sweep_camvid" / "summary.json") as f:
        assert [(v["variant"], v["val"]["seeds"]) for v in json.load(f)["variants"]] == [("baseline", [0])]
    monkeypatch.undo()
    monkeypatch.setattr(sweep, "keep_final_weights_only", lambda run: None)
    before = files_and_times(first)
    for split in ("test", "testannot"):  # a test split for --test: the val frames again
        shutil.copytree(os.path.join(tiny_folder, split.replace("test", "val")), os.path.join(tiny_folder, split))

    assert sweep.main(sweep_args(tiny_folder, tmp_path, "--test")) == 0
    out = capsys.readouterr().out
    assert "[1/2] baseline seed 0: finished before (val mIoU" in out
    assert out.count("resuming from") == 1 and f"resuming from {second / 'last.pth'} at iteration 2" in out
    assert re.search(r"\[2/2\] ablation_no_sp seed 0: val mIoU \d+\.\d\d in \d+ s; elapsed \d+ s, nothing left to "
                     "train", out)
    # the first run was not trained again: its files are those it had, untouched, plus its test score
    after = files_and_times(first)
    assert {n: after[n] for n in before} == before
    assert set(after) - set(before) == {"eval_test_ss.json", "eval_test_ss_confusion.png"}
    assert train_records(first) == [1, 2, 3, 4] and train_records(second) == [1, 2, 3, 4]
    with open(tmp_path / "sweep_camvid" / "summary.json") as f:
        summary = json.load(f)
    assert [(v["variant"], v["val"]["seeds"], v["test"]["seeds"]) for v in summary["variants"]] == [
        ("baseline", [0], [0]), ("ablation_no_sp", [0], [0])]
    with open(first / "eval.json") as f:
        val_miou = json.load(f)["miou"]
    assert summary["variants"][0]["val"]["miou"] == [val_miou]

    # a run stopped in its final evaluation (eval.json missing) is only evaluated; test scores are kept
    os.remove(first / "eval.json")
    tested = {n: t for n, t in files_and_times(first).items() if "test" in n or n.endswith(".pth")}
    assert sweep.main(sweep_args(tiny_folder, tmp_path, "--test")) == 0
    out = capsys.readouterr().out
    assert f"[1/2] baseline seed 0: evaluating {first}" in out and "resuming" not in out and "scored before" in out
    assert {n: t for n, t in files_and_times(first).items() if n in tested} == tested
    with open(first / "eval.json") as f:
        assert json.load(f)["miou"] == val_miou

    # stopped between its last checkpoint (at max_iter) and its final weights: these are last.pth's, then evaluated
    os.remove(first / "eval.json")
    os.remove(first / "model_final.pth")
    assert sweep.main(sweep_args(tiny_folder, tmp_path)) == 0
    assert f"[1/2] baseline seed 0: finishing {first}" in capsys.readouterr().out
    final, last = (torch.load(first / n, weights_only=True) for n in ("model_final.pth", "last.pth"))
    assert final.keys() == {"model", "config"} and final["config"] == last["config"]
    assert all(torch.equal(final["model"][k], last["model"][k]) for k in last["model"])
    with open(first / "eval.json") as f:
        assert json.load(f)["miou"] == val_miou


# ---- what a run folder holds: what is left to do ----


def hand_run(tmp_path, max_iter=4):
    overrides = [f"max_iter={max_iter}", "warmup_iters=1"]
    return sweep.Run("baseline", 0, str(tmp_path / "baseline_seed0"), "camvid", overrides,
                     get_config("camvid", overrides))


def write_last(run, iteration, max_iter):
    config = get_config("camvid", [f"max_iter={max_iter}", "warmup_iters=1"]).to_dict()
    torch.save({"model": {}, "optimizer": {}, "scaler": {}, "iteration": iteration, "config": config, "rng": {}},
               run.path("last.pth"))


def test_the_state_of_a_run_folder(tmp_path):
    run = hand_run(tmp_path)
    assert sweep.run_state(run) == "new"  # no folder
    os.makedirs(run.run_dir)
    for name in ("config.json", "log.jsonl", "model_best.pth", "last.pth.tmp123"):  # killed before its last.pth
        with open(run.path(name), "w") as f:
            f.write("{}")
    assert sweep.run_state(run) == "new"
    with open(run.path("notes.txt"), "w") as f:
        f.write("mine")
    with pytest.raises(sweep.SweepError, match="holds notes.txt but no checkpoint to continue from"):
        sweep.run_state(run)
    os.remove(run.path("notes.txt"))
    write_last(run, 2, 4)
    assert sweep.run_state(run) == "resume"
    write_last(run, 4, 4)
    assert sweep.run_state(run) == "finish"
    write_last(run, 4, 8)  # a longer run stopped at 4 is not finished by a sweep that now asks max_iter=4
    with pytest.raises(sweep.SweepError, match="holds iteration 4: max_iter=4 leaves nothing to train"):
        sweep.run_state(run)
    with open(run.path("model_final.pth"), "w") as f:
        f.write("weights")
    assert sweep.run_state(run) == "evaluate"
    with open(run.path("eval.json"), "w") as f:
        f.write('{"miou": 0.5')  # cut short by a kill: not finished
    assert sweep.run_state(run) == "evaluate"
    with open(run.path("eval.json"), "w") as f:
        f.write('{"mode": "ss", "miou": 0.5, "iou": {"road": 0.5}}')
    assert sweep.run_state(run) == "done"


def test_a_stop_in_a_runs_last_iteration_ends_the_sweep_and_a_rerun_finishes_it(tiny_folder, tmp_path, monkeypatch,
                                                                                   capsys):
    first, second = tmp_path / "sweep_camvid" / "baseline_seed0", tmp_path / "sweep_camvid" / "ablation_no_sp_seed0"
    step, calls = train.train_step, []

    def sigterm_in_the_last_iteration(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the first run's last iteration (max_iter=4), as a preemption warning would come
            signal.raise_signal(signal.SIGTERM)
            args = (*args[:9], True, *args[10:])
        return step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", sigterm_in_the_last_iteration)
    assert sweep.main(sweep_args(tiny_folder, tmp_path)) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after the last iteration (4)" in err and "sweep stopped: baseline seed 0 stopped" in err
    assert not second.exists()  # no other run started
    assert (first / "model_final.pth").is_file() and not (first / "eval.json").exists()
    monkeypatch.undo()
    assert sweep.main(sweep_args(tiny_folder, tmp_path)) == 0  # evaluates the first, trains the second
    assert (first / "eval.json").is_file() and (second / "eval.json").is_file()
    assert train_records(first) == [1, 2, 3, 4]


# ---- hostile input ----

@pytest.mark.parametrize("miou", ["0.7", float("nan"), 3.5, True])
def test_a_hand_edited_eval_json_is_left_out_with_one_warning(hand_sweep, capsys, miou):
    tmp_path, root = hand_sweep
    write_eval(f"{root}/baseline_seed2", miou, {"road": 0.9, "car": 0.3})
    assert sweep.main(["--config", "camvid", f"out_dir={tmp_path}", "--summary-only"]) == 0
    err = capsys.readouterr().err
    assert err.count(f"warning: {root}/baseline_seed2/eval.json does not hold evaluate.py's results") == 1
    with open(f"{root}/summary.json") as f:
        assert json.load(f)["variants"][0]["val"]["seeds"] == [0, 1]


def test_a_full_disk_under_the_summary_is_one_line(hand_sweep, capsys, monkeypatch):
    tmp_path, root = hand_sweep

    def full(path, write):
        raise OSError(28, f"cannot write {path}: No space left on device")

    monkeypatch.setattr(checkpoint, "write_atomically", full)
    assert sweep.main(["--config", "camvid", f"out_dir={tmp_path}", "--summary-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {root}/summary.md: No space left on device; the runs' own files are "
                          "kept") and err.count("\n") == 1


def test_a_list_value_in_variants_keeps_its_commas():
    assert sweep.split_variants("baseline,class_names=a,b,ablation_no_sp,crop_size=128,128") == \
        ["baseline", "class_names=a,b", "ablation_no_sp", "crop_size=128,128"]


@pytest.mark.parametrize("seeds", ["99999999999999999999999", "-1", "4294967296"])
def test_seeds_outside_the_generators_range_are_refused(seeds):
    with pytest.raises(sweep.SweepError, match=r"expected integers in 0\.\.4294967295"):
        sweep.parse_seeds(seeds)


def test_two_seeds_are_warned_of_and_no_interval_is_drawn_outside_0_to_100(tmp_path):
    root = str(tmp_path / "sweep_camvid")
    for seed, miou in ((0, 0.02), (1, 0.10)):  # mean 6, 95% interval of 2 seeds [-44.8, +56.8]
        write_eval(f"{root}/baseline_seed{seed}", miou, {"road": miou})
    summary = sweep.summarize(sweep.collect(root))
    text = stats.format_summary(summary, root)
    assert "Warning: baseline has 2 seeds: the 95% interval of a mean of 2 reaches 12.7 standard errors either side" \
           in text
    low, high = summary["variants"][0]["val"]["mean_interval"]
    assert low < 0 < high < 1  # the number stays in the table and the JSON
    pytest.importorskip("matplotlib")
    plt = plots.pyplot()
    fig = plots.sweep_summary(plt, summary)
    try:
        [bars] = [c for c in fig.axes[0].containers if getattr(c, "errorbar", None) is not None]
        [segment] = bars.errorbar.lines[2][0].get_segments()
        assert segment[:, 1].min() == 0 and segment[:, 1].max() == pytest.approx(100 * high)
    finally:
        plt.close(fig)


def test_a_finished_run_keeps_only_its_final_weights(tiny_folder, tmp_path):
    assert sweep.main(sweep_args(tiny_folder, tmp_path, "eval_every=2")) == 0
    for run in ("baseline_seed0", "ablation_no_sp_seed0"):
        weights = sorted(n for n in os.listdir(tmp_path / "sweep_camvid" / run) if n.endswith(".pth"))
        assert weights == ["model_final.pth"], run


def test_commands_run_by_anyone_give_the_summary_the_sweep_gives(tiny_folder, tmp_path, capsys):
    """--commands prints a line per run left to train; run in any order by any scheduler (here: in this process,
    last first), then --summary-only collects what one sweep process would have written."""
    import shlex

    args = sweep_args(tiny_folder, tmp_path / "a", "--commands", "--test")
    for split in ("test", "testannot"):  # a test split for --test: the val frames again
        shutil.copytree(os.path.join(tiny_folder, split.replace("test", "val")), os.path.join(tiny_folder, split))
    assert sweep.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("python train.py --config camvid ") for line in lines)
    assert not (tmp_path / "a" / "sweep_camvid").exists()  # nothing trained by printing
    for line in reversed(lines):
        train_part, evaluate_part = line.split(" && ")
        assert train.main(shlex.split(train_part)[2:]) == 0
        assert evaluate.main(shlex.split(evaluate_part)[2:]) == 0
    assert sweep.main(sweep_args(tiny_folder, tmp_path / "a", "--summary-only")) == 0
    assert sweep.main(sweep_args(tiny_folder, tmp_path / "b", "--test")) == 0  # the same study, one process
    capsys.readouterr()
    summaries = []
    for folder in ("a", "b"):
        with open(tmp_path / folder / "sweep_camvid" / "summary.json") as f:
            summary = json.load(f)
        summaries.append([(v["variant"], v["val"]["miou"], v["test"]["miou"]) for v in summary["variants"]])
    assert summaries[0] == summaries[1]
    assert sweep.main(sweep_args(tiny_folder, tmp_path / "a", "--commands")) == 0
    assert capsys.readouterr().out == ""  # nothing left to train


def test_the_summary_picture_keeps_its_titles_inside_and_its_legend_off_the_bars(hand_sweep):
    pytest.importorskip("matplotlib")
    _, root = hand_sweep
    plt = plots.pyplot()
    fig = plots.sweep_summary(plt, sweep.summarize(sweep.collect(root)))
    try:
        fig.canvas.draw()
        box = fig.bbox
        for ax in fig.axes:
            title = ax.title.get_window_extent()
            assert box.x0 <= title.x0 and title.x1 <= box.x1 and title.y1 <= box.y1, ax.get_title()
        means = fig.axes[0]
        legend = means.get_legend().get_window_extent()
        for bar in means.patches:
            assert not legend.overlaps(bar.get_window_extent()), "the legend covers a bar"
    finally:
        plt.close(fig)


def test_a_run_saved_when_channels_last_was_a_bool_is_not_said_to_differ(tmp_path, capsys):
    run = hand_run(tmp_path)
    os.makedirs(run.run_dir)
    saved = {**json.loads(json.dumps(run.cfg.to_dict())), "channels_last": True, "lr": 0.5}
    with open(run.path("config.json"), "w") as f:
        json.dump(saved, f)
    sweep.check_existing(run)
    err = capsys.readouterr().err
    assert "lr=0.5" in err and "channels_last" not in err  # camvid's channels_last="true" is the same setting


def write_log(run_dir, points):
    """A log.jsonl with a training record and a validation record per (iteration, val mIoU)."""
    with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
        for it, miou in points:
            f.write(json.dumps({"iter": it, "loss": 1.0, "lr": 0.01, "images_per_s": 5.0}) + "\n")
            f.write(json.dumps({"iter": it, "val_miou": miou, "val_iou": {}}) + "\n")


def test_the_curves_picture_draws_each_seed_and_the_mean_and_the_test_iou_per_class(hand_sweep):
    pytest.importorskip("matplotlib")
    tmp_path, root = hand_sweep
    write_log(f"{root}/baseline_seed0", [(100, 0.30), (200, 0.50)])
    write_log(f"{root}/baseline_seed1", [(100, 0.40), (200, 0.60), (300, 0.70)])  # 300: seed 1 alone
    write_log(f"{root}/ablation_no_sp_seed1", [(100, 0.20), (200, None)])  # no score at 200 (no labelled pixel)
    # baseline seed 2 and ablation seeds 0, 2 have no log (copied without it); seed 4's cut log is not finished
    write_log(f"{root}/ablation_no_sp_seed4", [(100, 0.99)])
    with open(f"{root}/ablation_no_sp_seed2/log.jsonl", "wb") as f:  # not text: no curve, the summary still drawn
        f.write(b"\xff\xfe\x00garbage")
    assert sweep.main(["--config", "camvid", f"out_dir={tmp_path}", "--summary-only"]) == 0
    assert os.path.getsize(f"{root}/summary_curves.png") > 0
    summary = sweep.summarize(sweep.collect(root))
    curves = sweep.collect_curves(root, summary)
    assert curves == {"baseline": [(0, [(100, 0.30), (200, 0.50)]), (1, [(100, 0.40), (200, 0.60), (300, 0.70)])],
                      "ablation_no_sp": [(1, [(100, 0.20)])]}
    plt = plots.pyplot()
    fig = plots.sweep_curves(plt, summary, curves)
    try:
        curve_ax, class_ax = fig.axes
        lines = [(list(line.get_xdata()), pytest.approx(list(line.get_ydata())), line.get_linewidth())
                 for line in curve_ax.lines]
        assert lines == [([100, 200], [30, 50], 0.8), ([100, 200, 300], [40, 60, 70], 0.8),
                         ([100, 200], [35, 55], 2.5),  # the mean where both seeds validated
                         ([100], [20], 0.8), ([100], [20], 2.5)]
        # one legend for both panels, with the seeds each variant has in the summary
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["baseline (3 seeds)", "ablation_no_sp (3 seeds)"]
        # test is shown: both variants were scored on it. baseline road 0.7 car 0.2; ablation road 0.6, car n/a
        assert class_ax.get_title().startswith("test: IoU per class")
        assert [t.get_text() for t in class_ax.get_xticklabels()] == ["road", "car"]
        heights = [p.get_height() for p in class_ax.patches]
        assert heights[:2] == pytest.approx([70, 20]) and heights[2] == pytest.approx(60) and math.isnan(heights[3])
    finally:
        plt.close(fig)


def test_the_curves_picture_shows_the_classes_that_differ_most_where_there_are_many():
    pytest.importorskip("matplotlib")
    n = plots.MAX_CONFUSION + 5
    names = [f"c{i}" for i in range(n)]
    # the variants differ by i / 100 on class i: the last MAX_CONFUSION classes are shown, in their order
    iou_a, iou_b = {c: 0.5 for c in names}, {c: 0.5 - i / 100 for i, c in enumerate(names)}

    def split(iou):
        return {"seeds": [0], "miou": [0.5], "mean": 0.5, "class_iou": iou}
    summary = {"variants": [{"variant": "baseline", "val": split(iou_a), "test": None},
                            {"variant": "arm=false", "val": split(iou_b), "test": None}]}
    plt = plots.pyplot()
    fig = plots.sweep_curves(plt, summary, {})
    try:
        curve_ax, class_ax = fig.axes
        assert [t.get_text() for t in class_ax.get_xticklabels()] == names[5:]
        assert class_ax.get_title() == f"val: IoU per class, mean over the seeds, the {plots.MAX_CONFUSION} of {n} " \
                                       "classes that differ most"
        assert [p.get_height() for p in class_ax.patches] == pytest.approx([50] * (n - 5) + [50 - i for i in
                                                                                           range(5, n)])
        assert "no validation during training" in curve_ax.texts[0].get_text()
    finally:
        plt.close(fig)


def test_the_curves_picture_of_one_variant_shows_its_lowest_classes_and_skips_those_never_seen():
    pytest.importorskip("matplotlib")
    n = plots.MAX_CONFUSION + 3
    # class i scores i / 100; class 0 was never in the split (n/a): the lowest 30 that were seen are 1..30
    iou = {f"c{i}": None if i == 0 else i / 100 for i in range(n)}
    both = {"seeds": [0], "miou": [0.5], "mean": 0.5, "class_iou": iou}
    summary = {"variants": [{"variant": "baseline", "val": both, "test": None}]}
    plt = plots.pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns about a slice of n/a alone
        fig = plots.sweep_curves(plt, summary, {})
    try:
        class_ax = fig.axes[1]
        assert [t.get_text() for t in class_ax.get_xticklabels()] == [f"c{i}" for i in range(1, 31)]
        assert class_ax.get_title().endswith(f"the 30 of {n} classes with the lowest IoU")
    finally:
        plt.close(fig)
    # two variants, class 0 n/a in both and class 1 in one: the spread skips n/a without a warning
    other = dict(iou, c1=None, c32=0.9)
    summary["variants"].append({"variant": "arm=false", "val": dict(both, class_iou=other), "test": None})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.sweep_curves(plt, summary, {})
    try:
        shown = [t.get_text() for t in fig.axes[1].get_xticklabels()]
        # c32 differs most (58 points), the others by 0 (c1: n/a in one, skipped), kept in order; c0 is n/a
        # everywhere: last
        assert shown == [f"c{i}" for i in range(1, 30)] + ["c32"]
    finally:
        plt.close(fig)
