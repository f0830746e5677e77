"""Export: a pretraining checkpoint -> a Hugging Face model directory (jobs.checkpoint.hf).

    python -m jobs.export --run runs/demo/pretrain --output runs/demo/hf
    python -m jobs.export --config configs/demo.yaml --set dtype=bf16

Export is a file conversion, so it runs in the driver process: no Ray, no GPU.
"""

from __future__ import annotations

from jobs.checkpoint.config import ExportConfig
from jobs.checkpoint.hf import DTYPES, export
from jobs.config import main

__all__ = ["ExportConfig", "run"]


def run(cfg: ExportConfig) -> dict:
    return export(cfg)


def _flags(parser):
    parser.add_argument("--run", help="pretraining run directory (its newest checkpoint is exported)")
    parser.add_argument("--checkpoint", help="a specific checkpoint directory")
    parser.add_argument("--output", help="output directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="precision of the exported weights")


def _flag_overrides(args) -> dict:
    out = {k: getattr(args, k) for k in ("run", "checkpoint", "output", "dtype") if getattr(args, k)}
    # A source given on the command line replaces the config file's, whichever kind that is.
    if args.run and not args.checkpoint:
        out["checkpoint"] = None
    if args.checkpoint and not args.run:
        out["run"] = None
    return out


def cli(argv: list[str] | None = None) -> dict:
    """`python -m jobs.export`: a config file and/or --run/--checkpoint/--output/--dtype flags."""
    return main(ExportConfig, run, argv, extra_args=_flags, flag_overrides=_flag_overrides)


if __name__ == "__main__":
    cli()
