"""RL: GRPO with verifiable rewards and PPO (RLHF), the loop of every Ray Train worker.

One iteration, in the order the functions below appear:

* `rollout`: sample `samples_per_prompt` completions of this iteration's prompts, in this worker
  (colocated) or in the rollout pool (split; rank 0 drives it and scatters the results);
* `score`: each completion's reward, from the answer check (GRPO) or the reward model (PPO);
* `prepare`: the trainer's own log-probabilities of the sampled tokens (compared with the
  rollout's: the consistency check), the reference's, and the critic's values (PPO);
* `advantages`: group-relative (GRPO) or GAE over KL-penalised per-token rewards (PPO);
* `update`: `ppo_epochs` passes of clipped policy (and value) loss, token-level normalised;
* `sync`: the new actor weights to every rollout actor (split);
* `log`: one metrics record per iteration, and a checkpoint every `checkpoint_every`.

Completions are handled as "completion grids" (N, C): row i holds sample i's completion tokens,
right-padded, with a mask; the RL math in jobs.posttrain.losses works on these.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, model_validator

from jobs.checkpoint.layout import CRITIC
from jobs.checkpoint.load import load_model, read_train_state
from jobs.data.answers import is_correct
from jobs.data.chat import Message, chat_prompt_ids, read_records, special_ids
from jobs.posttrain.config import RLConfig
from jobs.posttrain.losses import (AdaptiveKLController, entropy_from_logits, gae, group_advantages, kl_estimate,
                                   kl_penalized_rewards, ppo_policy_loss, ppo_value_loss, token_logprobs, token_mean,
                                   whiten)
from jobs.posttrain.reward import RewardModel, load_reward_model, score_batch
from jobs.posttrain.rollout import RolloutPool, Sampling, sample
from jobs.posttrain.worker import PostTrainRun, epoch_permutation, save, start
from jobs.train.worker import all_reduce_sum, check_finite, finish_worker, is_due
from model.tokenizer import EOT, decode

# ----------------------------------------------------------------------------- prompts


class PromptItem(BaseModel):
    """One line of an RL prompt file (the shape of jobs.evaluate's generative items, plus `match`)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str | None = None
    messages: list[Message] | None = None
    answer: str | None = None
    match: Literal["exact", "number"] = "exact"

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError('needs exactly one of "prompt" (a string) or "messages" (a list)')
        return self

    def token_ids(self, tok) -> list[int]:
        """The chat-template prompt: a user turn (or the given messages), then <|assistant|>."""
        return chat_prompt_ids(tok, self.messages or [Message(role="user", content=self.prompt)])


def prompt_ids(items: list[PromptItem], tok, max_len: int) -> list[list[int]]:
    """Token ids of each prompt, the oldest tokens dropped to leave max_len."""
    return [it.token_ids(tok)[-max_len:] for it in items]


# ----------------------------------------------------------------------------- models


class ActorCritic(torch.nn.Module):
    """PPO's two trainable models in one module, so that one DeepSpeed engine (one optimizer, one
    checkpoint) holds both: the actor (a GPT) and the critic (a GPT body with a scalar head per
    token). The critic's learning rate is its own parameter groups'."""

    def __init__(self, actor, critic: RewardModel, critic_lr: float | None):
        super().__init__()
        self.actor, self.critic, self.critic_lr = actor, critic, critic_lr

    def optim_groups(self, weight_decay: float) -> list[dict]:
        critic = self.critic.optim_groups(weight_decay)
        if self.critic_lr is not None:
            critic = [{**g, "lr": self.critic_lr} for g in critic]
        return self.actor.optim_groups(weight_decay) + critic

    def forward(self, idx: torch.Tensor, mask: torch.Tensor):
        """(logits (B, T, V), values (B, T)) of right-padded rows."""
        values = self.critic.value_head(self.critic.hidden(idx)).squeeze(-1)
        return self.actor(idx, mask=mask), values


def actor_of(module):
    return module.actor if isinstance(module, ActorCritic) else module


@contextlib.contextmanager
def whole_actor(engine):
    """The actor with whole weights, for generating in a training worker. Under ZeRO-3 each
    worker holds a shard of every parameter: gather them for the duration (collective, so every
    worker enters; the same gather DeepSpeed's own forward does layer by layer, here at once,
    which needs room for one whole copy of the actor)."""
    actor = actor_of(engine.module)
    if engine.zero_optimization_stage() != 3:
        yield actor
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(actor.parameters()), modifier_rank=None):
        yield actor


def build_module(cfg: RLConfig, config: dict):
    """The trainable module: the actor (GRPO), or actor and critic (PPO)."""
    actor, _, _ = load_model(config["init_from"])
    if cfg.algorithm == "grpo":
        return actor
    if cfg.critic_init == "reward":
        critic, _ = load_reward_model(config["reward"])
    else:
        body, _, _ = load_model(config["init_from"])
        torch.manual_seed(cfg.seed)  # the same fresh head on every rank
        critic = RewardModel(body)
    return ActorCritic(actor, critic.train(), cfg.critic_lr)


def frozen(model):
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- state


@dataclass
class Samples:
    """This worker's rollouts of one iteration: `samples_per_prompt` consecutive samples per prompt."""

    items: list[PromptItem]  # one per sample
    prompts: list[list[int]]
    completions: list[list[int]]
    rollout_logprobs: list[list[float]]
    rewards: torch.Tensor | None = None  # (N,) sequence scores
    correct: torch.Tensor | None = None  # (N,) answer check, where answers exist
    grids: dict[str, torch.Tensor] = field(default_factory=dict)  # (N, C) completion grids

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class RL:
    """What the loop keeps across iterations besides the engine."""

    cfg: RLConfig
    run: PostTrainRun
    tok: object
    sampling: Sampling
    train_items: list[PromptItem]
    eval_items: list[PromptItem]
    max_prompt: int
    pad_id: int
    reference: torch.nn.Module | None
    reward_model: RewardModel | None
    kl: AdaptiveKLController | None
    kl_coef: float
    pool: RolloutPool | None = None
    stats: dict = field(default_factory=dict)  # this iteration's metrics so far


# ----------------------------------------------------------------------------- rollout


def iteration_prompts(rl: RL, it: int) -> list[PromptItem]:
    """The iteration's prompts: a slice of a seeded permutation per epoch, the same on every
    worker and on a resumed run."""
    n, P = len(rl.train_items), rl.cfg.prompts_per_iteration
    out = []
    for g in range(it * P, (it + 1) * P):
        epoch, pos = divmod(g, n)
        out.append(rl.train_items[int(epoch_permutation(n, rl.cfg.seed, epoch)[pos])])
    return out


def rollout_seed(cfg: RLConfig, it: int, part: int) -> int:
    return (cfg.seed * 1_000_003 + it) * 1009 + part


def rollout(rl: RL, it: int) -> Samples:
    """This worker's share of the iteration's prompts, each sampled `samples_per_prompt` times."""
    cfg, w = rl.cfg, rl.run.w
    G = cfg.samples_per_prompt
    items = [x for x in iteration_prompts(rl, it) for _ in range(G)]
    ids = prompt_ids(items, rl.tok, rl.max_prompt)
    share = len(items) // w.world
    lo, hi = w.rank * share, (w.rank + 1) * share
    retries = 0
    t0 = time.perf_counter()
    if cfg.rollout_workers == 0:  # colocated: generate with this worker's own copy of the actor
        with whole_actor(rl.run.engine) as actor:
            r = sample(actor, ids[lo:hi], rl.sampling, rollout_seed(cfg, it, w.rank))
        tokens, logprobs = r.tokens, r.logprobs
    else:  # split: rank 0 drives the pool, every worker receives its share
        box = [None]
        if w.rank == 0:
            box = [rl.pool.generate(ids, rl.sampling, rollout_seed(cfg, it, 0))]
            retries = rl.pool.retried
        dist.broadcast_object_list(box, src=0)
        r = box[0]
        tokens, logprobs = r.tokens[lo:hi], r.logprobs[lo:hi]
    seconds = time.perf_counter() - t0
    n_tokens, longest = all_reduce_sum([float(sum(len(t) for t in tokens)), seconds])[0], max_over_ranks(seconds)
    rl.stats.update({"rollout_s": longest, "rollout_tokens_per_s": n_tokens / max(longest, 1e-9),
                     "rollout_retries": retries, "response_length": n_tokens / (len(items))})
    return Samples(items[lo:hi], ids[lo:hi], tokens, logprobs)


def max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])


# ----------------------------------------------------------------------------- score


def answer_text(tok, completion: list[int], stop_ids: list[int]) -> str:
    return decode(tok, completion[:-1] if completion and completion[-1] in stop_ids else completion)


def check_answers(rl: RL, items: list[PromptItem], completions: list[list[int]]) -> torch.Tensor:
    """1.0 where the completion's answer passes its item's check, 0.0 elsewhere (NaN: no answer)."""
    return torch.tensor([float(is_correct(answer_text(rl.tok, c, rl.sampling.stop_ids), it.answer, it.match))
                         if it.answer is not None else float("nan") for it, c in zip(items, completions)])


@torch.no_grad()
def score(rl: RL, s: Samples) -> None:
    """Sequence rewards: the answer check (GRPO) or the reward model's score (PPO)."""
    s.correct = check_answers(rl, s.items, s.completions)
    if rl.cfg.algorithm == "grpo":
        s.rewards = s.correct.nan_to_num(0.0)
        return
    rows = [p + c for p, c in zip(s.prompts, s.completions)]
    mb = rl.cfg.micro_batch_size
    s.rewards = torch.cat([score_batch(rl.reward_model, rows[i : i + mb], rl.pad_id, rl.run.w.device).float().cpu()
                           for i in range(0, len(rows), mb)])


# ----------------------------------------------------------------------------- trainer-side log-probs


def right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx (B, T), real (B, T)) of right-padded rows."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    real = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r)
        real[i, : len(r)] = True
    return idx.to(device), real.to(device)


def completion_index(prompts: list[list[int]], completions: list[list[int]], C: int, device):
    """(positions (B, C), tokens (B, C), mask (B, C)): where each completion token's logit sits in
    the full row (the position before it), the token, and which of the C slots are real."""
    pos = torch.zeros(len(prompts), C, dtype=torch.long)
    tok = torch.zeros(len(prompts), C, dtype=torch.long)
    mask = torch.zeros(len(prompts), C)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(c)
        pos[i, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        tok[i, :n] = torch.tensor(c)
        mask[i, :n] = 1.0
    return pos.to(device), tok.to(device), mask.to(device)


def at_completion(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) at the completion positions pos (B, C) -> (B, C, ...)."""
    index = pos.view(*pos.shape, *([1] * (x.dim() - 2))).expand(*pos.shape, *x.shape[2:])
    return x.gather(1, index)


def forward_tokens(model, prompts, completions, C: int, rl: RL, values: bool):
    """(log-probs (B, C), entropy (B, C), values (B, C) or None, mask (B, C)) of completions under
    `model` (the engine, a frozen reference), from one right-padded pass."""
    device = rl.run.w.device
    idx, real = right_pad([p + c for p, c in zip(prompts, completions)], rl.pad_id, device)
    pos, tok, mask = completion_index(prompts, completions, C, device)
    out = model(idx, mask=real)
    logits, v = out if values else (out, None)
    logits = at_completion(logits, pos)  # (B, C, V)
    lp = token_logprobs(logits, tok, rl.cfg.temperature)
    ent = entropy_from_logits(logits.float() / rl.cfg.temperature)
    return lp, ent, (at_completion(v.float(), pos) if v is not None else None), mask


@torch.no_grad()
def prepare(rl: RL, s: Samples) -> None:
    """The grids every update needs: old log-probs (the trainer's, before any update), the
    reference's, the old values (PPO), the rollout's log-probs, and the mask."""
    cfg, engine = rl.cfg, rl.run.engine
    C = max(len(c) for c in s.completions)
    mb = cfg.micro_batch_size
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("old_lp", "entropy", "values", "mask", "ref_lp")}
    engine.eval()
    for i in range(0, len(s), mb):
        p, c = s.prompts[i : i + mb], s.completions[i : i + mb]
        lp, ent, v, mask = forward_tokens(engine, p, c, C, rl, values=cfg.algorithm == "ppo")
        parts["old_lp"].append(lp)
        parts["entropy"].append(ent)
        parts["mask"].append(mask)
        if v is not None:
            parts["values"].append(v)
        if rl.reference is not None:
            parts["ref_lp"].append(forward_tokens(rl.reference, p, c, C, rl, values=False)[0])
    engine.train()
    g = {k: torch.cat(v) for k, v in parts.items() if v}
    roll = torch.zeros_like(g["old_lp"])
    for i, lps in enumerate(s.rollout_logprobs):
        roll[i, : len(lps)] = torch.tensor(lps, dtype=roll.dtype)
    g["rollout_lp"] = roll
    s.grids = g
    mask = g["mask"]
    diff = (g["old_lp"] - roll).abs() * mask
    n_tokens, diff_sum, ent_sum = all_reduce_sum([float(mask.sum()), float(diff.sum()),
                                                  float((g["entropy"] * mask).sum())])
    rl.stats.update({"logprob_diff_max": max_over_ranks(float(diff.max())),
                     "logprob_diff_mean": diff_sum / max(n_tokens, 1), "entropy": ent_sum / max(n_tokens, 1)})
    if "ref_lp" in g:
        kl_seq = ((g["old_lp"] - g["ref_lp"]) * mask).sum(-1)  # k1 per sequence
        kl_sum, n = all_reduce_sum([float(kl_seq.sum()), float(len(s))])
        rl.stats["kl"] = kl_sum / n


# ----------------------------------------------------------------------------- advantages


@torch.no_grad()
def advantages(rl: RL, s: Samples) -> None:
    """Per-token advantages (and PPO's value targets) on the completion grid."""
    cfg, g = rl.cfg, s.grids
    mask = g["mask"]
    if cfg.algorithm == "grpo":
        adv = group_advantages(s.rewards.view(-1, cfg.samples_per_prompt), cfg.scale_by_std).reshape(-1)
        g["adv"] = adv.to(mask)[:, None] * mask
        return
    rewards, _ = kl_penalized_rewards(s.rewards.to(mask), g["old_lp"], g["ref_lp"], mask, rl.kl_coef)
    adv, returns = gae(rewards, g["values"], mask, cfg.gamma, cfg.lam)
    g["adv"], g["returns"] = whiten(adv, mask), returns


# ----------------------------------------------------------------------------- update


def minibatch_loss(rl: RL, s: Samples, rows: list[int], num_tokens: float) -> tuple[torch.Tensor, dict]:
    """The loss of some of this worker's samples, normalised by the optimizer step's token count."""
    cfg = rl.cfg
    g = {k: v[rows] for k, v in s.grids.items()}
    C = int(g["mask"].sum(-1).max())
    g = {k: v[:, :C] for k, v in g.items()}
    lp, ent, values, mask = forward_tokens(rl.run.engine, [s.prompts[i] for i in rows],
                                           [s.completions[i] for i in rows], C, rl, values=cfg.algorithm == "ppo")
    pg, clipped = ppo_policy_loss(lp, g["old_lp"], g["adv"], cfg.clip_eps)
    per_token = pg - cfg.entropy_coef * ent
    stats = {"policy_loss": float((pg.detach() * mask).sum()), "clipped": float((clipped * mask).sum())}
    if cfg.algorithm == "grpo" and cfg.kl_coef > 0:
        per_token = per_token + cfg.kl_coef * kl_estimate(lp, g["ref_lp"], "k3")
    if values is not None:
        vl, _ = ppo_value_loss(values, g["values"], g["returns"], cfg.value_clip_eps)
        per_token = per_token + cfg.vf_coef * vl
        stats["value_loss"] = float((vl.detach() * mask).sum())
    return token_mean(per_token, mask, num_tokens), stats


def update(rl: RL, s: Samples, it: int) -> None:
    """`ppo_epochs` passes over this worker's samples, `rollout_size / global_batch_size`
    optimizer steps each. Every token of an optimizer step's batch (across workers) weighs the same."""
    cfg, w, engine = rl.cfg, rl.run.w, rl.run.engine
    per_step = cfg.global_batch_size // w.world
    steps = len(s) // per_step
    gas = cfg.grad_accum_for(w.world)
    lengths = s.grids["mask"].sum(-1)
    sums = {"policy_loss": 0.0, "clipped": 0.0, "value_loss": 0.0, "tokens": 0.0, "train_tokens": 0.0}
    t0 = time.perf_counter()
    for epoch in range(cfg.ppo_epochs):
        order = np.random.default_rng([cfg.seed, it, epoch, w.rank]).permutation(len(s)).tolist()
        batches = [order[k * per_step : (k + 1) * per_step] for k in range(steps)]
        totals = all_reduce_sum([float(lengths[b].sum()) for b in batches])  # tokens per optimizer step
        for b, total in zip(batches, totals):
            for m in range(gas):
                rows = b[m * cfg.micro_batch_size : (m + 1) * cfg.micro_batch_size]
                # DeepSpeed averages gradients over workers and accumulation steps: undo both so
                # that the step's gradient is that of its tokens' sum / their count.
                loss, st = minibatch_loss(rl, s, rows, total / (w.world * gas))
                engine.backward(loss)
                engine.step()
                for k, v in st.items():
                    sums[k] += v
                sums["tokens"] += float(lengths[rows].sum())
                sums["train_tokens"] += sum(len(s.prompts[i]) + len(s.completions[i]) for i in rows)
    seconds = max_over_ranks(time.perf_counter() - t0)
    keys = list(sums)
    red = dict(zip(keys, all_reduce_sum([sums[k] for k in keys])))
    rl.stats.update({"policy_loss": red["policy_loss"] / red["tokens"], "clip_fraction": red["clipped"] / red["tokens"],
                     "update_s": seconds, "train_tokens_per_s": red["train_tokens"] / max(seconds, 1e-9),
                     "lr": engine.get_lr()[0], "grad_norm": float(engine.get_global_grad_norm() or 0.0)})
    if cfg.algorithm == "ppo":
        rl.stats["value_loss"] = red["value_loss"] / red["tokens"]
    check_finite(rl.stats["policy_loss"], it + 1)


# ----------------------------------------------------------------------------- sync


def actor_weights(rl: RL) -> dict[str, torch.Tensor] | None:
    """The actor's whole fp32 weights on rank 0 (None elsewhere), in model.GPT's key names."""
    from jobs.checkpoint.save import gather_weights

    sd = gather_weights(rl.run.engine, tied=False)
    if sd is None:
        return None
    prefix = "actor." if rl.cfg.algorithm == "ppo" else ""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def sync(rl: RL) -> None:
    """Split placement: the new actor weights to every rollout actor, through the object store.
    Colocated, the workers generate with the weights they train: nothing to send."""
    if rl.cfg.rollout_workers == 0:
        rl.stats["sync_s"] = 0.0
        return
    t0 = time.perf_counter()
    sd = actor_weights(rl)
    if rl.run.w.rank == 0:
        rl.pool.load_weights(sd)
    rl.stats["sync_s"] = max_over_ranks(time.perf_counter() - t0)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(rl: RL) -> dict:
    """Greedy accuracy on the held-out prompts (each worker takes every world-th item), and with
    PPO the reward model's mean score of those answers (each closed with <|end|>)."""
    from jobs.infer.generate import complete_batch

    w = rl.run.w
    mine = rl.eval_items[w.rank :: w.world]
    correct = score_sum = 0.0
    with whole_actor(rl.run.engine) as model:  # once for all batches: workers may have unequal shares
        for i in range(0, len(mine), 64):
            batch = mine[i : i + 64]
            ids = prompt_ids(batch, rl.tok, rl.max_prompt)
            outs = complete_batch(model, ids, rl.cfg.max_new_tokens, rl.sampling.stop_ids)
            correct += sum(is_correct(decode(rl.tok, o), it.answer, it.match) for it, o in zip(batch, outs))
            if rl.reward_model is not None:  # the same prompts every time: no prompt-to-prompt noise
                rows = [p + o + [rl.sampling.stop_ids[0]] for p, o in zip(ids, outs)]
                score_sum += float(score_batch(rl.reward_model, rows, rl.pad_id, w.device).sum())
    rl.run.engine.train()
    c, s, n = all_reduce_sum([correct, score_sum, float(len(mine))])
    return {"eval_accuracy": c / n, "eval_correct": int(c), "eval_items": int(n),
            **({"eval_reward": s / n} if rl.reward_model is not None else {})}


# ----------------------------------------------------------------------------- log


def log(rl: RL, rec: dict) -> None:
    """Record an iteration: print it, checkpoint every `checkpoint_every` (and at the end)."""
    import json

    import ray.train

    run = rl.run
    run.w.history.append(rec)
    if run.w.rank == 0:
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
    run.extra_state["rl"] = {"kl_coef": rl.kl_coef}
    if is_due(rec["step"], rl.cfg.checkpoint_every, rl.cfg.max_steps):
        save(run, rec)
    elif any(k.startswith("eval_") for k in rec):
        ray.train.report(rec)


def iteration(rl: RL, it: int) -> dict:
    """One RL iteration; returns its metrics record (step = iterations done)."""
    t0 = time.perf_counter()
    rl.stats = {}
    s = rollout(rl, it)
    score(rl, s)
    prepare(rl, s)
    advantages(rl, s)
    update(rl, s, it)
    sync(rl)
    reward_sum, correct, answered, n = all_reduce_sum([float(s.rewards.sum()), float(s.correct.nan_to_num(0).sum()),
                                                      float((~s.correct.isnan()).sum()), float(len(s))])
    rec = {"step": it + 1, "reward_mean": reward_sum / n, **({"accuracy": correct / answered} if answered else {}),
           **rl.stats}
    if rl.kl is not None and "kl" in rec:
        rl.kl_coef = rl.kl.update(rec["kl"], rl.cfg.rollout_size)
    if rl.cfg.algorithm == "ppo" or rl.cfg.kl_coef > 0:
        rec["kl_coef"] = rl.kl_coef
    rec["iteration_s"] = time.perf_counter() - t0
    return rec


def setup(config: dict) -> RL:
    """Everything a worker needs before the first iteration: engine (resumed), frozen models, prompts, pool."""
    from model.tokenizer import load_tokenizer

    cfg = RLConfig.model_validate(config["cfg"])
    tok = load_tokenizer(config["tokenizer_json"])
    sp = special_ids(tok)
    module = build_module(cfg, config)
    engine_cfg = cfg.model_copy(update={"max_steps": cfg.max_steps * cfg.ppo_epochs * cfg.rollout_size
                                        // cfg.global_batch_size})
    run = start(cfg, config, module, prefix="actor." if cfg.algorithm == "ppo" else "", engine_cfg=engine_cfg)
    run.rest_file = CRITIC
    run.engine.train()
    w = run.w
    reference = None
    if cfg.kl_coef > 0 or cfg.algorithm == "ppo":
        reference = frozen(load_model(config["reference"], str(w.device))[0])
    reward_model = frozen(load_reward_model(config["reward"], str(w.device))[0]) if cfg.algorithm == "ppo" else None
    kl_coef = cfg.kl_coef
    if w.resume_dir is not None:  # the adaptive coefficient where the checkpoint left it
        kl_coef = read_train_state(w.resume_dir).get("rl", {}).get("kl_coef", kl_coef)
    kl = AdaptiveKLController(kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target and cfg.algorithm == "ppo" \
        else None
    max_len = cfg.max_seq_len or config["model"]["max_seq_len"]
    rl = RL(cfg=cfg, run=run, tok=tok,
            sampling=Sampling(cfg.max_new_tokens, [sp["end"], tok.token_to_id(EOT)], cfg.temperature, cfg.top_k),
            train_items=read_records(cfg.data, PromptItem),
            eval_items=read_records(cfg.eval_file, PromptItem) if cfg.eval_file else [],
            max_prompt=max_len - cfg.max_new_tokens, pad_id=sp["pad"], reference=reference,
            reward_model=reward_model, kl=kl, kl_coef=kl_coef)
    if cfg.rollout_workers:  # only rank 0 talks to the actors
        if w.rank == 0:
            rl.pool = RolloutPool(cfg.rollout_workers, config["model"], cfg.rollout_cpus, cfg.rollout_retries,
                                  cfg.use_gpu)
        sd = actor_weights(rl)
        if w.rank == 0:
            print(f"rollout pool: {cfg.rollout_workers} actors, first weight sync {rl.pool.load_weights(sd):.3f} s",
                  flush=True)
    return rl


def train_loop_per_worker(config: dict) -> None:
    rl = setup(config)
    cfg, w = rl.cfg, rl.run.w
    if rl.eval_items and w.step == 0:
        rec = {"step": 0, **evaluate(rl)}  # the starting policy, for before/after
        w.history.append(rec)
        if w.rank == 0:
            print(rec, flush=True)
    while w.step < cfg.max_steps:
        rec = iteration(rl, w.step)
        w.step += 1
        if rl.eval_items and is_due(w.step, cfg.eval_every, cfg.max_steps):
            rec.update(evaluate(rl))
        log(rl, rec)
    if rl.pool is not None:
        rl.pool.shutdown()
    finish_worker(w)

