"""Pretraining: schedule, checkpoints, config validation, and prepare -> pretrain -> generate through Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import kill_worker_after, reference_training
from safetensors.torch import load_file
from safetensors.torch import save_file

from jobs.config import ConfigError, load_config
from jobs.checkpoint.layout import latest_checkpoint, verify_checkpoint
from jobs.checkpoint.load import load_into, load_model
from jobs.data.inputs import default_corpus
from jobs.generate import GenerateConfig
from jobs.generate import run as generate
from jobs.prepare import PrepareConfig
from jobs.prepare import run as prepare
from jobs.pretrain import PretrainConfig
from jobs.train.schedule import lr_at
from jobs.pretrain import run as pretrain
from model import GPT, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
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
        sd.pop("lm_head.weight")  # as jobs.checkpoint.save.gather_weights writes it
    save_file(sd, str(tmp_path / "model.safetensors"))
    torch.manual_seed(1)
    again = load_into(GPT(cfg), load_file(str(tmp_path / "model.safetensors"))).eval()
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
    assert sorted(p.name for p in Path(ckpt).glob("rng-rank*")) == ["rng-rank0.json", "rng-rank1.json"]
    # the checkpoint's weights reproduce the logged val loss: the loop's eval batches are the
    # first eval_batches * global_batch_size val rows in file order
    from jobs.data.shards import ShardLoader

    model, tok, _ = load_model(ckpt)
    assert model.cfg.vocab_size == data["vocab_size"]
    rows = ShardLoader(root / "data", data, "val", seed=0).rows(0, 2 * 16, shuffle=False)
    with torch.no_grad():
        _, loss = model.eval()(rows[:, :-1], rows[:, 1:])
    assert loss.item() == pytest.approx(history[-1]["val_loss"], rel=1e-5)
    # the live engine ran the configured layout: 2 data-parallel ZeRO-3 workers, 2 micro-batches each
    start = json.loads((root / "run" / "events.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["step"] == 0 and start["resumed_from"] is None
    assert start["engine"] == {"zero_stage": 3, "data_parallel_size": 2, "tensor_parallel_size": 1,
                               "gradient_accumulation_steps": 2, "micro_batch_size": 4, "bf16": False}

    samples = generate(GenerateConfig(run=str(root / "run"), prompts=["MACBETH:\n"], max_new_tokens=30, seed=1))
    again = generate(GenerateConfig(run=str(root / "run"), prompts=["MACBETH:\n"], max_new_tokens=30, seed=1))
    assert samples[0]["completion"] and samples == again
    assert math.isfinite(summary["val_loss"])


# ----------------------------------------------------------------------------- planner and validation


def test_planner_matches_the_zero_paper():
    """Rajbhandari et al. 2020, figure 1: a 7.5 B model with mixed-precision Adam on 64 GPUs needs
    120 GB per GPU without ZeRO, 31.4 GB with optimizer sharding, 16.6 GB adding gradients and
    1.9 GB adding parameters (activations excluded)."""
    from jobs.train.planner import estimate_memory

    mcfg = ModelConfig(vocab_size=0, n_layers=0, d_model=64, n_heads=1, max_seq_len=1)
    n = 7.5e9
    expected = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in expected.items():
        cfg = PretrainConfig(data="d", output="o", use_gpu=True, zero_stage=stage, num_workers=64,
                             global_batch_size=64, micro_batch_size=1, model=mcfg)
        m = estimate_memory(cfg, mcfg.model_copy(update={"n_layers": 0}), 1)
        scale = n / mcfg.num_params()  # the formula is linear in N; scale a tiny config up to 7.5 B
        static = (m["weights"] + m["gradients"] + m["optimizer"]) * scale / 1e9
        assert static == pytest.approx(gb, abs=0.05), stage


def test_plan_refuses_a_run_that_does_not_fit(tmp_path):
    from jobs.train.planner import check_fits, plan

    cfg = PretrainConfig(data="d", output="o", model=ModelConfig(preset="llama-7b"), use_gpu=True, zero_stage=0,
                         num_workers=1, global_batch_size=8, micro_batch_size=1)
    with pytest.raises(MemoryError, match="optimizer"):
        check_fits(cfg, cfg.model, 4096)
    sharded = cfg.model_copy(update={"zero_stage": 3, "num_workers": 8, "global_batch_size": 64})
    check_fits(sharded, sharded.model, 4096)
    p = plan(sharded, sharded.model, 4096, mfu=0.5)
    assert p["compute_optimal_tokens"] == 20 * sharded.model.num_params()
    assert p["hours_at_mfu"] == pytest.approx(p["compute_optimal_tokens"] * p["flops_per_token"] / (8 * 989e12 * 0.5) / 3600)


@pytest.mark.parametrize("overrides, field", [
    ({"pipeline_stages": 2, "zero_stage": 3}, "zero_stage"),
    ({"pipeline_stages": 2, "zero_stage": 1, "model": {"preset": "tiny", "n_layers": 1}}, "n_layers"),
    ({"pipeline_stages": 2, "zero_stage": 1, "num_workers": 3, "global_batch_size": 24}, "pipeline_stages"),
    ({"num_workers": [1, 3], "global_batch_size": 16, "micro_batch_size": 4}, r"global_batch_size \(16\).*4 \* 3"),
    ({"num_workers": [2, 1]}, "num_workers"),
    ({"offload_optimizer": True, "zero_stage": 2}, "offload_optimizer"),
    ({"warmup_steps": 10, "max_steps": 10}, "warmup_steps"),
])
def test_invalid_combinations_are_rejected_before_any_worker(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(PretrainConfig, None, {"data": "d", "output": "o", **overrides})


# ----------------------------------------------------------------------------- distributed runs


def single_process_losses(root: Path, steps: int, cfg: PretrainConfig | None = None) -> list[float]:
    """The same run in one plain-PyTorch process: same init, data order, optimizer and schedule."""
    from jobs.data.shards import ShardLoader, load_manifest

    state = json.loads((Path(latest_checkpoint(str(root / "run"))) / "train_state.json").read_text())
    cfg = cfg or PretrainConfig.model_validate(state["config"])
    loader = ShardLoader(root / "data", load_manifest(str(root / "data")), "train", cfg.seed)
    return reference_training(cfg, ModelConfig.model_validate(state["model"]), loader, steps)[1]


@pytest.mark.slow
def test_demo_config_runs_as_configured(tiny_run, tmp_path):
    """configs/demo.yaml's own pretrain section, shortened; the layout is read from the live engine."""
    root, data, _ = tiny_run
    cfg = load_config(PretrainConfig, ROOT / "configs" / "demo.yaml", {
        "data": str(root / "data"), "output": str(tmp_path / "demo"), "max_steps": 4, "warmup_steps": 1,
        "eval_every": 4, "checkpoint_every": 4})
    summary = pretrain(cfg)
    assert summary["steps"] == 4 and math.isfinite(summary["val_loss"])
    (start,) = starts(tmp_path / "demo")
    assert start["world_size"] == 2
    assert start["engine"] == {"zero_stage": 3, "data_parallel_size": 2, "tensor_parallel_size": 1,
                               "gradient_accumulation_steps": 2, "micro_batch_size": 8, "bf16": False}


@pytest.mark.slow
def test_zero3_run_tracks_a_single_process_run(tiny_run):
    root, _, _ = tiny_run
    history = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    reference = single_process_losses(root, 5)
    for h, ref in zip(history[:5], reference):
        assert h["loss"] == pytest.approx(ref, rel=1e-4), h["step"]  # stated tolerance: 1e-4 relative


def starts(run: Path) -> list[dict]:
    """The worker-group starts the run recorded (events.jsonl)."""
    return [e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()) if e["event"] == "start"]


def run_config(root: Path, output: Path, **kw) -> PretrainConfig:
    state = json.loads((Path(latest_checkpoint(str(root / "run"))) / "train_state.json").read_text())
    return PretrainConfig.model_validate({**state["config"], "output": str(output), **kw})


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(latest_checkpoint(str(run))) / "model.safetensors"))


@pytest.mark.slow
def test_killed_worker_resumes_bit_exactly(tiny_run, tmp_path):
    root, _, _ = tiny_run
    out = tmp_path / "killed"
    killed = kill_worker_after(out, 10)
    pretrain(run_config(root, out, checkpoint_every=5, max_failures=2, keep_checkpoints=2))
    assert killed, "no worker was killed"
    # the second attempt started from a checkpoint the run records, at a step past 0
    first, second = starts(out)
    assert first["step"] == 0 and first["resumed_from"] is None
    k = second["step"]
    assert k >= 10 and second["resumed_from"].endswith(f"checkpoint_{k:07d}") and second["attempt"] == 2
    # keep-K: 8 checkpoints written, the 2 newest kept, both complete
    kept = sorted(p.name for p in out.glob("checkpoint_*") if p.is_dir())
    assert kept == ["checkpoint_0000035", "checkpoint_0000040"]
    assert all(verify_checkpoint(str(out / name)) is None for name in kept)
    a = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in b] == list(range(1, 41))
    assert [h["loss"] for h in b] == [h["loss"] for h in a]  # bit for bit, every step
    assert [h.get("val_loss") for h in b] == [h.get("val_loss") for h in a]
    wa, wb = final_weights(root / "run"), final_weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_resume_falls_back_from_a_corrupt_checkpoint(tiny_run, tmp_path):
    import shutil


    root, _, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    newest = run / "checkpoint_0000040"
    shard = sorted((newest / "deepspeed" / "state").glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # torn: truncated
    assert "checksum" in verify_checkpoint(str(newest))
    assert latest_checkpoint(str(run)).endswith("checkpoint_0000020")
    (run / "checkpoint_0000020" / "MANIFEST.rank1.json").rename(run / "manifest.bak")
    with pytest.raises(FileNotFoundError, match="MANIFEST.rank1"):
        latest_checkpoint(str(run))
    (run / "manifest.bak").rename(run / "checkpoint_0000020" / "MANIFEST.rank1.json")
    # a new job on the run directory resumes from step 20 and redoes 21..40 identically
    pretrain(run_config(root, run))
    assert latest_checkpoint(str(run)).endswith("checkpoint_0000040")
    wa, wb = final_weights(root / "run"), final_weights(run)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


ELASTIC_SCRIPT = r"""
import json, sys, threading, time
import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
from jobs.checkpoint.layout import verify_checkpoint
from jobs.pretrain import PretrainConfig, run

cfg = PretrainConfig.model_validate(json.loads(sys.argv[1]))

def remove_node():
    ck = cfg.output + "/checkpoint_0000010"
    while verify_checkpoint(ck):
        time.sleep(0.2)
    cluster.remove_node(nodes[1])
    print("REMOVED NODE", flush=True)

threading.Thread(target=remove_node, daemon=True).start()
run(cfg)
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_elastic_run_survives_node_removal(tiny_run, tmp_path):
    import subprocess
    import sys

    root, _, _ = tiny_run
    out = tmp_path / "elastic"
    cfg = run_config(root, out, num_workers=[1, 2], checkpoint_every=5, max_failures=3)
    proc = subprocess.run([sys.executable, "-c", ELASTIC_SCRIPT, json.dumps(cfg.resolved())], capture_output=True,
                          text=True, timeout=900, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "REMOVED NODE" in proc.stdout
    a = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in b] == list(range(1, 41))  # the same data order, no step lost or repeated
    assert b[0]["world_size"] == 2 and b[-1]["world_size"] == 1
    assert [h["loss"] for h in b[:11]] == [h["loss"] for h in a[:11]]  # step 11 runs on the resharded state
    # afterwards only the floating-point reduction order differs (1 worker accumulating 4 micro-batches
    # instead of 2 workers x 2), which Adam amplifies a little: stated tolerance 0.1 % relative per step
    assert max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b)) < 1e-3
    assert b[-1]["val_loss"] == pytest.approx(a[-1]["val_loss"], rel=1e-3)


def test_s3_data_and_checkpoints_and_init_from_an_export(tiny_run, tmp_path, s3):
    """Shards read from S3, checkpoints written to S3, weights initialised from an HF export."""
    from cluster import storage
    from jobs.export import ExportConfig
    from jobs.export import run as export

    root, data, _ = tiny_run
    export(ExportConfig(run=str(root / "run"), output=str(tmp_path / "hf")))
    storage.copy_dir(root / "data", "s3://raylm/data")
    base = run_config(root, tmp_path / "unused")
    cfg = base.model_copy(update={
        "data": "s3://raylm/data", "output": "s3://raylm/runs/cont", "init_from": str(tmp_path / "hf"),
        "num_workers": 1, "zero_stage": 0, "global_batch_size": 8, "micro_batch_size": 8, "max_steps": 4,
        "warmup_steps": 1, "lr": 1e-4, "eval_every": 4, "checkpoint_every": 2})
    summary = pretrain(cfg)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="raylm", Prefix="runs/cont/")["Contents"]}
    assert {"runs/cont/metrics.jsonl", "runs/cont/loss.png", "runs/cont/checkpoint_0000004/model.safetensors",
            "runs/cont/checkpoint_0000004/MANIFEST.rank0.json"} <= keys
    assert summary["checkpoint"] == "s3://raylm/runs/cont/checkpoint_0000004"
    history = [json.loads(x) for x in storage.read_text("s3://raylm/runs/cont/metrics.jsonl").splitlines()]
    trained = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    # continuing from the export starts where the source run ended, far below a fresh model's loss
    assert history[0]["loss"] < trained[-1]["loss"] + 0.3 < trained[0]["loss"] - 0.5
    samples = generate(GenerateConfig(run="s3://raylm/runs/cont", prompts=["HAMLET:\n"], max_new_tokens=10))
    assert samples[0]["step"] == 4


@pytest.mark.slow
def test_pipeline_run_tracks_single_process_and_resumes(tiny_run, tmp_path):
    import shutil

    root, _, _ = tiny_run
    out = tmp_path / "pp"
    cfg = run_config(root, out, pipeline_stages=2, zero_stage=1, max_steps=6, warmup_steps=2, eval_every=3,
                     checkpoint_every=3)
    pretrain(cfg)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for h, ref in zip(history, single_process_losses(root, 6, cfg)):
        assert h["loss"] == pytest.approx(ref, rel=1e-4), h["step"]
    # the consolidated weights of a pipeline checkpoint load into the plain model
    model, _, state = load_model(latest_checkpoint(str(out)))
    assert state["step"] == 6 and model.cfg.n_layers == 2
    # resume from the step-3 pipeline checkpoint reproduces the final weights exactly
    again = tmp_path / "pp-resumed"
    shutil.copytree(out, again)
    (again / "checkpoint_0000006" / "model.safetensors").write_bytes(b"torn")  # newest no longer verifies
    pretrain(cfg.model_copy(update={"output": str(again)}))
    resumed = starts(again)[-1]
    assert resumed["step"] == 3 and resumed["resumed_from"].endswith("checkpoint_0000003")
    b = [json.loads(x) for x in (again / "metrics.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in b[3:]] == [h["loss"] for h in history[3:]]  # steps 4-6, bit for bit
    wa, wb = final_weights(out), final_weights(again)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
