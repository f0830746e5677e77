"""Shared fixtures: one local Ray per test session (4 logical CPUs on a 2-core machine)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # Ray gives its raylet a fixed 30 s to register; on a saturated 2-core machine that can pass.
    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}})
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process models this small run fastest on one thread (2 cores, shared with Ray workers)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The post-training tests (test_sft, test_dpo, test_reward, test_evaluate, test_serve) share one
# tiny base model: prepare -> 30-step pretrain -> demo task files, built once per session.
POSTTRAIN_PLAYS = ("macbeth", "hamlet", "othello", "king-lear", "the-tempest", "twelfth-night")
POSTTRAIN_MODEL = {"preset": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
                   "max_seq_len": 128}


@pytest.fixture(scope="session")
def tiny_chat_base(ray_local, tmp_path_factory):
    """(root, base checkpoint dir, prepare manifest): a 30-step base model and the tasks of jobs.tasks under root/tasks."""
    from pathlib import Path

    from jobs.data.inputs import default_corpus
    from jobs.prepare import PrepareConfig
    from jobs.prepare import run as prepare
    from jobs.pretrain import PretrainConfig
    from jobs.pretrain import run as pretrain
    from jobs.tasks import TasksConfig
    from jobs.tasks import run as build_tasks
    from model import ModelConfig

    root = tmp_path_factory.mktemp("posttrain")
    plays = [p for p in default_corpus() if Path(p).stem in POSTTRAIN_PLAYS]
    manifest = prepare(PrepareConfig(inputs=plays, output=str(root / "data"), format="markdown",
                                     markdown_split_level=3, vocab_size=512, seq_len=64, val_fraction=0.15,
                                     num_shards=2))
    summary = pretrain(PretrainConfig(
        data=str(root / "data"), output=str(root / "base"), model=ModelConfig(**POSTTRAIN_MODEL), num_workers=1,
        zero_stage=0, global_batch_size=16, micro_batch_size=16, max_steps=30, lr=3e-3, warmup_steps=5,
        eval_every=30, eval_batches=1, checkpoint_every=30))
    build_tasks(TasksConfig(data=str(root / "data"), output=str(root / "tasks"), train_items_per_kind=150,
                            eval_items_per_kind=24, max_prompt_chars=200))
    return root, summary["checkpoint"], manifest


def scrambled(text: str, seed: int) -> str:
    """The same characters in another order: the length and letters of `text`, none of its words
    (a text too short to reorder gets letters appended, so the result always differs)."""
    import random

    rng = random.Random(seed)
    for _ in range(10):
        chars = list(text)
        rng.shuffle(chars)
        if "".join(chars) != text:
            return "".join(chars)
    return text + " xq"


def fluent_or_scrambled(next_line_file, n: int) -> list[dict]:
    """A case any trained language model gets right: jobs.tasks' next_line items with the true
    line against three scrambles of it (each choice has the same characters)."""
    import json

    items = [json.loads(x) for x in open(next_line_file).read().splitlines()[:n]]
    out = []
    for i, it in enumerate(items):
        true = it["choices"][it["answer"]]
        choices = [scrambled(true, 3 * i + k) for k in range(3)]
        choices.insert(i % 4, true)
        out.append({"prompt": it["prompt"], "choices": choices, "answer": i % 4})
    return out
