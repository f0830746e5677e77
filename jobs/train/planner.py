"""The memory and time planner: what a run needs per worker and whether it fits (`--plan`), and
the parallel layouts that fit a model on a cluster, fastest first (`--propose`).

Memory per GPU, for the fullest pipeline stage (docs/pretrain.md, "The planner", has the
derivation and its checks):

* weights, gradients, optimizer state: 2 + 2 + 12 bytes per parameter with bf16 mixed precision,
  4 + 4 + 8 in fp32 (Rajbhandari et al. 2020, section 3); ZeRO-1 divides the optimizer state by
  the data-parallel replicas, ZeRO-2 also the gradients, ZeRO-3 also the weights; tensor
  parallelism divides the blocks' parameters (not the embedding and head, which raylm keeps whole
  on every TP rank), pipeline stages hold their own blocks.
* activations per block: Korthikanti et al. 2022, table 2, term by term for the block raylm
  runs (`layer_activation_bytes`, checked against the tensors autograd saves), times the
  micro-batches 1F1B keeps in flight on the stage; with activation checkpointing each block's
  input plus one block's activations; the logits on the last stage.

Step time: 1F1B over m micro-batches and p stages, (m + p - 1) times the slowest stage's time per
micro-batch (its FLOPs at a stated fraction of peak, its tensor-parallel all-reduces and its
stage-to-stage sends), plus the data-parallel gradient reduction where DeepSpeed does not overlap
it and the optimizer step. GPU figures and the model's constants are data: jobs/train/gpus.yaml.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import yaml

from jobs.train.config import PretrainConfig
from jobs.train.metrics import PEAK_BF16_FLOPS
from model import ModelConfig

GiB = 2**30


# ----------------------------------------------------------------------------- hardware, as data


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float
    memory_bytes: float
    hbm_bytes_s: float
    nvlink_bytes_s: float
    network_bytes_s: float
    per_node: int


@dataclass(frozen=True)
class Assumptions:
    gemm_efficiency: float
    collective_efficiency: float
    nvlink_latency_s: float
    network_latency_s: float
    optimizer_bytes_per_param: float
    overhead_bytes: float


@lru_cache(maxsize=1)
def _gpus_yaml() -> dict:
    return yaml.safe_load(resources.files("jobs.train").joinpath("gpus.yaml").read_text())


def gpu_names() -> list[str]:
    return sorted(_gpus_yaml()["gpus"])


def load_gpu(name: str) -> GPU:
    gpus = _gpus_yaml()["gpus"]
    if name not in gpus:
        raise ValueError(f"gpu: no figures for {name!r} in jobs/train/gpus.yaml; known: {sorted(gpus)}")
    g = gpus[name]
    return GPU(name=name, peak_flops=g["peak_bf16_tflops"] * 1e12, memory_bytes=g["memory_gib"] * GiB,
               hbm_bytes_s=g["hbm_tb_s"] * 1e12, nvlink_bytes_s=g["nvlink_gb_s"] * 1e9,
               network_bytes_s=g["network_gb_s"] * 1e9, per_node=g["gpus_per_node"])


def load_assumptions() -> Assumptions:
    a = _gpus_yaml()["assumptions"]
    return Assumptions(gemm_efficiency=a["gemm_efficiency"], collective_efficiency=a["collective_efficiency"],
                       nvlink_latency_s=a["nvlink_latency_us"] * 1e-6, network_latency_s=a["network_latency_us"] * 1e-6,
                       optimizer_bytes_per_param=a["optimizer_bytes_per_param"], overhead_bytes=a["overhead_gib"] * GiB)


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """One way to run a model on tp * pp * dp GPUs."""

    tp: int
    pp: int
    dp: int
    zero: int
    micro: int
    ac: bool  # activation checkpointing (model.activation_checkpointing)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.tp, self.pp, self.dp

    def __str__(self) -> str:
        return (f"TP {self.tp} x PP {self.pp} x DP {self.dp}, ZeRO-{self.zero}, micro-batch {self.micro}, "
                f"activation checkpointing {'on' if self.ac else 'off'}")


@dataclass(frozen=True)
class Features:
    """What the training implementation does that changes memory or time. raylm's (the default):
    embedding and output head whole on every TP rank, no sequence parallelism. The published
    runs the planner is checked against (tests/test_planner.py) split the vocabulary over the TP
    ranks and some use sequence parallelism (Korthikanti et al. 2022)."""

    vocab_parallel: bool = False
    sequence_parallel: bool = False


RAYLM = Features()


# ----------------------------------------------------------------------------- memory


def korthikanti_table2(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                       recompute: str = "none") -> float:
    """Activation bytes of one GPT-3 layer (LayerNorm, MHA, 4h GELU MLP, dropout), 16-bit, as
    printed in Korthikanti et al. 2022, table 2. recompute: none, selective or full."""
    if recompute == "full":
        return 2 * s * b * h
    score = 0 if recompute == "selective" else 5 * a * s / (h * t)
    per = 34 / t if sequence_parallel else 10 + 24 / t
    return s * b * h * (per + score)


def layer_activation_bytes(m: ModelConfig, s: int, b: int, t: int = 1, sequence_parallel: bool = False,
                           elem: int = 2) -> float:
    """Bytes one of raylm's blocks keeps for its backward pass, term by term as Korthikanti et al.
    2022 count them (table 2), with elem-byte activations and flash attention (SDPA keeps its
    output and the log-sum-exp of each score row, never the scores; on CPU as on GPU).

    Whole on every TP rank (divided by t only with sequence parallelism): the norms' inputs and
    outputs — gpt2: LayerNorm keeps its input, the next matrix product its output (2 x 2 elems);
    llama: raylm's RMSNorm works in fp32, keeping the fp32 input (4 bytes), the normalised value
    and its output (2 x (4 + 2 elems)) — plus the dropout masks (1 byte each) when dropout > 0.
    Split over t: q, k, v and the attention output (2 + 2 h_kv/h elems), the MLP's hidden
    activations (GELU: its input and output, 2 f/h elems; SwiGLU: gate, silu(gate), up and their
    product, 4 f/h elems), the log-sum-exp (4 a/h bytes). For arch gpt2 with dropout this is table 2's
    'tensor (+ sequence) parallel, selective recomputation' row exactly (tests/test_planner.py).
    """
    h, f = m.d_model, m.ff_dim
    h_kv = m.kv_heads * m.head_dim
    if m.arch == "gpt2":
        whole = 4 * elem + (2 if m.dropout else 0)
        mlp = 2 * elem * f / h
    else:
        whole = 2 * (4 + 2 * elem)
        mlp = 4 * elem * f / h
    split = elem * (2 + 2 * h_kv / h) + mlp + 4 * m.n_heads / h
    return s * b * h * ((whole / t if sequence_parallel else whole) + split / t)


# Bytes per logit element at the loss's backward, the peak, besides the logits themselves (elem
# bytes, still referenced by the caller): the fp32 log-softmax GPT.forward's cross-entropy keeps
# (4) and the backward's fp32 gradients of it and of its input (4 + 4).
LOGIT_FP32_BYTES = 12


def stage_blocks(n_layers: int, pp: int) -> tuple[int, int]:
    """(blocks on the first stage, on the last): DeepSpeed's balanced partition gives the first
    n_layers % pp stages one block more."""
    q, r = divmod(n_layers, pp)
    return (q + 1 if r else q), q


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter for weights, gradients and optimizer state, and per activation element."""

    weights: int
    gradients: int
    optimizer: int
    elem: int


BF16 = Precision(2, 2, 12, 2)  # mixed precision: bf16 weights and gradients, fp32 master + Adam moments
FP32 = Precision(4, 4, 8, 4)


def memory(m: ModelConfig, layout: Layout, seq: int, global_batch: int, features: Features = RAYLM,
           precision: Precision = BF16, offload_optimizer: bool = False, overhead: float = 0.0) -> dict[str, float]:
    """Bytes per GPU of the fullest pipeline stage: weights, gradients, optimizer, activations (with
    the logits), ZeRO-3's gathered layers and a fixed overhead, and their total."""
    t, p, d, b = layout.tp, layout.pp, layout.dp, layout.micro
    micro_batches = max(1, global_batch // (b * d))
    h, V = m.d_model, m.vocab_size
    norm = m.d_model * (2 if m.bias else 1)  # the final norm, on the last stage
    per_block = (m.num_params(non_embedding=True) - norm) / max(1, m.n_layers)
    vocab_split = t if features.vocab_parallel else 1
    embedding = (V * h + (m.max_seq_len * h if m.arch == "gpt2" else 0)) / vocab_split
    head = V * h / vocab_split + norm  # untied; tied, the last stage holds a copy of the embedding
    first, last = stage_blocks(m.n_layers, p)
    a_layer = layer_activation_bytes(m, seq, b, t, features.sequence_parallel, precision.elem)
    checkpointed = precision.elem * seq * b * h / (t if features.sequence_parallel else 1)
    logits = (precision.elem + LOGIT_FP32_BYTES) * b * seq * V / vocab_split

    def stage(blocks: int, in_flight: int, ends: float, with_logits: bool) -> dict[str, float]:
        params = blocks * per_block / t + ends
        weights = params * precision.weights / (d if layout.zero >= 3 else 1)
        grads = params * precision.gradients / (d if layout.zero >= 2 else 1)
        optim = 0.0 if offload_optimizer else params * precision.optimizer / (d if layout.zero >= 1 else 1)
        if layout.ac:
            acts = in_flight * blocks * checkpointed + a_layer
        else:
            acts = in_flight * blocks * a_layer
        acts += logits if with_logits else 0.0
        gathered = 2 * precision.weights * per_block / t if layout.zero >= 3 else 0.0  # the layer in use + the prefetched
        return {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts,
                "zero3_buffers": gathered}

    if p == 1:
        stages = [stage(m.n_layers, 1, embedding + (norm if m.tie_embeddings else head), True)]
    else:
        stages = [stage(first, min(p, micro_batches), embedding, False),
                  stage(last, 1, head, True)]
    for s_ in stages:
        s_["overhead"] = overhead
        s_["total"] = sum(s_.values())
    return max(stages, key=lambda s_: s_["total"])


# ----------------------------------------------------------------------------- time


def step_time(m: ModelConfig, layout: Layout, seq: int, global_batch: int, gpu: GPU, assume: Assumptions,
              features: Features = RAYLM) -> dict[str, float]:
    """Seconds per optimizer step of `layout` and what they are made of (module docstring)."""
    t, p, d, b = layout.tp, layout.pp, layout.dp, layout.micro
    mb = global_batch // (b * d)
    tokens = b * seq
    h, V = m.d_model, m.vocab_size
    per_block = (m.num_params(non_embedding=True) - m.d_model * (2 if m.bias else 1)) / max(1, m.n_layers)
    flops = gpu.peak_flops * assume.gemm_efficiency
    eff = assume.collective_efficiency
    vocab_split = t if features.vocab_parallel else 1

    def ring(ranks: int, bytes_: float, bandwidth: float, latency: float, steps_per_rank: int = 2) -> float:
        """An all-reduce (2 passes) or all-gather / reduce-scatter (1 pass) over a ring."""
        if ranks == 1:
            return 0.0
        return steps_per_rank * (ranks - 1) * (bytes_ / ranks / (bandwidth * eff) + latency)

    in_node_tp = t <= gpu.per_node
    bw_tp = gpu.nvlink_bytes_s if in_node_tp else gpu.network_bytes_s
    lat_tp = assume.nvlink_latency_s if in_node_tp else assume.network_latency_s
    # tensor innermost, then data, then pipeline (DeepSpeed's and Megatron's rank order)
    in_node_dp = t * d <= gpu.per_node
    bw_dp = gpu.nvlink_bytes_s if in_node_dp else gpu.network_bytes_s
    lat_dp = assume.nvlink_latency_s if in_node_dp else assume.network_latency_s
    in_node_pp = t * d * p <= gpu.per_node
    bw_pp = gpu.nvlink_bytes_s if in_node_pp else gpu.network_bytes_s
    lat_pp = assume.nvlink_latency_s if in_node_pp else assume.network_latency_s

    activation = 2 * tokens * h  # bf16 (b, s, h)
    # per block and micro-batch: 2 all-reduces forward, 2 backward (+2 recomputing the forward);
    # sequence parallelism's all-gather + reduce-scatter move the same bytes in as many steps
    tp_per_block = (6 if layout.ac else 4) * ring(t, activation, bw_tp, lat_tp)
    block_compute = (6 * per_block + 12 * h * seq) * tokens / t / flops * (4 / 3 if layout.ac else 1)
    head_compute = 6 * V * h * tokens / vocab_split / flops
    p2p = 2 * (activation / (bw_pp * eff) + lat_pp) if p > 1 else 0.0
    first, last = stage_blocks(m.n_layers, p)
    stage_first = first * (block_compute + tp_per_block) + (head_compute if p == 1 else 0.0)
    stage_last = last * (block_compute + tp_per_block) + head_compute
    tau = max(stage_first, stage_last) + p2p
    pipeline = (mb + p - 1) * tau

    # the fullest stage's parameters (their gradients are what data parallelism reduces)
    params = max(first * per_block / t + (V * h / vocab_split if p > 1 else 0.0),
                 last * per_block / t + V * h / vocab_split * (2 - int(m.tie_embeddings) if p == 1 else 1))
    grad_bytes = 2 * params
    if layout.zero >= 3:
        # per micro-batch: all-gather forward, all-gather backward, reduce-scatter of gradients,
        # one collective per block each; overlapped with the micro-batch's compute (prefetch)
        blocks = max(first, last)
        per_mb = 3 * (ring(d, grad_bytes, bw_dp, 0.0, 1) + blocks * (d - 1) * lat_dp if d > 1 else 0.0)
        exposed = mb * max(0.0, per_mb - tau)
        dp_total = mb * per_mb
    else:
        # one all-reduce (ZeRO-2: reduce-scatter + all-gather, the same bytes) after the last
        # micro-batch: DeepSpeed overlaps it with the backward only for ZeRO-3 (overlap_comm)
        dp_total = exposed = ring(d, grad_bytes, bw_dp, lat_dp)
    optimizer = assume.optimizer_bytes_per_param * params / (d if layout.zero >= 1 else 1) / gpu.hbm_bytes_s
    step = pipeline + exposed + optimizer
    n_gpus = t * p * d
    return {"step_s": step, "pipeline_s": pipeline, "bubble": (p - 1) / (mb + p - 1), "micro_batches": mb,
            "tp_comm_s": (mb + p - 1) * max(first, last) * tp_per_block, "dp_comm_s": dp_total,
            "dp_exposed_s": exposed, "optimizer_s": optimizer,
            "mfu": m.flops_per_token(seq) * global_batch * seq / (n_gpus * gpu.peak_flops * step)}


# ----------------------------------------------------------------------------- --propose


@dataclass
class Proposal:
    model: ModelConfig
    seq: int
    global_batch: int
    gpu: GPU
    gpus: int
    features: Features
    fits: list[tuple[Layout, dict, dict]] = field(default_factory=list)  # (layout, time, memory), fastest first
    rejected: list[tuple[Layout, str]] = field(default_factory=list)

    TOP_BAND = 0.10  # "top choices": within 10 % of the fastest estimate, the model's stated resolution

    @property
    def top(self) -> list[tuple[Layout, dict, dict]]:
        if not self.fits:
            return []
        best = self.fits[0][1]["step_s"]
        return [f for f in self.fits if f[1]["step_s"] <= best * (1 + self.TOP_BAND)]

    def best_of(self, shape: tuple[int, int, int]) -> tuple[int, Layout, dict, dict] | None:
        """(rank from 1, layout, time, memory) of the fastest fitting layout of this TP x PP x DP."""
        return next(((i + 1, *f) for i, f in enumerate(self.fits) if f[0].shape == shape), None)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _config_refusal(m: ModelConfig, gpus: int, global_batch: int, layout: Layout) -> str | None:
    """PretrainConfig's own verdict on the layout (the message it would refuse it with)."""
    try:
        PretrainConfig(data="-", output="-", model=m, use_gpu=True, num_workers=gpus, global_batch_size=global_batch,
                       micro_batch_size=layout.micro, tensor_parallel=layout.tp, pipeline_stages=layout.pp,
                       zero_stage=layout.zero, warmup_steps=0)
    except ValueError as e:
        errors = getattr(e, "errors", None)
        return errors()[0]["msg"].removeprefix("Value error, ") if callable(errors) else str(e)
    return None


def propose(m: ModelConfig, seq: int, global_batch: int, gpu: str | GPU, gpus: int, features: Features = RAYLM,
            assume: Assumptions | None = None) -> Proposal:
    """Every layout of `gpus` GPUs (TP, PP, DP, ZeRO stage, micro-batch, activation checkpointing),
    split into those that fit (fastest first) and those rejected, each with its reason."""
    g = load_gpu(gpu) if isinstance(gpu, str) else gpu
    assume = assume or load_assumptions()
    out = Proposal(model=m, seq=seq, global_batch=global_batch, gpu=g, gpus=gpus, features=features)
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            micros = _divisors(global_batch // dp) if global_batch % dp == 0 else [1]
            for zero in (0, 1, 2, 3):
                shape_refusal = None
                if g.per_node % tp:
                    shape_refusal = (f"tensor_parallel ({tp}) does not divide the {g.per_node} GPUs per node: a "
                                     f"tensor-parallel group would span nodes, and its all-reduces need NVLink")
                elif global_batch % dp:
                    shape_refusal = f"global batch ({global_batch}) is not a multiple of the {dp} data-parallel replicas"
                else:
                    shape_refusal = _config_refusal(m, gpus, global_batch, Layout(tp, pp, dp, zero, micros[0], False))
                for micro in micros:
                    for ac in (False, True):
                        layout = Layout(tp, pp, dp, zero, micro, ac)
                        if shape_refusal:
                            out.rejected.append((layout, shape_refusal))
                            continue
                        mem = memory(m, layout, seq, global_batch, features, overhead=assume.overhead_bytes)
                        if mem["total"] > g.memory_bytes:
                            out.rejected.append((layout, f"needs {mem['total'] / GiB:.1f} GiB > {g.memory_bytes / GiB:.1f} "
                                                         f"GiB per {g.name}"))
                            continue
                        out.fits.append((layout, step_time(m, layout, seq, global_batch, g, assume, features), mem))
    out.fits.sort(key=lambda f: (f[1]["step_s"], f[2]["total"]))
    return out


def format_proposal(prop: Proposal, top: int = 10) -> str:
    m, g = prop.model, prop.gpu
    a = load_assumptions()
    lines = [
        f"model: {m.num_params() / 1e9:.2f} B parameters ({m.arch}, {m.n_layers} layers, d_model {m.d_model}, "
        f"{m.n_heads}/{m.kv_heads} heads, vocabulary {m.vocab_size}); sequence {prop.seq}, global batch "
        f"{prop.global_batch} sequences",
        f"cluster: {prop.gpus} x {g.name} ({g.memory_bytes / GiB:.1f} GiB, {g.peak_flops / 1e12:.0f} TFLOP/s bf16, "
        f"NVLink {g.nvlink_bytes_s / 1e9:.0f} GB/s, network {g.network_bytes_s / 1e9:.0f} GB/s per GPU, "
        f"{g.per_node} per node)",
        f"assumed: matrix products at {a.gemm_efficiency:.0%} of peak, collectives at {a.collective_efficiency:.0%} of "
        f"link bandwidth, {a.overhead_bytes / GiB:.0f} GiB fixed overhead per GPU (jobs/train/gpus.yaml)",
        "",
    ]
    if not prop.fits:
        lines.append("no layout fits")
    else:
        shown = prop.fits[:max(top, len(prop.top))] if top else prop.fits
        lines.append(f"{len(prop.fits)} of {len(prop.fits) + len(prop.rejected)} layouts fit; the {len(prop.top)} "
                     f"within {prop.TOP_BAND:.0%} of the fastest are the top choices (*):")
        lines.append("  rank  TP  PP    DP  ZeRO  micro  AC    step s    MFU  bubble  memory GiB")
        in_top = {id(f) for f in prop.top}
        for i, (lay, tm, mem) in enumerate(shown, 1):
            lines.append(f"{'*' if id(prop.fits[i - 1]) in in_top else ' '} {i:>4} {lay.tp:>3} {lay.pp:>3} {lay.dp:>5} "
                         f"{lay.zero:>5} {lay.micro:>6}  {'on ' if lay.ac else 'off'} {tm['step_s']:>9.3f} "
                         f"{tm['mfu']:>6.1%} {tm['bubble']:>7.1%} {mem['total'] / GiB:>11.1f}")
        if len(shown) < len(prop.fits):
            lines.append(f"  ... {len(prop.fits) - len(shown)} slower layouts fit as well")
    lines += ["", "rejected, by TP x PP x DP (fitting shapes: the variants that do not fit):"]
    fitting_shapes = {f[0].shape for f in prop.fits}
    by_shape: dict[tuple, list[tuple[Layout, str]]] = {}
    for lay, why in prop.rejected:
        by_shape.setdefault(lay.shape, []).append((lay, why))
    for shape in sorted(by_shape):
        items = by_shape[shape]
        reasons: dict[str, int] = {}
        for _, why in items:
            key = "over memory" if why.startswith("needs ") else why
            reasons[key] = reasons.get(key, 0) + 1
        tp, pp, dp = shape
        if shape in fitting_shapes:
            lines.append(f"  TP {tp} x PP {pp} x DP {dp}: {len(items)} variants rejected: "
                         + "; ".join(f"{n} {k}" for k, n in reasons.items()))
        else:
            least = min((x for x in items if x[1].startswith("needs ")), default=None,
                        key=lambda x: float(x[1].split()[1]))
            why = least[1] + f" (the smallest, {least[0]})" if least else next(iter(reasons))
            lines.append(f"  TP {tp} x PP {pp} x DP {dp}: none fits: {why}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- --plan and the fit check


def layout_of(cfg: PretrainConfig, mcfg: ModelConfig, world: int) -> Layout:
    t, p = cfg.tensor_parallel, cfg.pipeline_stages
    return Layout(tp=t, pp=p, dp=max(1, world // (t * p)), zero=cfg.zero_stage, micro=cfg.micro_batch_size,
                  ac=mcfg.activation_checkpointing)


def estimate_memory(cfg: PretrainConfig, mcfg: ModelConfig, seq_len: int, world: int | None = None) -> dict[str, float]:
    """Bytes per worker for weights, gradients, optimizer state and activations of the configured
    layout (the module docstring's model; bf16 on GPUs, fp32 on CPU)."""
    world = world or cfg.worker_range[1]
    mem = memory(mcfg, layout_of(cfg, mcfg, world), seq_len, cfg.global_batch_size,
                 precision=BF16 if cfg.use_gpu else FP32, offload_optimizer=cfg.offload_optimizer,
                 overhead=load_assumptions().overhead_bytes if cfg.use_gpu else 0.0)
    return {k: mem[k] for k in ("weights", "gradients", "optimizer")} | {
        "activations": mem["activations"] + mem["zero3_buffers"], "overhead": mem["overhead"], "total": mem["total"]}


def worker_memory_bytes(cfg: PretrainConfig) -> float:
    if cfg.worker_memory_gib:
        return cfg.worker_memory_gib * 2**30
    if cfg.use_gpu:
        return 80 * 2**30
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / cfg.worker_range[1]


def plan(cfg: PretrainConfig, mcfg: ModelConfig, seq_len: int, mfu: float = 0.4, gpu: str = "H100") -> dict:
    """The planner's numbers: size, FLOPs, memory per worker, compute-optimal tokens and time."""
    n = mcfg.num_params()
    world = cfg.worker_range[1]
    mem = estimate_memory(cfg, mcfg, seq_len)
    tokens = 20 * n  # Chinchilla (Hoffmann et al. 2022): about 20 tokens per parameter
    fpt = mcfg.flops_per_token(seq_len)
    peak = PEAK_BF16_FLOPS[gpu] if gpu in PEAK_BF16_FLOPS else load_gpu(gpu).peak_flops
    return {
        "params": n, "flops_per_token": fpt, "memory_bytes": mem, "worker_memory_bytes": worker_memory_bytes(cfg),
        "compute_optimal_tokens": tokens, "gpu": gpu, "mfu": mfu, "workers": world,
        "layout": str(layout_of(cfg, mcfg, world)),
        "hours_at_mfu": tokens * fpt / (world * peak * mfu) / 3600,
    }


def format_plan(p: dict) -> str:
    gib = 2**30
    m = p["memory_bytes"]
    lines = [
        f"parameters            {p['params'] / 1e9:10.3f} B",
        f"FLOPs per token       {p['flops_per_token'] / 1e9:10.3f} GFLOP (6N + 12*L*d*T)",
        f"layout                {p['layout']}",
        "memory per worker:",
        *[f"  {k:<19} {m[k] / gib:10.2f} GiB" for k in ("weights", "gradients", "optimizer", "activations", "overhead",
                                                          "total")],
        f"  available           {p['worker_memory_bytes'] / gib:10.2f} GiB",
        f"compute-optimal data  {p['compute_optimal_tokens'] / 1e9:10.1f} B tokens (20 per parameter)",
        f"time at {p['mfu']:.0%} MFU      {p['hours_at_mfu']:10.1f} h on {p['workers']} x {p['gpu']}",
    ]
    return "\n".join(lines)


def check_fits(cfg: PretrainConfig, mcfg: ModelConfig, seq_len: int) -> None:
    p = plan(cfg, mcfg, seq_len)
    if p["memory_bytes"]["total"] > p["worker_memory_bytes"]:
        raise MemoryError("the run does not fit in the workers' memory (raise zero_stage, tensor_parallel, "
                          "pipeline_stages or num_workers, enable activation checkpointing or lower "
                          "micro_batch_size):\n" + format_plan(p))

