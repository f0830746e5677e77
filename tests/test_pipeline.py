"""Pipeline parallelism: 2 DeepSpeed pipeline stages on 2 Ray Train CPU workers against plain torch.

One Ray Train run (module fixture) trains two models through jobs.pipeline and writes what it saw;
the tests compare it with a single-process run of model.GPT on the same rows, optimizer and
schedule (AdamW, warm-up + cosine, gradient clipping at 1.0). Tolerance, fp32: |loss_pp - loss_ref|
<= 1e-5 * loss_ref per step and weights within 1e-5 absolute after the last step (observed: 1e-7;
the pipeline adds the tied embedding's two gradient parts across stages, a different float order
than one backward). Clipping by one stage's gradient norm instead of the global one moves the
weights by ~1e-3 within 3 steps, which these bounds catch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reference_training
from safetensors.torch import load_file

from jobs.checkpoint.load import load_into
from jobs.data.shards import ShardLoader
from jobs.train.config import PretrainConfig
from model import GPT, ModelConfig

SEQ = 32
VOCAB = 256
# llama with tied embeddings and activation checkpointing; gpt2 with learned positions, untied head.
MODELS = {
    "llama": ({"preset": "tiny", "vocab_size": VOCAB, "n_layers": 4, "d_model": 64, "n_heads": 4, "n_kv_heads": 2,
               "d_ff": 128, "max_seq_len": 64, "activation_checkpointing": True}, 5),
    "gpt2": ({"arch": "gpt2", "vocab_size": VOCAB, "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128,
              "max_seq_len": 64, "tie_embeddings": False}, 3),
}
CFG = {"data": "unused", "output": "unused", "num_workers": 2, "zero_stage": 0, "global_batch_size": 8,
       "micro_batch_size": 2, "max_steps": 20, "warmup_steps": 2, "lr": 3e-3, "grad_clip": 1.0, "seed": 7}


def write_shards(d: Path) -> dict:
    """Shards in jobs.prepare's layout (what ShardLoader reads): arithmetic progressions mod 32,
    random start and stride, so that a few steps lower the loss well below ln(VOCAB)."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 64), ("val", 16)):
        start, stride = rng.integers(0, 32, (n, 1)), rng.integers(1, 4, (n, 1))
        rows = (start + stride * np.arange(SEQ + 1)) % 32
        np.save(d / f"{split}-00000.npy", rows.astype(np.uint16))
        splits[split] = {"shards": [{"file": f"{split}-00000.npy", "sequences": n}]}
    return {"splits": splits}


def pp_worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist
    from safetensors.torch import save_file

    from jobs.train.pipeline import (TokenEmbedding, micro_batches, pipeline_engine, pipeline_eval_loss,
                                     pipeline_train_step, stage_state_dict)

    torch.set_num_threads(1)
    cfg = PretrainConfig.model_validate(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    out = Path(config["out"])
    train = ShardLoader(config["data"], config["manifest"], "train", cfg.seed)
    val = ShardLoader(config["data"], config["manifest"], "val", cfg.seed)
    for name, (model, steps) in MODELS.items():
        mcfg = ModelConfig(**model)
        engine = pipeline_engine(cfg.model_copy(update={"pipeline_stages": 2, "model": mcfg}), mcfg)
        losses = [pipeline_train_step(engine, micro_batches(engine, train, s, cfg.global_batch_size, cfg.micro_batch_size))
                  for s in range(steps)]
        val_loss = pipeline_eval_loss(engine, val, 2, cfg.global_batch_size, cfg.micro_batch_size)
        emb = [m.inner.weight.detach().clone() for m in engine.module.modules() if isinstance(m, TokenEmbedding)]
        local_keys = sorted(m.gpt_prefix for m in engine.module.modules() if getattr(m, "inner", None) is not None)
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, {"emb": emb, "keys": local_keys, "stage": engine.stage_id})
        sd = stage_state_dict(engine)
        if rank == 0:
            save_file(sd, str(out / f"{name}.safetensors"))
            (out / f"{name}.json").write_text(json.dumps({
                "losses": losses, "val_loss": val_loss,
                "stages": {r["stage"]: r["keys"] for r in seen},
                "tied_equal": mcfg.tie_embeddings and torch.equal(seen[0]["emb"][0], seen[1]["emb"][0]),
                "gas": engine.gradient_accumulation_steps(),
            }))


@pytest.fixture(scope="module")
def pp_run(ray_local, tmp_path_factory):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray import cloudpickle

    # Workers cannot import this file as a module (tests/ is not a package): ship pp_worker by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    d = tmp_path_factory.mktemp("pp")
    manifest = write_shards(d)
    TorchTrainer(
        pp_worker,
        train_loop_config={"cfg": CFG, "data": str(d), "manifest": manifest, "out": str(d)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="pp", storage_path=str(d / "ray"),
                                       worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}),
    ).fit()
    return d, manifest


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_pipeline_tracks_single_process_run(pp_run, name):
    d, manifest = pp_run
    model, steps = MODELS[name]
    mcfg = ModelConfig(**model)
    got = json.loads((d / f"{name}.json").read_text())
    assert got["gas"] == 4  # global batch 8 = micro 2 * 4 micro-batches * 1 pipeline
    ref_model, ref, _ = reference_training(PretrainConfig(**CFG), mcfg, ShardLoader(d, manifest, "train", CFG["seed"]),
                                           steps)
    assert ref[-1] < ref[0] - 0.05  # it learns: the comparison is not between two idle runs
    for step, (a, b) in enumerate(zip(got["losses"], ref, strict=True)):
        assert abs(a - b) <= 1e-5 * b, f"step {step + 1}: pipeline {a} vs single process {b}"
    from safetensors.torch import load_file

    sd = load_file(str(d / f"{name}.safetensors"))
    ref_sd = {k: v for k, v in ref_model.state_dict().items() if not (mcfg.tie_embeddings and k == "lm_head.weight")}
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], ref_sd[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_stages_split_the_blocks_and_keep_tied_copies_equal(pp_run):
    d, _ = pp_run
    got = json.loads((d / "llama.json").read_text())
    assert got["stages"] == {
        "0": ["blocks.0.", "blocks.1.", "tok_emb."],
        "1": ["blocks.2.", "blocks.3.", "norm.", "tok_emb."],  # the tied head's copy of the embedding
    }
    assert got["tied_equal"] is True  # after 5 optimizer steps, not only at initialisation
    gpt2 = json.loads((d / "gpt2.json").read_text())
    assert gpt2["stages"] == {"0": ["blocks.0.", "pos_emb.", "tok_emb."], "1": ["blocks.1.", "lm_head.", "norm."]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_consolidated_weights_reproduce_pipeline_eval_loss(pp_run, name):
    d, manifest = pp_run
    mcfg = ModelConfig(**MODELS[name][0])
    got = json.loads((d / f"{name}.json").read_text())
    model = load_into(GPT(mcfg), load_file(str(d / f"{name}.safetensors"))).eval()
    val = ShardLoader(d, manifest, "val", CFG["seed"])
    rows = val.rows(0, 2 * CFG["global_batch_size"], shuffle=False)  # the 2 eval batches
    with torch.no_grad():
        _, loss = model(rows[:, :-1], rows[:, 1:])
    assert float(loss) == pytest.approx(got["val_loss"], rel=1e-5)


@pytest.mark.parametrize("kwargs, field", [
    ({"zero_stage": 2}, "zero_stage"),
    ({"zero_stage": 3}, "zero_stage"),
    ({"n_layers": 1}, "model.n_layers"),  # fewer blocks than stages (5 on 2 stages is fine: 3 + 2)
    ({"num_workers": 3}, "num_workers"),
    ({"global_batch_size": 12, "micro_batch_size": 4, "num_workers": 4}, "global_batch_size"),
    ({"pipeline_stages": 0}, "pipeline_stages"),
])
def test_validate_rejects_invalid_combinations(kwargs, field):
    def config(pipeline_stages, zero_stage, n_layers, num_workers, global_batch_size, micro_batch_size):
        return PretrainConfig(data="d", output="o", model={"preset": "tiny", "n_layers": n_layers},
                              pipeline_stages=pipeline_stages, zero_stage=zero_stage, num_workers=num_workers,
                              global_batch_size=global_batch_size, micro_batch_size=micro_batch_size)

    ok = {"pipeline_stages": 2, "zero_stage": 1, "n_layers": 4, "num_workers": 2, "global_batch_size": 8,
          "micro_batch_size": 2}
    config(**ok)  # the valid baseline
    config(**{**ok, "n_layers": 5})  # uneven stages: DeepSpeed's balanced partition gives 3 + 2 blocks
    config(**{**ok, "pipeline_stages": 1, "zero_stage": 3})  # ZeRO-3 alone is fine
    config(**{**ok, "global_batch_size": 12, "micro_batch_size": 4, "num_workers": 6, "pipeline_stages": 2})
    with pytest.raises(ValueError, match=rf"{field}"):
        config(**{**ok, **kwargs})
