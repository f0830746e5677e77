"""Rollouts: sampling completions of prompts with the KV cache, in the training workers
(colocated) or in a pool of Ray actors (split).

`sample` is what both placements run: prompts of any lengths share one left-padded batch
(model.gpt.generate_batch), and every completion comes back with the log-probabilities of its
tokens from a right-padded scoring pass, the values the trainer computes for the same tokens.

`RolloutPool` holds the split placement's actors. The trainer's rank 0 hands it the new actor
weights after every update (`load_weights`: one `ray.put` of the state dict, every actor reads the
same object) and the prompts of each iteration (`generate`: one contiguous share per actor). An
actor that died is replaced, given the newest weights, and the whole rollout is retried.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import torch

from model import GPT, ModelConfig
from model.gpt import generate_batch

ACTOR_PREFIX = "raylm-rl-rollout"
READY_TIMEOUT_S = 600


@dataclass
class Sampling:
    """How rollouts sample: the same for every placement."""

    max_new_tokens: int
    stop_ids: list[int]
    temperature: float
    top_k: int | None = None


@dataclass
class Rollouts:
    """Completions of a list of prompts: new token ids (ending with a stop id when the model
    stopped) and each token's log-probability under the policy that sampled it."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    seconds: float

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def sample(model: GPT, prompts: list[list[int]], s: Sampling, seed: int) -> Rollouts:
    """Sample one completion per prompt (repeat a prompt for several samples)."""
    t0 = time.perf_counter()
    gen = torch.Generator(device=model.tok_emb.weight.device).manual_seed(seed)
    tokens, logprobs = generate_batch(model, prompts, s.max_new_tokens, s.stop_ids, s.temperature, s.top_k,
                                      None, gen, logprobs=True)
    return Rollouts(tokens, logprobs, time.perf_counter() - t0)


class RolloutWorker:
    """A Ray actor holding a plain copy of the policy for generation (split placement)."""

    def __init__(self, model_config: dict, threads: int, use_gpu: bool = False):
        torch.set_num_threads(threads)
        device = "cuda" if use_gpu else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU
        self.model = GPT(ModelConfig.model_validate(model_config)).to(device).eval().requires_grad_(False)
        self.calls = 0

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        from jobs.checkpoint.load import load_into

        load_into(self.model, state_dict, source="actor weights")

    def generate(self, prompts: list[list[int]], s: Sampling, seed: int) -> Rollouts:
        self.calls += 1
        return sample(self.model, prompts, s, seed)

    def num_calls(self) -> int:
        return self.calls


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` contiguous shares of n items, sizes differing by at most one."""
    q, r = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + q + (i < r)
        bounds.append((start, end))
        start = end
    return bounds


class RolloutPool:
    """N rollout actors, kept at N: a dead one is replaced and the work it had is retried."""

    def __init__(self, n: int, model_config: dict, cpus: float, retries: int, use_gpu: bool = False):
        import ray

        self.model_config, self.cpus, self.retries, self.use_gpu = model_config, cpus, retries, use_gpu
        self.tag = uuid.uuid4().hex[:8]
        self.weights = None  # ObjectRef of the newest actor weights, for replacements
        self.actor_cls = ray.remote(RolloutWorker)
        self.actors = [self._new_actor(i) for i in range(n)]
        self.retried = 0  # rollouts and weight syncs retried over the pool's life
        self._wait_placed(READY_TIMEOUT_S)

    def _wait_placed(self, timeout: float) -> None:
        """Fail with the fields to change when the cluster cannot place the actors (rather than
        wait forever for CPUs the training workers hold)."""
        import ray

        try:
            ray.get([a.num_calls.remote() for a in self.actors], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            gpus = " and a GPU each (use_gpu)" if self.use_gpu else ""
            raise RuntimeError(f"rollout_workers: {len(self.actors)} rollout actors of rollout_cpus {self.cpus}{gpus} "
                               f"were not placed within {timeout:.0f} s; the cluster needs these besides the "
                               "training workers'") from None
        except ray.exceptions.RayActorError:
            pass  # one died already: the first weight sync replaces it

    def _new_actor(self, i: int):
        # Named, so that an operator (or a test) can find the pool: raylm-rl-rollout-<pool>-<i>-<n>.
        name = f"{ACTOR_PREFIX}-{self.tag}-{i}-{uuid.uuid4().hex[:4]}"
        options = {"num_cpus": self.cpus, "num_gpus": int(self.use_gpu), "name": name, "max_restarts": 0}
        return self.actor_cls.options(**options).remote(self.model_config, max(1, int(self.cpus)), self.use_gpu)

    def _replace_dead(self) -> int:
        """Replace every actor that does not answer; returns how many were replaced."""
        import ray

        replaced = 0
        for i, a in enumerate(self.actors):
            try:
                ray.get(a.num_calls.remote(), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001 (already gone)
                    pass
                self.actors[i] = self._new_actor(i)
                if self.weights is not None:
                    ray.get(self.actors[i].load_weights.remote(self.weights))
                replaced += 1
        return replaced

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> float:
        """Every actor loads `state_dict` (one object in the object store); returns the seconds taken."""
        import ray

        t0 = time.perf_counter()
        self.weights = ray.put(state_dict)
        for attempt in range(self.retries + 1):
            try:
                ray.get([a.load_weights.remote(self.weights) for a in self.actors])
                break
            except ray.exceptions.RayActorError:
                if attempt == self.retries:
                    raise
                self.retried += 1
                print(f"rollout: an actor died during the weight sync; replaced {self._replace_dead()}, "
                      "sync retried", flush=True)
        return time.perf_counter() - t0

    def generate(self, prompts: list[list[int]], s: Sampling, seed: int) -> Rollouts:
        """Completions of all prompts (actor k samples the k-th contiguous share with seed + k)."""
        import ray

        t0 = time.perf_counter()
        bounds = split_evenly(len(prompts), len(self.actors))
        for attempt in range(self.retries + 1):
            try:
                parts = ray.get([a.generate.remote(prompts[lo:hi], s, seed + k)
                                 for k, (a, (lo, hi)) in enumerate(zip(self.actors, bounds)) if hi > lo])
                break
            except ray.exceptions.RayActorError as e:
                if attempt == self.retries:
                    raise
                self.retried += 1
                replaced = self._replace_dead()
                print(f"rollout: retry {attempt + 1} of this iteration's rollout after a rollout actor died "
                      f"({type(e).__name__}); replaced {replaced} actor(s)", flush=True)
        tokens = [t for p in parts for t in p.tokens]
        logprobs = [lp for p in parts for lp in p.logprobs]
        return Rollouts(tokens, logprobs, time.perf_counter() - t0)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
