"""The planner (jobs.train.planner): its activation accounting against the tensors autograd really
keeps, Korthikanti et al.'s table 2, `--propose` against published layouts, and the command line.
Fast: no Ray, no DeepSpeed engine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.train.planner import (GiB, Features, Layout, korthikanti_table2, layer_activation_bytes, load_assumptions,
                                load_gpu, memory, propose, step_time)
from model import GPT, ModelConfig

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- activations


def saved_activation_bytes(block: torch.nn.Module, x: torch.Tensor, rope) -> int:
    """Bytes of the tensors autograd keeps for `block`'s backward: parameters, buffers and the
    RoPE tables (constants, shared by every block) excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*block.parameters(), *block.buffers(), *(rope or ())]}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope)
    return sum(kept.values())


@pytest.mark.parametrize("arch, dtype", [("llama", torch.bfloat16), ("llama", torch.float32), ("gpt2", torch.bfloat16),
                                         ("gpt2", torch.float32)])
def test_activation_accounting_is_what_autograd_keeps(one_torch_thread, arch, dtype):
    """layer_activation_bytes, term by term, against a real block's saved tensors (GQA for llama)."""
    shape = {"n_heads": 8, "n_kv_heads": 2, "d_model": 256, "d_ff": 704} if arch == "llama" else {
        "arch": "gpt2", "n_heads": 8, "d_model": 256}
    m = ModelConfig(vocab_size=512, n_layers=1, max_seq_len=256, **shape)
    model = GPT(m).to(dtype)
    s, b = 256, 2
    x = torch.randn(b, s, m.d_model, dtype=dtype, requires_grad=True)
    rope = (model.rope_cos[:s].to(dtype), model.rope_sin[:s].to(dtype)) if arch == "llama" else None
    got = saved_activation_bytes(model.blocks[0], x, rope)
    want = layer_activation_bytes(m, s, b, elem=dtype.itemsize)
    assert got == pytest.approx(want, rel=0.01), (got / (s * b * m.d_model), want / (s * b * m.d_model))


@pytest.mark.parametrize("t, sp", [(1, False), (8, False), (8, True), (4, True)])
def test_gpt3_layer_is_korthikanti_table2(t, sp):
    """For the GPT-3 layer (LayerNorm, MHA, 4h GELU, dropout) the accounting is table 2's row for
    selective recomputation, which is what flash attention stores (no s x s scores); the printed
    rows themselves: 34 + 5as/h without parallelism, 10 + 24/t + 5as/(ht) with TP, 34/t + 5as/(ht)
    with TP and sequence parallelism."""
    gpt3 = ModelConfig(arch="gpt2", n_layers=96, d_model=12288, n_heads=96, vocab_size=51200, max_seq_len=2048,
                       dropout=0.1)
    s, b, h, a = 2048, 1, 12288, 96
    ours = layer_activation_bytes(gpt3, s, b, t, sp)
    table = korthikanti_table2(s, b, h, a, t, sp, recompute="selective")
    assert ours == pytest.approx(table, rel=1e-3)  # the log-sum-exp (4a/h bytes per token) is all that differs
    assert korthikanti_table2(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
    assert korthikanti_table2(s, b, h, a, t) == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    assert korthikanti_table2(s, b, h, a, t, True) == pytest.approx(s * b * h * (34 / t + 5 * a * s / (h * t)))
    assert korthikanti_table2(s, b, h, a, t, recompute="full") == 2 * s * b * h


def test_tensor_parallelism_divides_the_blocks_not_the_embedding():
    m = ModelConfig(preset="llama-70b")
    one = memory(m, Layout(1, 1, 8, 0, 1, False), 4096, 64)
    eight = memory(m, Layout(8, 1, 8, 0, 1, False), 4096, 64)
    blocks = m.num_params(non_embedding=True)
    ends = m.num_params() - blocks
    assert one["weights"] == pytest.approx(2 * m.num_params(), rel=1e-6)
    assert eight["weights"] == pytest.approx(2 * (blocks / 8 + ends), rel=1e-4)  # embedding and head replicated
    vocab = memory(m, Layout(8, 1, 8, 0, 1, False), 4096, 64, Features(vocab_parallel=True))
    assert vocab["weights"] == pytest.approx(2 * m.num_params() / 8, rel=1e-4)
    # sequence parallelism divides what TP alone leaves whole
    sp = memory(m, Layout(8, 1, 8, 0, 1, False), 4096, 64, Features(sequence_parallel=True))
    assert sp["activations"] < eight["activations"]


# ----------------------------------------------------------------------------- published layouts

GPT3 = ModelConfig(arch="gpt2", n_layers=96, d_model=12288, n_heads=96, vocab_size=51200, max_seq_len=2048)
LLAMA3_405B = ModelConfig(n_layers=126, d_model=16384, n_heads=128, n_kv_heads=8, d_ff=53248, vocab_size=128256,
                          max_seq_len=8192, tie_embeddings=False)
LLAMA3_8B = ModelConfig(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336, vocab_size=128256,
                        max_seq_len=8192, tie_embeddings=False)
LLAMA3_70B = ModelConfig(n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, d_ff=28672, vocab_size=128256,
                         max_seq_len=8192, tie_embeddings=False)
MPT_7B = ModelConfig(arch="gpt2", n_layers=32, d_model=4096, n_heads=32, vocab_size=50368, max_seq_len=2048)
MPT_30B = ModelConfig(arch="gpt2", n_layers=48, d_model=7168, n_heads=64, vocab_size=50432, max_seq_len=2048)
VOCAB = Features(vocab_parallel=True)
VOCAB_SP = Features(vocab_parallel=True, sequence_parallel=True)

LLM_FOUNDRY = "mosaicml/llm-foundry scripts/train/benchmarking/README.md @c90b9b31"
TORCHTITAN = "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md @31a17bfd"
# name, model, GPU, GPUs, sequence, global batch (sequences), the published layout (FSDP = ZeRO-3),
# the implementation's features, reported memory GiB or None, reported MFU or None, source, asserted
PUBLISHED = [
    ("GPT-3 175B, Megatron-LM", GPT3, "A100", 1536, 2048, 1536, Layout(8, 16, 12, 1, 1, False), VOCAB, None, None,
     "NVIDIA/Megatron-LM examples/gpt3/train_gpt3_175b_distributed.sh @157006d6 (TP 8, PP 16, micro 1, "
     "global 1536; 1536 GPUs, as Narayanan et al. 2021 train it, is our choice)", True),
    ("Llama 3 405B", LLAMA3_405B, "H100", 8192, 8192, 2048, Layout(8, 16, 64, 1, 1, True), VOCAB_SP, None, 0.43,
     "Llama 3 paper (arXiv:2407.21783) table 4: TP 8, PP 16, DP 64 on 8,192 H100, 16M-token batches", False),
    ("MPT-7B, A100-40GB", MPT_7B, "A100-40GB", 128, 2048, 2304, Layout(1, 1, 128, 3, 18, True), Features(), None,
     0.5014, LLM_FOUNDRY, False),
    ("MPT-30B, A100-40GB", MPT_30B, "A100-40GB", 128, 2048, 768, Layout(1, 1, 128, 3, 6, True), Features(), None,
     0.5225, LLM_FOUNDRY, True),
    ("MPT-7B, H100", MPT_7B, "H100", 128, 2048, 768, Layout(1, 1, 128, 3, 6, False), Features(), None, 0.4571,
     LLM_FOUNDRY, False),
    ("MPT-30B, H100", MPT_30B, "H100", 128, 2048, 1024, Layout(1, 1, 128, 3, 8, True), Features(), None, 0.4185,
     LLM_FOUNDRY, True),
    ("Llama 3.1 8B, torchtitan", LLAMA3_8B, "H100-96GB", 128, 8192, 256, Layout(1, 1, 128, 3, 2, True), VOCAB_SP,
     67.0, None, TORCHTITAN + " table 3 (selective activation checkpointing)", False),
    ("Llama 3.1 70B, torchtitan", LLAMA3_70B, "H100-96GB", 256, 8192, 512, Layout(8, 1, 32, 3, 16, True), VOCAB_SP,
     71.9, None, TORCHTITAN + " table 4 (float8, torch.compile)", True),
]


def evaluate_published(row) -> dict:
    """Where the planner puts a published layout: its fastest variant of the same TP x PP x DP
    and ZeRO class (ZeRO 0/1 alike: DeepSpeed's pipeline takes nothing else), and the exact
    published layout's estimate."""
    name, m, gpu, n, seq, batch, lay, feats, mem_pub, mfu_pub, source, asserted = row
    prop = propose(m, seq, batch, gpu, n, feats)
    best = prop.fits[0][1]["step_s"]
    same_zero = (lambda z: z >= 3) if lay.zero >= 3 else (lambda z: z <= 1)
    ranked = [(i + 1, f) for i, f in enumerate(prop.fits) if f[0].shape == lay.shape and same_zero(f[0].zero)]
    exact_mem = memory(m, lay, seq, batch, feats, overhead=load_assumptions().overhead_bytes)
    exact_time = step_time(m, lay, seq, batch, load_gpu(gpu), load_assumptions(), feats)
    rank, (variant, tm, mem) = ranked[0]
    return {"name": name, "fits": len(prop.fits), "top": len(prop.top), "best": prop.fits[0][0],
            "rank": rank, "variant": variant, "ratio": tm["step_s"] / best, "in_top": tm["step_s"] <= best * 1.1,
            "variant_memory_gib": mem["total"] / GiB, "exact_ratio": exact_time["step_s"] / best,
            "exact_fits": exact_mem["total"] <= load_gpu(gpu).memory_bytes, "exact_memory_gib": exact_mem["total"] / GiB,
            "exact_mfu": exact_time["mfu"], "published_mfu": mfu_pub, "published_memory_gib": mem_pub}


@pytest.mark.parametrize("row", [r for r in PUBLISHED if r[-1]], ids=lambda r: r[0])
def test_published_layouts_are_among_the_top_choices(row):
    """Megatron-LM's GPT-3 175B, MPT-30B (FSDP) on A100 and H100, torchtitan's Llama 3.1 70B: the
    published TP x PP x DP with its ZeRO class is within 10 % of the fastest estimate. (The other
    rows of PUBLISHED, and why they are not, are in docs/pretrain.md.)"""
    got = evaluate_published(row)
    assert got["in_top"], got
    assert got["top"] <= got["fits"] / 5  # the top choices are a small part of what fits, not everything


# ----------------------------------------------------------------------------- --propose


def test_propose_lists_every_layout_once_with_a_reason_for_each_rejection():
    m = ModelConfig(preset="llama-70b")
    prop = propose(m, 4096, 1024, "H100", 64)
    layouts = [f[0] for f in prop.fits] + [r[0] for r in prop.rejected]
    assert len(layouts) == len(set(layouts))
    assert {lay.tp for lay in layouts} == {1, 2, 4, 8, 16, 32, 64}
    times = [f[1]["step_s"] for f in prop.fits]
    assert times == sorted(times) and prop.fits
    assert all(mem["total"] <= load_gpu("H100").memory_bytes for _, _, mem in prop.fits)
    why = dict(prop.rejected)
    assert "does not divide the 8 GPUs per node" in why[Layout(16, 1, 4, 3, 1, True)]
    assert why[Layout(1, 1, 64, 0, 1, True)].startswith("needs ")  # 69 B parameters x 16 bytes on every GPU
    assert "zero_stage (3) must be 0 or 1 with pipeline_stages" in why[Layout(8, 2, 4, 3, 1, True)]
    # llama-70b does not fit 64 H100 without sharding or tensor parallelism: TP, ZeRO-3 or stages in every fit
    assert all(lay.tp > 1 or lay.pp > 1 or lay.zero == 3 for lay, _, _ in prop.fits)


def test_propose_and_plan_from_the_command_line():
    base = [sys.executable, "-m", "jobs.pretrain", "--config", "configs/demo.yaml", "--set", "data=/nonexistent",
            "--set", "model.preset=llama-70b", "--set", "model.max_seq_len=4096", "--set", "global_batch_size=1024",
            "--set", "micro_batch_size=1"]
    out = subprocess.run([*base, "--propose", "--gpu", "H100", "--gpus", "64"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "64 x H100" in out.stdout and "top choices" in out.stdout
    assert "TP 16 x PP 1 x DP 4: none fits: tensor_parallel (16) does not divide the 8 GPUs per node" in out.stdout
    out = subprocess.run([*base, "--propose", "--gpu", "L4", "--gpus", "8"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "--gpu L4: no interconnect figures for it in jobs/train/gpus.yaml" in out.stderr
    out = subprocess.run([*base, "--plan", "--set", "tensor_parallel=8", "--set", "num_workers=64",
                          "--set", "use_gpu=true"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TP 8 x PP 1 x DP 8" in out.stdout and "optimizer" in out.stdout
