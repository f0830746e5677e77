"""Post-training code shared by jobs.sft, jobs.dpo, jobs.reward, jobs.evaluate and jobs.serve.

Read top to bottom: the chat template, JSONL records (messages, preference pairs), batching,
sequence log-probabilities and the DPO loss, then the Ray Train / DeepSpeed plumbing that the
three training jobs share (base-model loading, engine, checkpoints, trainer).

Chat template (`raylm-chat/1`), one turn per message, all markers are single special tokens:

    <|system|>You are ...<|end|><|user|>Who speaks next?<|end|><|assistant|>HERMIA<|end|>

Only assistant content and its closing <|end|> carry loss; a prompt for generation ends with
<|assistant|> and generation stops at <|end|>.
"""

from __future__ import annotations

import functools
import json
import math
import posixpath
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster import storage
from jobs.config import JobConfig

CHAT_TEMPLATE = "raylm-chat/1"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"
PAD = "<|pad|>"
IGNORE = -100
TRAIN_STATE = "train_state.json"
WEIGHTS = "model.safetensors"
VALUE_HEAD = "value_head.safetensors"


# ----------------------------------------------------------------------------- records


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class Conversation(BaseModel):
    """One SFT example: `{"messages": [{"role": ..., "content": ...}, ...]}`."""

    model_config = ConfigDict(extra="ignore")
    messages: list[Message] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, v):
        if not any(m.role == "assistant" for m in v):
            raise ValueError("needs at least one assistant message (nothing to learn otherwise)")
        return v


class PreferencePair(BaseModel):
    """One preference: a prompt (text of a user turn, or messages) and two assistant replies."""

    model_config = ConfigDict(extra="ignore")
    prompt: str | list[Message]
    chosen: str
    rejected: str

    @model_validator(mode="after")
    def _differ(self):
        if self.chosen == self.rejected:
            raise ValueError("chosen and rejected are identical")
        return self

    def prompt_messages(self) -> list[Message]:
        return [Message(role="user", content=self.prompt)] if isinstance(self.prompt, str) else self.prompt


def read_jsonl(uri: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a local or s3:// JSONL file."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: file not found")
    out = []
    for n, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri}:{n}: not valid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{uri}:{n}: expected a JSON object, got {type(obj).__name__}")
        out.append((n, obj))
    if not out:
        raise ValueError(f"{uri}: no records")
    return out


def read_records(uri: str, cls: type[BaseModel]) -> list:
    """Validate every line of a JSONL file as `cls`; errors name the file, line and field."""
    out = []
    for n, obj in read_jsonl(uri):
        try:
            out.append(cls.model_validate(obj))
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "<record>"
            raise ValueError(f"{uri}:{n}: {field}: {first['msg']}") from None
    return out


# ----------------------------------------------------------------------------- template


def special_ids(tok) -> dict[str, int]:
    ids = {name: tok.token_to_id(t) for name, t in {**ROLE_TOKENS, "end": END, "pad": PAD}.items()}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the chat special tokens {missing} (train it with model.tokenizer)")
    return ids


def encode_chat(tok, messages: list[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and per-token labels: the id itself on assistant tokens, IGNORE elsewhere.

    Labels are aligned with ids (label i is the target *at* position i); shift by one for
    next-token prediction.
    """
    from model.tokenizer import encode

    sp = special_ids(tok)
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        body = [*encode(tok, m.content), sp["end"]]
        ids += [sp[m.role], *body]
        labels += [IGNORE] + (body if m.role == "assistant" else [IGNORE] * len(body))
    if add_generation_prompt:
        ids.append(sp["assistant"])
        labels.append(IGNORE)
    return ids, labels


def chat_prompt_ids(tok, messages: list[Message]) -> list[int]:
    return encode_chat(tok, messages, add_generation_prompt=True)[0]


def reply_ids(tok, text: str) -> list[int]:
    """An assistant reply as it is trained: content then <|end|>."""
    from model.tokenizer import encode

    return [*encode(tok, text), special_ids(tok)["end"]]


def sft_example(tok, conv: Conversation, max_len: int) -> tuple[list[int], list[int], bool]:
    """(inputs, targets, truncated): next-token pairs, right-truncated to max_len inputs."""
    ids, labels = encode_chat(tok, conv.messages)
    truncated = len(ids) - 1 > max_len
    ids, labels = ids[: max_len + 1], labels[: max_len + 1]
    return ids[:-1], labels[1:], truncated


def pair_example(tok, pair: PreferencePair, max_len: int) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """(chosen, rejected) as (inputs, targets). Long prompts lose their oldest tokens so that both
    replies fit; replies longer than the context are cut at the end."""
    prompt = chat_prompt_ids(tok, pair.prompt_messages())
    out = []
    for text in (pair.chosen, pair.rejected):
        reply = reply_ids(tok, text)[:max_len]
        p = prompt[max(0, len(prompt) + len(reply) - max_len - 1):]
        ids = p + reply
        labels = [IGNORE] * len(p) + reply
        out.append((ids[:-1], labels[1:]))
    return out[0], out[1]


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (inputs, targets) rows to the longest: pads get IGNORE targets, and causal
    attention keeps them from influencing the real tokens before them."""
    T = max(len(x) for x, _ in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        idx[i, : len(x)] = torch.tensor(x)
        tgt[i, : len(y)] = torch.tensor(y)
    return idx, tgt


# ----------------------------------------------------------------------------- configs


class PostTrainConfig(JobConfig):
    """Fields shared by jobs.sft, jobs.dpo and jobs.reward (each adds its own `kind`)."""

    init_from: str
    """Starting weights: a checkpoint directory, a run directory (its newest checkpoint is used), or an HF export directory (config.json + model.safetensors + tokenizer.json)."""
    data: str
    """Training records, JSONL (local or s3://)."""
    eval_file: str | None = None
    """Held-out records in the same format, evaluated every `eval_every` steps and at the end."""
    output: str
    """Run directory (local or s3://) that receives the checkpoints and metrics.jsonl."""
    num_workers: int = Field(1, ge=1)
    """Ray Train workers (one per GPU on GPU clusters)."""
    use_gpu: bool = False
    """Train on GPUs (bf16, NCCL); otherwise CPU (fp32, gloo)."""
    cpus_per_worker: int = Field(1, ge=1)
    """CPUs reserved per worker (also its torch thread count)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters."""
    global_batch_size: int = Field(16, ge=1)
    """Examples per optimizer step, across all workers and accumulation steps."""
    micro_batch_size: int = Field(8, ge=1)
    """Examples per forward/backward on one worker; accumulation makes up the rest."""
    max_steps: int = Field(100, ge=1)
    """Optimizer steps; the data is reshuffled and reused when a step runs past its end."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay on matmul weights."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0 disables)."""
    max_seq_len: int | None = Field(None, ge=2)
    """Longest example in tokens (longer ones are truncated); default: the model's max_seq_len."""
    eval_every: int = Field(50, ge=1)
    """Evaluate on `eval_file` every this many steps (and at the end)."""
    checkpoint_every: int = Field(100, ge=1)
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Newest checkpoints kept in storage."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts Ray Train may do after a failure (-1: unlimited); training resumes from the newest checkpoint."""
    seed: int = 0
    """Seeds the data order."""

    @model_validator(mode="after")
    def _check_batch(self):
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size * num_workers ({self.micro_batch_size} * {self.num_workers})")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


# ----------------------------------------------------------------------------- base models


def resolve_init(path: str) -> str:
    """The directory holding the starting weights: a checkpoint, an HF export, or a run's newest checkpoint."""
    from jobs.pretrain import latest_checkpoint

    path = storage.absolute(path)
    has_weights = storage.exists(storage.join(path, WEIGHTS))
    if storage.exists(storage.join(path, TRAIN_STATE)):
        if not has_weights:
            raise FileNotFoundError(f"init_from: checkpoint {path} has no {WEIGHTS}")
        return path
    if has_weights and storage.exists(storage.join(path, "config.json")):  # an HF export
        return path
    if not storage.exists(path):
        raise FileNotFoundError(f"init_from: {path} does not exist")
    return latest_checkpoint(path)


def load_model(path: str, device: str = "cpu"):
    """(GPT, tokenizer, train_state or {}) from one of our checkpoints or an HF export directory.

    Our checkpoints carry train_state.json and load directly; HF exports are converted by
    jobs.export. Extra tensor files (a reward model's value head) are not read here.
    """
    from jobs.pretrain import load_weights
    from model import GPT, ModelConfig
    from model.tokenizer import load_tokenizer

    local = Path(storage.stage_local(path))
    tok_file = local / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json next to the weights")
    tok = load_tokenizer(str(tok_file))
    if (local / TRAIN_STATE).is_file():
        state = json.loads((local / TRAIN_STATE).read_text())
        model = load_weights(GPT(ModelConfig.model_validate(state["model"])), local / WEIGHTS)
    else:
        from jobs.export import load_pretrained, load_state

        mcfg, sd = load_pretrained(str(local))
        model = load_state(GPT(mcfg), sd, source=str(path))
        state = {}
    return model.to(device), tok, state


def is_chat_model(state: dict) -> bool:
    return state.get("chat_template") == CHAT_TEMPLATE


# ----------------------------------------------------------------------------- worker plumbing


def batch_indices(n: int, step: int, cfg: PostTrainConfig, rank: int, world: int, micro: int) -> list[int]:
    """Example indices of one micro-batch. Like pretraining's ShardLoader, they depend only on
    (seed, step), so a resumed run sees exactly the batches it would have seen."""
    G = cfg.global_batch_size
    start = step * G + rank * (G // world) + micro * cfg.micro_batch_size
    out = []
    for g in range(start, start + cfg.micro_batch_size):
        epoch, pos = divmod(g, n)
        out.append(int(_permutation(n, cfg.seed, epoch)[pos]))
    return out


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def make_engine(cfg: PostTrainConfig, module: torch.nn.Module, param_groups: list[dict]):
    """DeepSpeed engine over `module` with pretraining's optimizer (AdamW), schedule (lr_at) and ZeRO stages."""
    import deepspeed

    from jobs.pretrain import lr_at

    bf16 = cfg.use_gpu and torch.cuda.is_available()
    ds_config = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # plain torch AdamW: DeepSpeed's fused Adam needs CUDA
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=False)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.lr),
        dist_init_required=False,
    )
    return engine


def restore(engine) -> tuple[int, list[dict]]:
    """Resume from Ray Train's checkpoint after a worker-group restart: (step, metric history)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return 0, []
    with ckpt.as_directory() as d:
        engine.load_checkpoint(str(Path(d) / "deepspeed"), tag="state")
        state = json.loads((Path(d) / TRAIN_STATE).read_text())
        history = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines() if x]
    return state["step"], history


def save_checkpoint(engine, config: dict, step: int, history: list[dict], metrics: dict, prefix: str = "") -> None:
    """Write one checkpoint in pretraining's format (each rank's MANIFEST written last, so that a
    torn checkpoint is skipped by latest_checkpoint) and report it to Ray Train.

    `prefix` selects the GPT's weights inside a wrapping module (a reward model's `body.`); the
    remaining tensors (its value head) go to value_head.safetensors.
    """
    import ray.train
    import torch.distributed as dist
    from safetensors.torch import save_file

    from jobs.pretrain import write_rank_manifest
    from model import ModelConfig

    mcfg = ModelConfig.model_validate(config["model"])
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(str(Path(d) / "deepspeed"), tag="state")
        if engine.zero_optimization_stage() == 3:
            sd = engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = engine.module.state_dict()
        if dist.get_rank() == 0:
            sd = {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
            body = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            rest = {k: v for k, v in sd.items() if not k.startswith(prefix)}
            if mcfg.tie_embeddings:
                body.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight
            save_file(body, str(Path(d) / WEIGHTS))
            if rest:
                save_file(rest, str(Path(d) / VALUE_HEAD))
            state = {
                "step": step, "kind": config["cfg"]["kind"], "world_size": dist.get_world_size(),
                "config": config["cfg"], "model": config["model"], "init_from": config["init_from"],
                "tokenizer_sha256": config["tokenizer_sha256"],
                "chat_template": CHAT_TEMPLATE, "metrics": metrics,
            }
            (Path(d) / TRAIN_STATE).write_text(json.dumps(state, indent=2))
            (Path(d) / "tokenizer.json").write_text(config["tokenizer_json"])
            (Path(d) / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        write_rank_manifest(Path(d), dist.get_rank(), step, dist.get_world_size())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_{step:07d}")


def finish_step(cfg, engine, config: dict, rank: int, history: list[dict], rec: dict, prefix: str = "") -> None:
    """Record a finished step: log it, and save a checkpoint every `checkpoint_every` steps and at
    the end; between checkpoints an eval is reported to Ray Train on its own."""
    import ray.train

    history.append(rec)
    log_step(rank, rec)
    if rec["step"] % cfg.checkpoint_every == 0 or rec["step"] == cfg.max_steps:
        save_checkpoint(engine, config, rec["step"], history, rec, prefix=prefix)
    elif "eval_loss" in rec:
        ray.train.report(rec)


def absolute_paths(cfg):
    """The config with `data`, `eval_file` and `output` absolute (local or s3://), as the workers see them."""
    return cfg.model_copy(update={"data": storage.absolute(cfg.data), "output": storage.absolute(cfg.output),
                                  "eval_file": storage.absolute(cfg.eval_file) if cfg.eval_file else None})


def log_step(rank: int, rec: dict) -> None:
    if rank == 0 and (rec["step"] % 10 == 0 or rec["step"] == 1 or any(k.startswith("eval_") for k in rec)):
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)


def all_reduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def check_finite(value: float, step: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"training diverged: loss is {value} at step {step}")


# ----------------------------------------------------------------------------- driver


def loop_config(cfg: PostTrainConfig, init_dir: str) -> dict:
    """What every worker needs: the resolved config, the base model's config and its tokenizer."""
    from model.tokenizer import load_tokenizer, tokenizer_sha256

    model, tok, _ = load_model(init_dir)
    mcfg = model.cfg
    if cfg.max_seq_len and cfg.max_seq_len > mcfg.max_seq_len:
        raise ValueError(f"max_seq_len ({cfg.max_seq_len}) exceeds the model's max_seq_len ({mcfg.max_seq_len})")
    tok_json = tok.to_str()
    special_ids(tok)
    return {
        "cfg": cfg.resolved(), "model": mcfg.model_dump(mode="json"), "init_from": init_dir,
        "tokenizer_json": tok_json, "tokenizer_sha256": tokenizer_sha256(load_tokenizer(tok_json)),
    }


def fit(cfg: PostTrainConfig, loop, config: dict) -> dict:
    """Run `loop` on `cfg.num_workers` Ray Train workers; return a summary of the newest checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.ray_utils import init_ray
    from jobs.pretrain import latest_checkpoint

    init_ray()
    storage.makedirs(cfg.output)
    storage.write_text(storage.join(cfg.output, "config.json"), json.dumps(cfg.resolved(), indent=2))
    out_fs, out_path = storage.resolve(cfg.output)
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=posixpath.basename(out_path),
            storage_path=posixpath.dirname(out_path),
            storage_filesystem=out_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.cpus_per_worker), "PYTHONWARNINGS": "ignore"}},
        ),
    )
    result = trainer.fit()
    ck = latest_checkpoint(cfg.output)
    state = storage.read_json(storage.join(ck, TRAIN_STATE))
    history = [json.loads(x) for x in storage.read_text(storage.join(ck, "metrics.jsonl")).splitlines() if x]
    storage.write_text(storage.join(cfg.output, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))
    summary = {"run": cfg.output, "checkpoint": ck, "steps": state["step"], "metrics": state["metrics"],
               "error": str(result.error) if result.error else None}
    print(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------- generation


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """New tokens for each prompt, cut before the first stop id.

    The model's KV cache has one position for the whole batch and no padding mask, so only
    prompts of equal length can share a forward pass: prompts are grouped by length and each
    group is decoded as one batch (exact, no padding tokens involved).
    """
    device = next(model.parameters()).device
    out: list[list[int] | None] = [None] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        groups.setdefault(len(p), []).append(i)
    for length, members in groups.items():
        budget = min(max_new_tokens, model.cfg.max_seq_len - length)
        if budget <= 0:
            raise ValueError(f"a prompt of {length} tokens leaves no room in max_seq_len={model.cfg.max_seq_len}")
        idx = torch.tensor([prompts[i] for i in members], device=device)
        y = model.generate(idx, budget, temperature=temperature, top_k=top_k, top_p=top_p,
                           stop_token=stop_ids[0] if stop_ids else None, generator=generator)
        for row, i in enumerate(members):
            new = y[row, length:].tolist()
            cut = next((j for j, t in enumerate(new) if t in stop_ids), len(new))
            out[i] = new[:cut]
    return out  # type: ignore[return-value]
