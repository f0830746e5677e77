"""jobs.checkpoint: the writer, the verifier, the one loader, and what it refuses.

A real DeepSpeed engine in this process (gloo, one rank) writes real checkpoints; the tests then
tear, corrupt, extend and poison them and check that every reader says which file is at fault,
that nothing from a rejected checkpoint is used, and that no planted pickle runs.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch

from jobs.checkpoint.layout import (DEEPSPEED, TRAIN_STATE, WEIGHTS, checkpoint_name, latest_checkpoint,
                                    manifest_file, verify_checkpoint)
from jobs.checkpoint.load import (CheckpointError, load_model, load_state_dict, resolve_source, restore_engine,
                                  set_rng_state, weights_only_loads)
from jobs.checkpoint.save import gather_weights, write_checkpoint
from jobs.train.config import PretrainConfig
from jobs.train.engine import build_engine
from model import GPT, ModelConfig
from model.tokenizer import train_tokenizer

MODEL = {"preset": "tiny", "n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64, "max_seq_len": 32}


@pytest.fixture(scope="module")
def dist_group():
    """A one-rank gloo process group in the test process, as Ray Train gives each worker."""
    import torch.distributed as dist

    mp = pytest.MonkeyPatch()
    for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        mp.setenv(k, v)  # what Ray Train's worker environment holds; DeepSpeed checks LOCAL_RANK
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    mp.undo()


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["To be, or not to be, that is the question.\n" * 20], vocab_size=300)


def make_engine(stage: int, tok):
    cfg = PretrainConfig(data="-", output="-", model=MODEL, num_workers=1, zero_stage=stage, global_batch_size=2,
                         micro_batch_size=2, max_steps=10, warmup_steps=1, lr=1e-2)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**MODEL, vocab_size=tok.get_vocab_size()))
    return build_engine(cfg, model, model.optim_groups(cfg.weight_decay), 1), model.cfg


def train(engine, steps: int, seed: int = 1) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, engine.module.cfg.vocab_size, (2, 17), generator=g)
        _, loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def save(engine, mcfg, tok, run: Path, step: int) -> Path:
    d = run / checkpoint_name(step)
    d.mkdir(parents=True)
    write_checkpoint(d, engine=engine, rank=0, world=1, step=step,
                     tensors={WEIGHTS: gather_weights(engine, mcfg.tie_embeddings)},
                     train_state={"kind": "pretrain", "model": mcfg.model_dump(mode="json")},
                     tokenizer_json=tok.to_str(), history=[{"step": step}])
    return d


@pytest.fixture(scope="module")
def run_dir(dist_group, tok, tmp_path_factory):
    """Two ZeRO-2 checkpoints (steps 2 and 4) of a real engine; the losses of steps 5-7 after the second."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    engine, mcfg = make_engine(2, tok)
    train(engine, 2)
    save(engine, mcfg, tok, run, 2)
    train(engine, 2, seed=2)
    save(engine, mcfg, tok, run, 4)
    after = train(engine, 3, seed=3)
    return run, mcfg, after


def copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def flip_byte(f: Path, at: int = -10) -> None:
    data = bytearray(f.read_bytes())
    data[at] ^= 0xFF
    f.write_bytes(bytes(data))


def test_round_trip_restores_weights_optimizer_and_rng(run_dir, tok, tmp_path):
    run, mcfg, after = run_dir
    assert verify_checkpoint(str(run / checkpoint_name(4))) is None
    assert latest_checkpoint(str(run)).endswith(checkpoint_name(4))
    # a fresh engine restored from step 4 takes exactly the same next steps as the original
    engine, _ = make_engine(2, tok)
    restore_engine(engine, run / checkpoint_name(4), world=1, scratch=tmp_path)
    assert train(engine, 3, seed=3) == after
    # RNG state is JSON and round-trips
    state = json.loads((run / checkpoint_name(4) / "rng-rank0.json").read_text())
    assert set(state) == {"python", "numpy", "torch"}
    torch.manual_seed(123)
    assert set_rng_state(run / checkpoint_name(4), 0)
    assert torch.get_rng_state().tolist() == state["torch"]
    # the inference loader gives the same model
    model, _, st = load_model(str(run))
    assert st["step"] == 4 and model.cfg == mcfg


@pytest.mark.parametrize("damage, reason", [
    ("flip weights", "checksum mismatch in model.safetensors"),
    ("flip deepspeed", "checksum mismatch in deepspeed/"),
    ("drop manifest", manifest_file(0)),
    ("extra file", "extra.bin is not listed"),
    ("escape", "is not inside the checkpoint"),
    ("missing file", "tokenizer.json is missing"),
])
def test_damaged_checkpoints_are_refused_naming_the_file(run_dir, tmp_path, damage, reason):
    run = copy(run_dir[0], tmp_path)
    ck = run / checkpoint_name(4)
    if damage == "flip weights":
        flip_byte(ck / WEIGHTS)
    elif damage == "flip deepspeed":
        flip_byte(sorted((ck / DEEPSPEED).rglob("*optim_states.pt"))[0])
    elif damage == "drop manifest":
        (ck / manifest_file(0)).unlink()
    elif damage == "extra file":
        (ck / "extra.bin").write_bytes(b"planted")
    elif damage == "escape":
        m = json.loads((ck / manifest_file(0)).read_text())
        m["files"]["../../../etc/passwd"] = "0" * 64
        (ck / manifest_file(0)).write_text(json.dumps(m))
    elif damage == "missing file":
        (ck / "tokenizer.json").unlink()
    assert reason in verify_checkpoint(str(ck))
    with pytest.raises(CheckpointError, match=reason.replace(".", r"\.")):
        load_model(str(ck))  # named explicitly: refused
    # the run directory falls back to the previous complete checkpoint
    assert latest_checkpoint(str(run)).endswith(checkpoint_name(2))
    assert load_model(str(run))[2]["step"] == 2


def test_no_complete_checkpoint_is_an_error_naming_each_reason(run_dir, tmp_path):
    run = copy(run_dir[0], tmp_path)
    for step in (2, 4):
        flip_byte(run / checkpoint_name(step) / WEIGHTS)
    with pytest.raises(FileNotFoundError, match="checkpoint_0000002: checksum mismatch in model.safetensors"):
        load_state_dict(str(run))


class Planted:
    """A pickle that, when unpickled, writes a marker file (stands for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(ck: Path, rel: str, payload: bytes) -> None:
    """Replace a file and fix up its manifest entry, as a tenant who owns the storage can."""
    (ck / rel).write_bytes(payload)
    m = json.loads((ck / manifest_file(0)).read_text())
    import hashlib

    m["files"][rel] = hashlib.sha256(payload).hexdigest()
    (ck / manifest_file(0)).write_text(json.dumps(m))


def test_planted_pickle_is_not_executed(run_dir, tok, tmp_path):
    run = copy(run_dir[0], tmp_path)
    ck = run / checkpoint_name(4)
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"optimizer_state_dict": Planted(marker)})
    optim = sorted((ck / DEEPSPEED).rglob("*optim_states.pt"))[0]
    plant(ck, str(optim.relative_to(ck)), payload)
    assert verify_checkpoint(str(ck)) is None  # the checksums match: only the loader can stop it
    engine, _ = make_engine(2, tok)
    with pytest.raises(pickle.UnpicklingError):
        restore_engine(engine, resolve_source(str(ck))[0], world=1, scratch=tmp_path)
    assert not marker.exists()
    # the same file through torch.load directly, as DeepSpeed calls it
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(optim, weights_only=False)
    assert not marker.exists()
    # an RNG file is JSON: a pickle there is not valid JSON and is not unpickled either
    plant(ck, "rng-rank0.json", payload)
    with pytest.raises(ValueError):
        set_rng_state(ck, 0)
    assert not marker.exists()


def test_train_state_must_be_ours(run_dir, tmp_path):
    run = copy(run_dir[0], tmp_path)
    ck = run / checkpoint_name(4)
    plant(ck, TRAIN_STATE, json.dumps({"world_size": 1}).encode())
    with pytest.raises(CheckpointError, match="train_state.json"):
        load_model(str(ck))


def job_runs(ck: str, tmp: Path) -> dict:
    """Each job that takes a checkpoint, as its `python -m jobs.<kind>` entry runs it."""
    from jobs import dpo, evaluate, export, generate, pretrain, reward, serve, sft

    data = str(tmp / "records.jsonl")
    return {
        "generate": lambda: generate.run(generate.GenerateConfig(checkpoint=ck)),
        "sft": lambda: sft.run(sft.SFTConfig(init_from=ck, data=data, output=str(tmp / "o"))),
        "dpo": lambda: dpo.run(dpo.DPOConfig(init_from=ck, data=data, output=str(tmp / "o"))),
        "reward": lambda: reward.run(reward.RewardConfig(init_from=ck, data=data, output=str(tmp / "o"))),
        "evaluate": lambda: evaluate.run(evaluate.EvaluateConfig(checkpoints=[ck], output=str(tmp / "o"))),
        "serve": lambda: serve.run(serve.ServeConfig(checkpoint=ck)),
        "export": lambda: export.run(export.ExportConfig(checkpoint=ck, output=str(tmp / "o"))),
        "pretrain": lambda: pretrain.run(pretrain.PretrainConfig(data=str(tmp), output=str(tmp / "o"), init_from=ck)),
    }


@pytest.mark.parametrize("kind", ["generate", "sft", "dpo", "reward", "evaluate", "serve", "export", "pretrain"])
def test_every_job_refuses_a_corrupt_checkpoint_before_using_it(run_dir, tmp_path, monkeypatch, kind):
    import safetensors.torch

    run = copy(run_dir[0], tmp_path)
    ck = run / checkpoint_name(4)
    flip_byte(ck / WEIGHTS)
    read = []
    real = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda f, *a, **k: read.append(str(f)) or real(f, *a, **k))
    with pytest.raises(CheckpointError, match=rf"{ck.name}: incomplete or corrupt checkpoint: checksum mismatch in "
                                              rf"model\.safetensors"):
        job_runs(str(ck), tmp_path)[kind]()
    assert not [f for f in read if str(ck) in f]  # no weights of the corrupt checkpoint were read


def test_a_torn_checkpoint_is_cleared_before_its_step_is_written_again(run_dir, tmp_path):
    from jobs.checkpoint.layout import remove_torn_checkpoint

    run = copy(run_dir[0], tmp_path)
    flip_byte(run / checkpoint_name(4) / WEIGHTS)
    assert not remove_torn_checkpoint(str(run), 2)  # complete: kept
    assert remove_torn_checkpoint(str(run), 4) and not (run / checkpoint_name(4)).exists()
    assert not remove_torn_checkpoint(str(run), 6)  # not there
    assert latest_checkpoint(str(run)).endswith(checkpoint_name(2))
