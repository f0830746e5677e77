"""Generate: sample text from a trained checkpoint with the KV cache.

    python -m jobs.generate --run runs/demo/pretrain --prompt "ROMEO:"
    python -m jobs.generate --config configs/demo.yaml

Batch generation: `prompts_file` is JSONL with one `{"prompt": "..."}` (raw text to continue) or
`{"messages": [...]}` (a chat, answered through the chat template) per line; `batch_size`
prompts at a time, of any lengths, are decoded together in one left-padded batch.

Runs as a Ray task, so on a cluster it lands on a worker (a GPU one with `use_gpu: true`).
"""

from __future__ import annotations

import json

from cluster import storage
from jobs.checkpoint.load import resolve_source
from jobs.config import main
from jobs.infer.config import GenerateConfig
from jobs.infer.generate import generate_file, sample_texts

__all__ = ["GenerateConfig", "run"]


def run(cfg: GenerateConfig) -> list[dict]:
    import ray

    from cluster.ray_utils import init_ray, storage_env

    cfg = cfg.model_copy(update={"run": storage.absolute(cfg.run) if cfg.run else None,
                                 "prompts_file": storage.absolute(cfg.prompts_file) if cfg.prompts_file else None})
    ckpt = resolve_source(cfg.checkpoint or cfg.run)[2]  # verified before any task starts
    init_ray()
    task = ray.remote(num_gpus=1 if cfg.use_gpu else 0, runtime_env={"env_vars": storage_env()})(
        generate_file if cfg.prompts_file else sample_texts)
    samples = ray.get(task.remote(cfg, ckpt))
    for s in samples:
        shown = s["prompt"] if "prompt" in s else s["messages"][-1]["content"]
        print(f"--- {shown!r} (step {s['step']})\n{shown}{s['completion']}\n")
    if cfg.output:
        storage.write_text(cfg.output, "".join(json.dumps(s) + "\n" for s in samples))
    return samples


def _flags(parser):
    parser.add_argument("--run", help="pretraining run directory")
    parser.add_argument("--prompt", action="append", help="prompt to continue (repeatable)")


def _flag_overrides(args) -> dict:
    out = {}
    if args.run:
        out["run"] = args.run
    if args.prompt:
        out["prompts"] = args.prompt
    return out


if __name__ == "__main__":
    main(GenerateConfig, run, extra_args=_flags, flag_overrides=_flag_overrides)
