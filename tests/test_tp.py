"""Tensor parallelism (DeepSpeed AutoTP) through jobs.pretrain on Ray Train CPU workers (gloo, fp32).

Real runs, shared through module fixtures, each compared with one plain-PyTorch process that
trains model.GPT on the same rows with the same optimizer, schedule and clipping:

* `tp_run`: tensor_parallel 2 on 2 workers, ZeRO-1, 20 steps. Losses within 1e-5 (relative) of
  the single process at every step, the logged gradient norm likewise, and the gathered
  model.safetensors within 1e-5 (absolute) of the single process's final weights, same keys and
  shapes. Clipping at 1.0 binds at most steps, so a TP run that got the global norm wrong (shards
  not summed over the TP group, whole tensors counted twice) drifts past these bounds.
* `tp_dp_run`: tensor_parallel 2 x 2 data-parallel replicas on 4 workers, ZeRO-0, gpt2 (biases,
  learned positions, untied head): the replicas' rows and the loop's own TP-aware gradient norm.
* `tp_pp_run`: tensor_parallel 2 x 2 pipeline stages on 4 workers, 3 blocks (uneven stages).
* `tp1_resumed`: `tp_run`'s step-10 checkpoint resumed at tensor_parallel 1 (2 data-parallel
  workers) through DeepSpeed's universal checkpoint, then steps 11-20.
* a `tp_run` twin whose worker is SIGKILLed after step 10: bit-for-bit the same run.

Observed on the 2-core machine: relative loss differences ~1e-7, weights ~1e-6.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_worker_after, reference_training
from safetensors.torch import load_file

from jobs.checkpoint.layout import latest_checkpoint
from jobs.checkpoint.load import load_model
from jobs.data.shards import ShardLoader, load_manifest
from jobs.train.config import PretrainConfig
from model import GPT

os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
LLAMA = {"preset": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "max_seq_len": 64}
GPT2 = {"arch": "gpt2", "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128, "max_seq_len": 64,
        "tie_embeddings": False}
BASE = {"num_workers": 2, "tensor_parallel": 2, "zero_stage": 1, "global_batch_size": 8, "micro_batch_size": 2,
        "max_steps": 20, "warmup_steps": 2, "lr": 3e-3, "grad_clip": 1.0, "seed": 7, "eval_every": 10,
        "eval_batches": 1, "checkpoint_every": 10}


@pytest.fixture(scope="module")
def tp_data(ray_local, tmp_path_factory):
    from jobs.data.inputs import default_corpus
    from jobs.prepare import PrepareConfig
    from jobs.prepare import run as prepare

    root = tmp_path_factory.mktemp("tp")
    plays = [p for p in default_corpus() if Path(p).stem in ("macbeth", "hamlet")]
    prepare(PrepareConfig(inputs=plays, output=str(root / "data"), format="markdown", markdown_split_level=3,
                          vocab_size=320, seq_len=32, val_fraction=0.1, num_shards=1))
    return root


def config(root: Path, name: str, **kw) -> PretrainConfig:
    return PretrainConfig.model_validate({"data": str(root / "data"), "output": str(root / name),
                                          "model": LLAMA, **BASE, **kw})


def pretrain(cfg: PretrainConfig) -> dict:
    from jobs.pretrain import run

    return run(cfg)


def history(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def starts(run: Path) -> list[dict]:
    return [e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()) if e["event"] == "start"]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(latest_checkpoint(str(run))) / "model.safetensors"))


def reference(root: Path, cfg: PretrainConfig, steps: int) -> tuple[GPT, list[float], list[float]]:
    """One plain-PyTorch process: the model after `steps` steps, the losses and the gradient norms."""
    manifest = load_manifest(str(root / "data"))
    mcfg = cfg.model.model_copy(update={"vocab_size": manifest["vocab_size"]})
    return reference_training(cfg, mcfg, ShardLoader(root / "data", manifest, "train", cfg.seed), steps)


def assert_tracks(got: list[float], ref: list[float], what: str, rel: float = 1e-5) -> None:
    assert len(got) == len(ref)
    for step, (a, b) in enumerate(zip(got, ref), 1):
        assert abs(a - b) <= rel * abs(b), f"{what}, step {step}: TP run {a} vs single process {b}"


def assert_same_weights(sd: dict, model: GPT, atol: float = 1e-5, skip: tuple[str, ...] = ()) -> None:
    ref = {k: v for k, v in model.state_dict().items() if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    assert sd.keys() == ref.keys()  # the one checkpoint format: the unsplit model's names ...
    for k in sd:
        assert sd[k].shape == ref[k].shape, k  # ... and shapes
        if not k.endswith(skip):
            torch.testing.assert_close(sd[k], ref[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def val_loss_of(root: Path, ckpt: str, batches: int, global_batch: int) -> float:
    """The loss of a checkpoint's weights on the first eval batches, as the loop evaluates."""
    model, _, _ = load_model(ckpt)
    rows = ShardLoader(root / "data", load_manifest(str(root / "data")), "val", 0).rows(0, batches * global_batch,
                                                                                       shuffle=False)
    with torch.no_grad():
        _, loss = model.eval()(rows[:, :-1], rows[:, 1:])
    return float(loss)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def tp_run(tp_data):
    cfg = config(tp_data, "tp2")
    pretrain(cfg)
    return tp_data / "tp2", cfg


@pytest.fixture(scope="module")
def tp_dp_run(tp_data):
    cfg = config(tp_data, "tp2dp2", model=GPT2, num_workers=4, zero_stage=0, max_steps=8, eval_every=8,
                 checkpoint_every=8)
    pretrain(cfg)
    return tp_data / "tp2dp2", cfg


@pytest.fixture(scope="module")
def tp_pp_run(tp_data):
    cfg = config(tp_data, "tp2pp2", model={**LLAMA, "n_layers": 3}, num_workers=4, pipeline_stages=2, max_steps=6,
                 eval_every=6, checkpoint_every=6)
    pretrain(cfg)
    return tp_data / "tp2pp2", cfg


@pytest.fixture(scope="module")
def tp1_resumed(tp_run):
    run, cfg = tp_run
    out = run.parent / "tp2-then-tp1"
    # a new job on a run directory holding the TP 2 run's step-10 checkpoint (Ray's own records of
    # the first run stay behind: they name a step-20 checkpoint this directory does not have)
    shutil.copytree(run / "checkpoint_0000010", out / "checkpoint_0000010")
    pretrain(cfg.model_copy(update={"output": str(out), "tensor_parallel": 1}))
    return out


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_tp2_trains_like_one_process(tp_run):
    run, cfg = tp_run
    got = history(run)
    model, losses, norms = reference(run.parent, cfg, 20)
    assert losses[-1] < losses[0] - 0.5  # it learns: not a comparison of two idle runs
    assert sum(n > cfg.grad_clip for n in norms) >= 5  # clipping binds, so the norm matters
    assert_tracks([h["loss"] for h in got], losses, "loss")
    assert_tracks([h["grad_norm"] for h in got], norms, "gradient norm")
    assert_same_weights(final_weights(run), model)
    # the live engine ran what was asked: 2 TP ranks of one data-parallel replica
    (start,) = starts(run)
    assert start["engine"] == {"zero_stage": 1, "data_parallel_size": 1, "tensor_parallel_size": 2,
                               "gradient_accumulation_steps": 4, "micro_batch_size": 2, "bf16": False}
    state = json.loads((Path(latest_checkpoint(str(run))) / "train_state.json").read_text())
    assert state["tensor_parallel"] == 2 and state["world_size"] == 2
    # evaluation under TP: the logged val loss is the checkpoint's own on the same rows
    assert got[-1]["val_loss"] == pytest.approx(val_loss_of(run.parent, latest_checkpoint(str(run)), 1, 8), rel=1e-5)


@pytest.mark.slow
def test_tp2_with_two_replicas_reads_their_rows_and_norms_the_shards(tp_dp_run):
    run, cfg = tp_dp_run
    got = history(run)
    model, losses, norms = reference(run.parent, cfg, 8)
    assert_tracks([h["loss"] for h in got], losses, "loss")
    assert_tracks([h["grad_norm"] for h in got], norms, "gradient norm (the loop's own, ZeRO-0)")
    # Two replicas sum the gradients in another order than one process does, and Adam turns the
    # float noise of near-zero gradients into lr-sized steps: gpt2's key bias (its true gradient is
    # 0: softmax cancels q.b_k) and the rows of rarely seen tokens in the untied embedding. Those
    # two are held to 1e-4 (observed 2e-5), everything else to 1e-5.
    assert_same_weights(final_weights(run), model, skip=("attn.wk.bias", "tok_emb.weight"))
    assert_same_weights(final_weights(run), model, atol=1e-4)
    (start,) = starts(run)
    assert start["engine"]["tensor_parallel_size"] == 2 and start["engine"]["data_parallel_size"] == 2
    assert start["engine"]["gradient_accumulation_steps"] == 2


@pytest.mark.slow
def test_tp2_times_two_pipeline_stages_on_four_workers(tp_pp_run):
    run, cfg = tp_pp_run
    got = history(run)
    model, losses, norms = reference(run.parent, cfg, 6)
    assert_tracks([h["loss"] for h in got], losses, "loss")
    assert_tracks([h["grad_norm"] for h in got], norms, "gradient norm")
    # Adam turns the float noise of a near-zero gradient into an lr-sized relative step: a few
    # elements of the MLP weights land up to 5e-5 away (observed: 1 of 8192 in blocks.0.mlp.down
    # above 1e-5, the mean difference 2e-8). A wrong gradient would move whole tensors.
    sd = final_weights(run)
    assert_same_weights(sd, model, atol=1e-4)
    for k, v in model.state_dict().items():
        if k in sd:
            assert float(((sd[k] - v).abs() > 1e-5).float().mean()) <= 1e-3, k
    (start,) = starts(run)
    assert start["world_size"] == 4
    assert start["engine"]["tensor_parallel_size"] == 2 and start["engine"]["data_parallel_size"] == 1
    ck = latest_checkpoint(str(run))
    assert got[-1]["val_loss"] == pytest.approx(val_loss_of(run.parent, ck, 1, 8), rel=1e-5)


@pytest.mark.slow
def test_tp_checkpoint_resumes_at_tp1_and_exports_to_hugging_face(tp_run, tp1_resumed, tmp_path):
    import transformers

    from jobs.export import ExportConfig
    from jobs.export import run as export

    run, cfg = tp_run
    a, b = history(run), history(tp1_resumed)
    resumed = starts(tp1_resumed)[-1]
    assert resumed["step"] == 10 and resumed["resumed_from"].endswith("checkpoint_0000010")
    assert resumed["engine"]["tensor_parallel_size"] == 1 and resumed["engine"]["data_parallel_size"] == 2
    assert [h["step"] for h in b] == list(range(1, 21))
    assert_tracks([h["loss"] for h in b[10:]], [h["loss"] for h in a[10:]], "loss after resuming at TP 1")
    wa, wb = final_weights(run), final_weights(tp1_resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # the TP run's checkpoint, exported, is the same model in transformers
    ck = latest_checkpoint(str(run))
    export(ExportConfig(checkpoint=ck, output=str(tmp_path / "hf")))
    ours, _, _ = load_model(ck)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((ours.eval()(idx) - hf(idx).logits).abs().max())
    assert diff <= 1e-4


@pytest.mark.slow
def test_killed_tp_worker_resumes_bit_exactly(tp_run):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    run, cfg = tp_run
    out = run.parent / "tp2-killed"
    killed = kill_worker_after(out, 10)
    pretrain(cfg.model_copy(update={"output": str(out), "checkpoint_every": 5, "max_failures": 2}))
    assert killed, "no worker was killed"
    first, second = starts(out)
    assert second["step"] >= 10 and second["engine"]["tensor_parallel_size"] == 2
    a, b = history(run), history(out)
    assert [h["step"] for h in b] == list(range(1, 21))
    assert [h["loss"] for h in b] == [h["loss"] for h in a]  # bit for bit, every step
    wa, wb = final_weights(run), final_weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


PLACEMENT_SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
for _ in range(2):
    cluster.add_node(num_cpus=1)  # one worker per node: a TP group of 2 must span them
cluster.wait_for_nodes()
ray.init(address=cluster.address)
from jobs.pretrain import PretrainConfig, run

try:
    run(PretrainConfig.model_validate(json.loads(sys.argv[1])))
    print("RAN")
except Exception as e:
    print("REFUSED:", e)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_a_tensor_parallel_group_across_nodes_is_refused_at_start_up(tp_data):
    import subprocess

    cfg = config(tp_data, "across-nodes", max_steps=4, warmup_steps=1)
    proc = subprocess.run([sys.executable, "-c", PLACEMENT_SCRIPT, json.dumps(cfg.resolved())], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert "REFUSED:" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tensor_parallel (2): workers 0..1 form one tensor-parallel group but run on 2 nodes" in proc.stdout
    assert not (tp_data / "across-nodes" / "checkpoint_0000004").exists()


# ----------------------------------------------------------------------------- refusals


def tp_config(**kw):
    base = {"data": "d", "output": "o", "num_workers": 2, "tensor_parallel": 2, "global_batch_size": 8,
            "micro_batch_size": 2, "model": {"preset": "tiny", "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
                                             "d_model": 64, "d_ff": 128}}
    model = {**base["model"], **kw.pop("model", {})}
    return PretrainConfig.model_validate({**base, **kw, "model": model})


@pytest.mark.parametrize("kw, message", [
    ({"tensor_parallel": 3, "num_workers": 3, "global_batch_size": 12}, r"tensor_parallel \(3\) must divide model.n_heads \(4\)"),
    ({"tensor_parallel": 4, "num_workers": 4}, r"tensor_parallel \(4\) must divide model.n_kv_heads \(2\)"),
    ({"model": {"n_kv_heads": 4, "d_ff": 129}}, r"tensor_parallel \(2\) must divide model.d_ff \(129\)"),
    ({"model": {"dropout": 0.1}}, r"model.dropout \(0.1\) must be 0 with tensor_parallel"),
    ({"num_workers": 3, "global_batch_size": 12}, r"num_workers \(3\) must be divisible by tensor_parallel \(2\)"),
    ({"num_workers": 6, "pipeline_stages": 2, "zero_stage": 1, "global_batch_size": 12},
     r"num_workers \(6\) must be divisible by tensor_parallel \* pipeline_stages \(4\)"),
    ({"num_workers": [2, 4]}, r"num_workers \(3\) must be divisible by tensor_parallel"),  # elastic: never with TP
    ({"num_workers": 4, "global_batch_size": 6}, r"global_batch_size \(6\) must be a multiple of micro_batch_size \* "
                                                 r"data-parallel workers \(2 \* 2\)"),
    ({"num_workers": 4, "pipeline_stages": 2, "zero_stage": 2}, r"zero_stage \(2\) must be 0 or 1 with pipeline"),
    ({"zero_stage": 3, "offload_optimizer": True}, r"offload_optimizer is not supported with tensor_parallel"),
    ({"tensor_parallel": 0}, r"tensor_parallel"),
    ({"num_workers": 4, "pipeline_stages": 2, "zero_stage": 1, "model": {"n_layers": 1}},
     r"model.n_layers \(1\) must be at least pipeline_stages \(2\)"),
])
def test_invalid_tensor_parallel_layouts_are_refused_before_any_worker(kw, message):
    tp_config()  # the valid baseline
    tp_config(num_workers=8, pipeline_stages=2, zero_stage=1, model={"n_layers": 3})  # TP 2 x PP 2 x DP 2, uneven stages
    tp_config(zero_stage=3)  # every ZeRO stage composes with TP
    with pytest.raises(ValueError, match=message):
        tp_config(**kw)


def test_tensor_parallel_groups_must_not_span_nodes():
    from jobs.train.loop import check_tensor_parallel_placement

    check_tensor_parallel_placement(["a", "a", "b", "b"], 2)
    check_tensor_parallel_placement(["a", "b"], 1)
    with pytest.raises(ValueError, match=r"tensor_parallel \(2\): workers 2..3 form one tensor-parallel group but run "
                                         r"on 2 nodes"):
        check_tensor_parallel_placement(["a", "a", "a", "b"], 2)


@pytest.mark.parametrize("wrote, now, message", [
    ({"zero_stage": 0, "pipeline_stages": 1}, {}, "needs ZeRO stage 1-3 shards"),
    ({"zero_stage": 1, "pipeline_stages": 2}, {"pipeline_stages": 2, "num_workers": 4}, "with pipeline_stages"),
])
def test_resume_at_another_tensor_parallel_degree_is_refused_where_it_cannot_work(tmp_path, wrote, now, message):
    from jobs.train.loop import check_resume_layout
    from jobs.train.worker import Worker

    (tmp_path / "train_state.json").write_text(json.dumps({"step": 10, "world_size": 2, "tensor_parallel": 2,
                                                           "model": {}, "config": wrote}))
    w = Worker(rank=0, world=2, device=torch.device("cpu"), scratch=tmp_path, output="runs/x",
               resumed_from="runs/x/checkpoint_0000010",
               resume_dir=tmp_path, resume_world=2, tensor_parallel=1, resume_tensor_parallel=2)
    cfg = tp_config(tensor_parallel=1, zero_stage=1, **now)
    with pytest.raises(ValueError, match=rf"tensor_parallel: runs/x/checkpoint_0000010 was written at "
                                         rf"tensor_parallel=2, this run has 1; .*{message}"):
        check_resume_layout(cfg, w)
    check_resume_layout(cfg.model_copy(update={"tensor_parallel": 2}), w)  # the same degree resumes as usual
