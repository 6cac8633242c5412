"""Check a dataset before training on it: every label of each split read as training reads it.

    python check_data.py --config camvid [--split train val test] [key=value ...]

Reports, naming files: images without labels and labels without images, unreadable files, labels that are not
PNG files or not single-channel 8-bit, label and image sizes that differ, and label values outside the class table
(with their pixel counts and the first files that hold them). Then the per-class pixel share of each split and, for
the training split only, the median-frequency class weights (what class_weights=median trains with). Exit status: 0
when training would run, 1 when something would stop it, 2 for a bad config.
"""

import argparse
import sys

from configs import ConfigError, add_config_args, get_config
from datasets import DatasetError, class_table, dataset_samples, scan_labels


def format_split(split, scan, problems, names, limit=20, weights=True):
    """The split's report, `weights`: with median-frequency weights (training split only: val/test must not steer)."""
    lines = [f"== {split}: {scan.files} image/label pairs"]
    if problems:
        lines.append(f"{len(problems)} problem(s) that would stop training:")
        lines += [f"  {line}" for problem in problems[:limit] for line in problem.splitlines()]
        if len(problems) > limit:
            lines.append(f"  ... and {len(problems) - limit} more")
    lines += [f"  value {value} outside the class table: {count} px, first in {', '.join(files)}"
              for value, (count, files) in sorted(scan.bad_values.items())]
    total = int(scan.pixels.sum()) + scan.ignored
    if total:
        median = scan.median_frequency_weights()
        lines.append(f"{'class':<16}{'pixels %':>10}" + (f"{'median-freq weight':>20}" if weights else ""))
        lines += [f"{name:<16}{100 * count / total:>10.2f}" + (f"{weight:>20.4f}" if weights else "")
                  for name, count, weight in zip(names, scan.pixels.tolist(), median.tolist(), strict=True)]
        lines.append(f"{'(ignored)':<16}{100 * scan.ignored / total:>10.2f}")
        absent = [name for name, count in zip(names, scan.pixels.tolist(), strict=True) if count == 0]
        if absent:
            lines.append(f"warning: no pixel of {', '.join(absent)} in {split}: its IoU cannot be learned or measured")
        if weights:
            lines.append("class_weights=" + ",".join(f"{w:.4f}" for w in median.tolist()))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--split", nargs="+", help="splits to check (default: the config's train and val splits)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = add_config_args(parser).parse_intermixed_args(argv)
    try:
        cfg = get_config(args.config or "cityscapes", args.overrides)
        table = class_table(cfg)
        splits, failed = args.split or [cfg.train_split, cfg.val_split], False
        for split in splits:  # pairing problems first, then those of each file
            samples, problems = dataset_samples(cfg, split)
            scan = scan_labels(samples, table, cfg.num_classes, progress=not args.quiet, desc=f"check {split}")
            problems += scan.problems
            print(format_split(split, scan, problems, table.names, weights=split == cfg.train_split), flush=True)
            failed = failed or bool(problems)
    except (ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    print("result: problems found: training would stop at the files named above" if failed
          else f"result: {', '.join(splits)} OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
