"""Pretrain: packed token shards -> a decoder-only transformer, on Ray Train with DeepSpeed.

    python -m jobs.pretrain --config configs/demo.yaml
    python -m jobs.pretrain --config configs/demo.yaml --plan     # sizes, memory and time only

The driver validates the config, checks that the run fits its workers (jobs.train.planner) and
runs `TorchTrainer(...).fit()`; every worker runs jobs.train.loop.train_loop_per_worker.
"""

from __future__ import annotations

from cluster import storage
from jobs.config import main
from jobs.report import write_report
from jobs.train.config import PretrainConfig
from jobs.train.loop import loop_config, prepare_run, summarize, train_loop_per_worker
from jobs.train.metrics import PEAK_BF16_FLOPS
from jobs.train.planner import check_fits, format_plan, plan
from jobs.train.trainer import make_trainer, start_run

__all__ = ["PretrainConfig", "run"]


def run(cfg: PretrainConfig, plan_only: bool = False, mfu: float = 0.4, gpu: str = "H100") -> dict:
    if plan_only:
        seq_len, mcfg = cfg.model.max_seq_len, cfg.model
        if storage.exists(storage.join(cfg.data, "manifest.json")):
            _, manifest, mcfg = prepare_run(cfg)
            seq_len = manifest["seq_len"]
        p = plan(cfg, mcfg, seq_len, mfu, gpu)
        print(format_plan(p))
        return p
    cfg, manifest, mcfg = prepare_run(cfg)
    check_fits(cfg, mcfg, manifest["seq_len"])
    start_run(cfg)
    print(f"model: {mcfg.num_params() / 1e6:.2f} M parameters, {mcfg.flops_per_token(manifest['seq_len']) / 1e6:.1f} "
          f"MFLOP/token; {cfg.num_workers} workers, ZeRO-{cfg.zero_stage}, grad accum {cfg.grad_accum}")
    result = make_trainer(cfg, train_loop_per_worker, loop_config(cfg, manifest, mcfg)).fit()
    summary = summarize(cfg, manifest, result.error)
    print(f"report: {write_report(cfg.output)}")
    return summary


def _flags(parser):
    parser.add_argument("--plan", action="store_true", help="print size, memory and time estimates; train nothing")
    parser.add_argument("--mfu", type=float, default=0.4, help="MFU assumed by --plan's time estimate")
    parser.add_argument("--gpu", choices=sorted(PEAK_BF16_FLOPS), default="H100", help="GPU assumed by --plan")


if __name__ == "__main__":
    main(PretrainConfig, run, extra_args=_flags,
         run_kwargs=lambda a: {"plan_only": a.plan, "mfu": a.mfu, "gpu": a.gpu})
