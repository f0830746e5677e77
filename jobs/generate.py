"""Generate: sample text from a trained checkpoint with the KV cache.

    python -m jobs.generate --run runs/demo/pretrain --prompt "ROMEO:"
    python -m jobs.generate --config configs/demo.yaml

Batch generation: `prompts_file` is JSONL with one `{"prompt": "..."}` (raw text to continue) or
`{"messages": [...]}` (a chat, answered through the chat template) per line; prompts of equal
token length are decoded together as one batch.

Runs as a Ray task, so on a cluster it lands on a worker (a GPU one with `use_gpu: true`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cluster import storage
from jobs.config import JobConfig, main


class GenerateConfig(JobConfig):
    """Sample continuations of prompts from a checkpoint."""

    kind: Literal["generate"] = "generate"
    run: str | None = None
    """Run directory (local or s3://); its newest complete checkpoint is used."""
    checkpoint: str | None = None
    """A specific checkpoint directory instead of the run's newest."""
    prompts_file: str | None = None
    """JSONL of prompts (`{"prompt": ...}` or `{"messages": [...]}` per line), generated in batches; replaces `prompts`."""
    batch_size: int = Field(16, ge=1)
    """Prompts per batch with `prompts_file`."""
    prompts: list[str] = Field(default_factory=lambda: ["\n"])
    """Prompts to continue, one sample each."""
    max_new_tokens: int = Field(200, ge=1)
    """Tokens to generate per prompt (capped by the model's context)."""
    temperature: float = Field(0.8, ge=0)
    """Sampling temperature; 0 is greedy."""
    top_k: int | None = Field(50, ge=1)
    """Sample among the k most likely tokens."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Nucleus sampling: the smallest set of tokens whose probability reaches p."""
    stop_at_eot: bool = True
    """Stop a sample at <|endoftext|>."""
    seed: int = 0
    """Sampling seed."""
    use_gpu: bool = False
    """Run the sampling task on a GPU worker."""
    output: str | None = None
    """Write the samples here as JSONL (one {prompt, completion} per line)."""

    @model_validator(mode="after")
    def _has_model(self):
        if not self.run and not self.checkpoint:
            raise ValueError("set run (a run directory) or checkpoint")
        return self


def load_checkpoint(ckpt: str, device: str = "cpu"):
    """(model, tokenizer, train_state) from a checkpoint directory written by jobs.pretrain."""
    from jobs.pretrain import TRAIN_STATE, WEIGHTS, load_weights
    from model import GPT, ModelConfig
    from model.tokenizer import load_tokenizer

    local = storage.stage_local(ckpt)
    state = json.loads((Path(local) / TRAIN_STATE).read_text())
    model = load_weights(GPT(ModelConfig.model_validate(state["model"])), Path(local) / WEIGHTS).to(device).eval()
    tok = load_tokenizer(str(Path(local) / "tokenizer.json"))
    return model, tok, state


def generate_file(cfg: GenerateConfig, ckpt: str) -> list[dict]:
    """Completions of every record of `prompts_file`, batch_size prompts at a time."""
    import torch

    from jobs.chat import Message, chat_prompt_ids, generate_batch, load_model, read_jsonl, special_ids
    from model.tokenizer import EOT, decode, encode

    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    model, tok, state = load_model(ckpt, device)
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    records, prompts = [], []
    for n, rec in read_jsonl(cfg.prompts_file):
        if "messages" in rec:
            try:
                msgs = [Message.model_validate(m) for m in rec["messages"]]
            except Exception as e:
                raise ValueError(f"{cfg.prompts_file}:{n}: messages: {e}") from None
            prompts.append(chat_prompt_ids(tok, msgs))
        elif isinstance(rec.get("prompt"), str):
            prompts.append(encode(tok, rec["prompt"]) or [tok.token_to_id(EOT)])
        else:
            raise ValueError(f"{cfg.prompts_file}:{n}: expected a \"prompt\" string or a \"messages\" list")
        records.append(rec)
    stop = [tok.token_to_id(EOT)] if cfg.stop_at_eot else []
    if any("messages" in r for r in records):
        stop = [special_ids(tok)["end"], *stop]
    out = []
    for i in range(0, len(prompts), cfg.batch_size):
        new = generate_batch(model, prompts[i : i + cfg.batch_size], cfg.max_new_tokens, stop,
                             cfg.temperature, cfg.top_k, cfg.top_p, gen)
        for rec, ids in zip(records[i : i + cfg.batch_size], new):
            out.append({**rec, "completion": decode(tok, ids), "checkpoint": ckpt, "step": state.get("step")})
    return out


def sample_texts(cfg: GenerateConfig, ckpt: str) -> list[dict]:
    import torch

    from model.tokenizer import EOT, decode, encode

    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    model, tok, state = load_checkpoint(ckpt, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    eot = tok.token_to_id(EOT)
    out = []
    for prompt in cfg.prompts:
        ids = encode(tok, prompt) or [eot]
        idx = torch.tensor([ids], device=device)
        y = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, stop_token=eot if cfg.stop_at_eot else None, generator=gen)
        new = [t for t in y[0, len(ids):].tolist()]
        if cfg.stop_at_eot and eot in new:
            new = new[: new.index(eot)]
        out.append({"prompt": prompt, "completion": decode(tok, new), "checkpoint": ckpt, "step": state["step"]})
    return out


def run(cfg: GenerateConfig) -> list[dict]:
    import ray

    from cluster.ray_utils import init_ray, storage_env
    from jobs.pretrain import latest_checkpoint

    cfg = cfg.model_copy(update={"run": storage.absolute(cfg.run) if cfg.run else None,
                                 "prompts_file": storage.absolute(cfg.prompts_file) if cfg.prompts_file else None})
    ckpt = storage.absolute(cfg.checkpoint) if cfg.checkpoint else latest_checkpoint(cfg.run)
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
