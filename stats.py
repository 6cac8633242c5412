"""The statistics of a study (sweep.py): Student's t, the interval of a mean over seeds, Welch's difference of two
means, and the summary table (summary.md)."""

import math
import statistics

BASELINE = "baseline"
CONFIDENCE = 0.95
mean = statistics.mean  # ValueError (StatisticsError) for no values
sample_std = statistics.stdev  # n - 1 in the denominator; ValueError for fewer than 2 values


# Student's t written out: scipy is no dependency, and a table misses Welch's fractional df
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
