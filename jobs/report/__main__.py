"""`python -m jobs.report PATH [--output FILE]`: write the run report of a job's or a pipeline's outputs."""

from __future__ import annotations

import argparse
import sys

from jobs.report import REPORT_FILE, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=(
        "Write one self-contained HTML page (charts inline, opens offline) of what raylm's jobs wrote under "
        "PATH: data funnel, training curves, checkpoints, sweeps, evals by stage, samples and lineage."))
    parser.add_argument("path", metavar="PATH", help="a job's output directory or a pipeline root (local or s3://)")
    parser.add_argument("--output", metavar="FILE", help=f"where to write the page (default: PATH/{REPORT_FILE})")
    args = parser.parse_args(argv)
    try:
        uri = write_report(args.path, args.output)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(uri)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
