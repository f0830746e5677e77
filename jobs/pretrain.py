"""Pretrain: packed token shards -> a decoder-only transformer, on Ray Train with DeepSpeed.

    python -m jobs.pretrain --config configs/demo.yaml
    python -m jobs.pretrain --config configs/demo.yaml --plan     # sizes, memory and time only
    python -m jobs.pretrain --config configs/demo.yaml --propose --gpu H100 --gpus 64   # layouts that fit, fastest first

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
from jobs.train.planner import check_fits, format_plan, format_proposal, gpu_names, plan, propose
from jobs.train.trainer import make_trainer, start_run

__all__ = ["PretrainConfig", "run"]


def run(cfg: PretrainConfig, plan_only: bool = False, mfu: float = 0.4, gpu: str = "H100",
        propose_gpus: int | None = None, top: int = 10) -> dict:
    if plan_only or propose_gpus:
        seq_len, mcfg = cfg.model.max_seq_len, cfg.model
        if storage.exists(storage.join(cfg.data, "manifest.json")):
            _, manifest, mcfg = prepare_run(cfg)
            seq_len = manifest["seq_len"]
        if propose_gpus:
            prop = propose(mcfg, seq_len, cfg.global_batch_size, gpu, propose_gpus)
            print(format_proposal(prop, top))
            return {"fits": [(str(lay), tm["step_s"], mem["total"]) for lay, tm, mem in prop.fits],
                    "rejected": [(str(lay), why) for lay, why in prop.rejected]}
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
    parser.add_argument("--gpu", choices=sorted(set(PEAK_BF16_FLOPS) | set(gpu_names())), default="H100",
                        help="GPU assumed by --plan and --propose (--propose: one of jobs/train/gpus.yaml)")
    parser.add_argument("--propose", action="store_true",
                        help="list the parallel layouts (TP, PP, DP, ZeRO, micro-batch, activation checkpointing) "
                             "that fit --gpus x --gpu, fastest first, and why the others do not; train nothing")
    parser.add_argument("--gpus", type=int, help="GPUs for --propose")
    parser.add_argument("--top", type=int, default=10, help="fitting layouts --propose lists (0: all)")


def _run_kwargs(a) -> dict:
    if a.propose and not a.gpus:
        raise SystemExit("--propose needs --gpus N")
    if a.propose and a.gpu not in gpu_names():
        raise SystemExit(f"--gpu {a.gpu}: no interconnect figures for it in jobs/train/gpus.yaml; --propose knows "
                         f"{', '.join(gpu_names())}")
    return {"plan_only": a.plan, "mfu": a.mfu, "gpu": a.gpu, "propose_gpus": a.gpus if a.propose else None,
            "top": a.top}


if __name__ == "__main__":
    main(PretrainConfig, run, extra_args=_flags, run_kwargs=_run_kwargs)
