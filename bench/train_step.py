"""Training-step throughput of model.GPT against Hugging Face's own implementations.

One step = zero_grad + forward + cross-entropy + backward + AdamW step, on one device, one
process. For each preset the same batch runs through:

  ours       model.GPT
  hf-sdpa    transformers LlamaForCausalLM / GPT2LMHeadModel, attn_implementation="sdpa"
  hf-eager   the same with attn_implementation="eager" (matmul + mask + softmax + matmul):
             the straightforward PyTorch implementation we must not be slower than

The HF models are built from config objects with the preset's sizes (no downloads); their
parameter counts are printed next to ours as a check that the configs really match.
Implementations run interleaved, round by round, so that load from other jobs on a shared
machine lands on all of them alike. Reports the median step time, tokens/s, ours/reference,
and MFU when CUDA is present.

    python bench/train_step.py                          # tiny and gpt2-124m, CPU defaults
    python bench/train_step.py --preset tiny --batch 16 --seq 256 --steps 20 --json out.json
    python bench/train_step.py --dtype bf16 --compile   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from model.gpt import GPT, ModelConfig  # noqa: E402

IMPLS = ("ours", "hf-sdpa", "hf-eager")

# Dense bf16 tensor-core peak (no 2:4 sparsity), FLOP/s, from NVIDIA's datasheets: H100 SXM and
# H200 989.4 TFLOPS (H100/H200 datasheets; H100 PCIe/NVL 756), A100 312 (A100 datasheet),
# L4 121 (L4 datasheet), A10G 125 (AWS G5 / A10 datasheet). Matched by substring of
# torch.cuda.get_device_name(), most specific first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("A10G", 125e12),
)

# Per-preset (batch, seq) defaults. gpt2-124m on 2 CPU cores takes seconds per step, so the
# CPU default is one short-ish sequence; GPUs get shapes that keep the tensor cores busy.
CPU_SHAPES = {"tiny": (8, 256), "gpt2-124m": (1, 512)}
GPU_SHAPES = {"tiny": (64, 256), "gpt2-124m": (16, 1024)}


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


# ----------------------------------------------------------------------------- models


def hf_model(cfg: ModelConfig, attn: str) -> nn.Module:
    """The transformers model with the same architecture and sizes as cfg."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise SystemExit(f"bench/train_step.py needs transformers 5.x, found {transformers.__version__}")
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, use_cache=False,
                  attn_implementation=attn)
    if cfg.arch == "llama":
        hf_cfg = transformers.LlamaConfig(
            hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            attention_dropout=cfg.dropout, attention_bias=False, mlp_bias=False, **common,
        )
        model = transformers.LlamaForCausalLM(hf_cfg)
    else:
        if cfg.kv_heads != cfg.n_heads:
            raise SystemExit("GPT2LMHeadModel has no grouped-query attention; use n_kv_heads = n_heads")
        hf_cfg = transformers.GPT2Config(
            n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
            n_inner=cfg.ff_dim, activation_function="gelu_new",  # tanh GELU, as ours
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.norm_eps, **common,
        )
        model = transformers.GPT2LMHeadModel(hf_cfg)
    return model


def hf_optim_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The rule of GPT.optim_groups: decay matmul weights only, never norms, biases or embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Runner:
    """One implementation: model, optimizer and a step function returning the loss tensor."""

    def __init__(self, impl: str, cfg: ModelConfig, device: torch.device, dtype: str, compile_: bool):
        self.impl = impl
        torch.manual_seed(0)
        if impl == "ours":
            model = GPT(cfg)
            groups = model.optim_groups(0.1)
        else:
            model = hf_model(cfg, impl.removeprefix("hf-"))
            groups = hf_optim_groups(model, 0.1)
        # fp32 master weights in every mode; bf16 is autocast, as in mixed-precision training.
        self.model = model.to(device).train()
        self.num_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
        # fused=False as in jobs/pretrain.py (fused AdamW needs CUDA); foreach is torch's default.
        self.optimizer = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=False)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
        self.forward = torch.compile(self.model) if compile_ else self.model

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            if self.impl == "ours":
                return self.forward(x, y)[1]
            # shift_labels=y: y is already shifted, so HF's loss covers all T positions, as ours does.
            return self.forward(input_ids=x, labels=y, shift_labels=y).loss

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        loss.backward()
        self.optimizer.step()
        return loss


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_preset(name: str, args, device: torch.device) -> list[dict]:
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    B0, T0 = shapes.get(name, (4, 256))
    B, T = args.batch or B0, args.seq or T0
    cfg = ModelConfig.preset(name)
    if T > cfg.max_seq_len:
        raise SystemExit(f"--seq {T} exceeds {name}'s max_seq_len={cfg.max_seq_len}")
    g = torch.Generator().manual_seed(1234)
    rows = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(device)
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    runners = [Runner(impl, cfg, device, args.dtype, args.compile) for impl in args.impl]
    first_loss = {}
    for r in runners:
        for i in range(args.warmup):
            loss = r.step(x, y)
            if i == 0:
                first_loss[r.impl] = float(loss.detach())  # ~ln(V) for all: the same task at the same init
        sync(device)
    times = {r.impl: [] for r in runners}
    # CPU seconds of this process per step: on a shared CPU the wall time mostly measures the
    # other jobs, the CPU time what the step itself costs (compare it with --threads 1).
    cpu_times = {r.impl: [] for r in runners}
    # Rounds interleave the implementations (ours, hf-sdpa, hf-eager, ours, ...) so slow phases of
    # a shared machine do not all land on one of them.
    for _ in range(args.rounds):
        for r in runners:
            for _ in range(args.steps):
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                r.step(x, y)
                sync(device)
                times[r.impl].append(time.perf_counter() - t0)
                cpu_times[r.impl].append(time.process_time() - c0)

    flops_tok = cfg.flops_per_token(T)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    results = []
    for r in runners:
        med = statistics.median(times[r.impl])
        tok_s = B * T / med
        results.append({
            "preset": name, "impl": r.impl, "batch": B, "seq": T, "dtype": args.dtype, "compile": args.compile,
            "params": r.num_params, "first_loss": round(first_loss[r.impl], 4),
            "step_ms_median": med * 1e3, "step_ms_min": min(times[r.impl]) * 1e3,
            "step_ms_max": max(times[r.impl]) * 1e3, "n_steps": len(times[r.impl]),
            "cpu_ms_median": statistics.median(cpu_times[r.impl]) * 1e3,
            "tokens_per_s": tok_s, "flops_per_token": flops_tok,
            "mfu": flops_tok * tok_s / peak if peak else None,
        })
    ours = next((r for r in results if r["impl"] == "ours"), None)
    for res in results:
        # ours/reference throughput: > 1 means ours is faster.
        res["ours_over_this"] = ours["tokens_per_s"] / res["tokens_per_s"] if ours else None
        res["ours_over_this_cpu"] = res["cpu_ms_median"] / ours["cpu_ms_median"] if ours else None
    del runners
    return results


def print_table(results: list[dict], meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"train step (fwd+bwd+AdamW) on {meta['device']}, {meta['threads']} threads")
    for col in ("preset", "impl", "B x T", "dtype", "params", "loss@0", "step ms (med)", "min..max",
                "tokens/s", "ours / this", "CPU ms (med)", "ours / this (CPU)", "MFU"):
        table.add_column(col, justify="left" if col in ("preset", "impl") else "right")
    for r in results:
        table.add_row(
            r["preset"], r["impl"], f"{r['batch']} x {r['seq']}", r["dtype"] + (" +compile" if r["compile"] else ""),
            f"{r['params'] / 1e6:.2f} M", f"{r['first_loss']:.3f}", f"{r['step_ms_median']:.1f}",
            f"{r['step_ms_min']:.0f}..{r['step_ms_max']:.0f}", f"{r['tokens_per_s']:,.0f}",
            f"{r['ours_over_this']:.2f}x" if r["ours_over_this"] else "-",
            f"{r['cpu_ms_median']:.1f}", f"{r['ours_over_this_cpu']:.2f}x" if r["ours_over_this_cpu"] else "-",
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-",
        )
    Console(width=max(Console().width, 160)).print(table)  # piped output: do not squeeze columns


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", default=["tiny", "gpt2-124m"], help="model presets (model/presets/*.yaml)")
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations to time")
    p.add_argument("--batch", type=int, help="sequences per step (default: per preset, see CPU_SHAPES/GPU_SHAPES)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: per preset)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per implementation per round")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds over the implementations")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast over fp32 weights")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="write results and machine details here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import transformers

    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "bench/train_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
    }
    results = []
    for name in args.preset:
        results += bench_preset(name, args, device)
    print_table(results, meta)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
