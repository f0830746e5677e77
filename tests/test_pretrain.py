"""Pretraining: schedule, checkpoints, config validation, and prepare -> pretrain -> generate through Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from jobs.config import ConfigError, load_config
from jobs.generate import GenerateConfig, load_checkpoint
from jobs.generate import run as generate
from jobs.prepare import PrepareConfig, default_corpus
from jobs.prepare import run as prepare
from jobs.pretrain import PretrainConfig, latest_checkpoint, load_weights, lr_at
from jobs.pretrain import run as pretrain
from model import GPT, ModelConfig

TINY_MODEL = {"preset": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "max_seq_len": 64}


def test_lr_schedule_warmup_cosine_floor():
    cfg = PretrainConfig(data="d", output="o", lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)  # end of warm-up: the peak
    mid = 10 + (110 - 1 - 10) / 2
    assert lr_at(int(mid), cfg) == pytest.approx(0.55e-3, rel=0.02)  # half way down the cosine
    assert lr_at(109, cfg) == pytest.approx(1e-4)  # the end: 10 % of the peak
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(9, 109))


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_weights_round_trip_gives_identical_logits(tmp_path, tied):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY_MODEL, "vocab_size": 300, "tie_embeddings": tied})
    model = GPT(cfg).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if tied:
        sd.pop("lm_head.weight")  # as jobs.pretrain.full_state_dict writes it
    save_file(sd, str(tmp_path / "model.safetensors"))
    torch.manual_seed(1)
    again = load_weights(GPT(cfg), tmp_path / "model.safetensors").eval()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pretrain:\n  data: d\n  output: o\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="max_stepz: unknown key"):
        load_config(PretrainConfig, f)
    f.write_text("kind: pretrain\ndata: d\noutput: o\nlr: -1\n")
    with pytest.raises(ConfigError, match="lr:"):
        load_config(PretrainConfig, f)
    f.write_text("kind: pretrain\ndata: d\noutput: o\nmodel: {preset: tiny, n_headz: 2}\n")
    with pytest.raises(ConfigError, match="model.n_headz: unknown key"):
        load_config(PretrainConfig, f)
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config(PretrainConfig, None, {"data": "d", "output": "o", "global_batch_size": 10,
                                           "micro_batch_size": 4, "num_workers": 2})
    with pytest.raises(ConfigError, match="kind is 'prepare'"):
        f.write_text("kind: prepare\noutput: o\n")
        load_config(PretrainConfig, f)


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    plays = [p for p in default_corpus() if Path(p).stem in ("macbeth", "hamlet", "othello", "king-lear")]
    data = prepare(PrepareConfig(inputs=plays, output=str(root / "data"), format="markdown", markdown_split_level=3,
                                 vocab_size=512, seq_len=64, val_fraction=0.1, num_shards=2))
    summary = pretrain(PretrainConfig(
        data=str(root / "data"), output=str(root / "run"), model=ModelConfig(**TINY_MODEL), num_workers=2,
        global_batch_size=16, micro_batch_size=4, max_steps=40, lr=3e-3, warmup_steps=5, eval_every=20,
        eval_batches=2, checkpoint_every=20))
    return root, data, summary


@pytest.mark.slow
def test_prepare_pretrain_generate_end_to_end(tiny_run):
    root, data, summary = tiny_run
    assert data["splits"]["train"]["sequences"] > 100 and data["splits"]["val"]["sequences"] > 0
    for shard in data["splits"]["train"]["shards"]:
        assert (root / "data" / shard["file"]).is_file()
    # 2 workers trained, evaluated and checkpointed; the loss beat the unigram baseline
    assert summary["steps"] == 40
    assert summary["val_loss"] < data["unigram_val_loss"]
    history = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(history[0])
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    assert (root / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = latest_checkpoint(str(root / "run"))
    assert ckpt.endswith("checkpoint_0000040")
    state = json.loads((Path(ckpt) / "train_state.json").read_text())
    assert state["config"]["max_steps"] == 40 and state["tokenizer_sha256"] == data["tokenizer_sha256"]
    assert sorted(p.name for p in Path(ckpt).glob("rng-rank*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]
    # the checkpoint's weights reproduce the logged val loss
    model, tok, _ = load_checkpoint(ckpt)
    assert model.cfg.vocab_size == data["vocab_size"]

    samples = generate(GenerateConfig(run=str(root / "run"), prompts=["MACBETH:\n"], max_new_tokens=30, seed=1))
    again = generate(GenerateConfig(run=str(root / "run"), prompts=["MACBETH:\n"], max_new_tokens=30, seed=1))
    assert samples[0]["completion"] and samples == again
    assert math.isfinite(summary["val_loss"])
