"""Compare two evaluated runs on one split: `python -m csi_dist.compare RUN_A RUN_B [--split test]`.

Reads both runs' evaluation predictions (<run>/evaluation/<split>_predictions.csv, written by csi_dist.evaluate),
checks they hold the same images and targets, and bootstraps the difference RUN_B - RUN_A of each headline metric
on the same resampled images (patients, when the predictions carry patient_id): the difference, its 95% interval
and a two-sided p-value, printed and written as CSV, Markdown and a plot.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from csi_dist.core.command import run_command
from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR

log = logging.getLogger("csi_dist.compare")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="csi_dist.compare", description=__doc__.splitlines()[0],
                                     epilog="Exit status: 0 compared, 2 predictions missing or not comparable.")
    parser.add_argument("run_a", type=Path, metavar="RUN_A",
                        help="a run directory (its evaluation/ folder is read), an evaluation folder, or a "
                             "predictions CSV")
    parser.add_argument("run_b", type=Path, metavar="RUN_B", help="the run compared with RUN_A (same forms)")
    parser.add_argument("--split", default="test", help="the evaluated split to compare (default: test)")
    parser.add_argument("--resamples", type=int, default=1000, metavar="N",
                        help="paired bootstrap resamples (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamples (default: 0)")
    parser.add_argument("--out", type=Path,
                        help="where comparison_<split>.csv/.md/.png go (default: RUN_B's evaluation folder)")
    args = parser.parse_args(argv)
    if args.resamples < 1:
        parser.error(f"--resamples: expected a positive count, got {args.resamples}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from csi_dist.evaluation.comparison import (CompareError, compare_predictions, format_table, predictions_path,
                                                read_predictions, write_comparison)
    try:
        path_a, path_b = predictions_path(args.run_a, args.split), predictions_path(args.run_b, args.split)
        rows, settings = compare_predictions(read_predictions(path_a), read_predictions(path_b), args.resamples,
                                             args.seed)
    except CompareError as error:
        log.error("%s", error)
        return EXIT_CONFIG_ERROR
    paths = write_comparison(rows, settings, args.out or path_b.parent, args.split)
    print(f"{args.split}: run B ({path_b}) - run A ({path_a}), {settings['n_images']} images, "
          f"{settings['n_resamples']} paired resamples of {settings['resampled']}")
    print(format_table(rows), end="")
    log.info("wrote %s", ", ".join(str(path) for path in paths.values()))
    return 0


if __name__ == "__main__":
    run_command(main)
