"""``dinolab quickstart``: pretrain on built-in digits, evaluate against random init and pixels, write a report."""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="quickstart_report", help="report directory (default quickstart_report)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the 'quickstart' recipe")


def run(args: argparse.Namespace) -> int:
    from dinolab.quickstart.report import results_markdown
    from dinolab.quickstart.run import KNN_K, run_quickstart

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run_quickstart(args.output, args.overrides, progress=not args.no_progress)
    print()
    print(results_markdown(result.rows, KNN_K))
    print()
    print(f"pretraining took {result.train_seconds / 60:.1f} min, everything {result.total_seconds / 60:.1f} min")
    print(f"report: {result.report_html} (and {result.report_markdown.name} beside it)")
    return 0
