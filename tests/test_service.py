"""Control API, SDK and CLI against real components: a Ray head started here (`ray start --head`
on 127.0.0.1 with token auth), the API served by uvicorn on a loopback port, a SQLite file.

Order matters and is the file's order: the prepare -> pretrain -> generate pipeline runs first
(the later tests reuse its jobs), the 50-job burst runs last (its queued jobs need not finish; that
a burst does finish is tests/test_security.py's test_burst_of_jobs_all_finish).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from service.client import Client, Conflict, InvalidSpec, NotFound, QuotaExceeded

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STATE: dict = {}  # jobs created by earlier tests, reused by later ones


def client(api, workspace, tenant: str) -> Client:
    return Client(api.url, workspace["tokens"][tenant], timeout=120)


def cli(api, workspace, tenant: str, *args: str):
    from service.cli import app

    env = {"RAYLM_URL": api.url, "RAYLM_TOKEN": workspace["tokens"][tenant]}
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := pred():
            return v
        time.sleep(0.5)
    raise TimeoutError(what)


TINY_MODEL = {"preset": "tiny", "n_layers": 1, "d_model": 64, "n_heads": 2, "n_kv_heads": 1, "d_ff": 128,
              "max_seq_len": 32}


def pretrain_spec(ws: Path, output: str, max_steps: int) -> dict:
    return {"kind": "pretrain", "data": str(ws / "alice" / "prep"), "output": output, "model": TINY_MODEL,
            "num_workers": 2, "zero_stage": 2, "global_batch_size": 4, "micro_batch_size": 2, "max_steps": max_steps,
            "warmup_steps": 1, "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2, "lr": 1e-3}


@pytest.mark.slow
def test_pipeline_sdk_cli_restart(api, workspace, tmp_path):
    """prepare (SDK, logs followed) -> pretrain (CLI, API killed and restarted mid-job) -> generate (CLI --wait --follow)."""
    ws = workspace["dir"]
    c = client(api, workspace, "alice")

    # --- prepare through the SDK; a relative output lands under the tenant's first prefix
    prep = c.submit({"kind": "prepare", "inputs": [str(ws / "alice" / "play.md"), "short.txt"], "output": "prep",
                     "markdown_split_level": 3, "vocab_size": 300, "seq_len": 32, "num_shards": 1, "val_fraction": 0.1})
    assert prep.spec["output"] == str(ws / "alice" / "prep") and prep.status in ("QUEUED", "PENDING", "RUNNING")
    assert prep.spec["inputs"][1] == str(ws / "alice" / "short.txt")
    followed = "".join(c.logs(prep.id, follow=True))
    assert "python -m jobs.prepare --config job.yaml" in followed
    assert c.wait(prep.id, timeout=900) == "SUCCEEDED", c.get(prep.id).message
    d = c.get(prep.id)
    assert [e.status for e in d.history][:3] == ["QUEUED", "SUBMITTING", "PENDING"]
    assert d.history[-1].status == "SUCCEEDED"
    assert d.timings.ended_at >= d.timings.created_at
    manifest = ws / "alice" / "prep" / "manifest.json"
    assert [m.path for m in d.artifacts.manifests] == ["manifest.json"]
    assert d.lineage["output_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    STATE["prepare"] = prep.id

    # --- pretrain through the CLI
    run_dir = ws / "alice" / "run"
    f = tmp_path / "pretrain.yaml"
    f.write_text(yaml.safe_dump({"pretrain": {k: v for k, v in pretrain_spec(ws, str(run_dir), 4).items() if k != "kind"}}))
    r = cli(api, workspace, "alice", "submit", str(f), "--json")
    assert r.exit_code == 0, r.output
    pre = json.loads(r.stdout)
    STATE["pretrain"] = pre["id"]
    wait_for(lambda: c.get(pre["id"]).status == "RUNNING", 600, "pretrain running")

    # --- restart the API mid-job: the record, its history and its status survive
    before = c.get(pre["id"])
    api.kill()
    with pytest.raises(httpx.TransportError):
        c.get(pre["id"])
    api.start()
    after = c.get(pre["id"])
    assert after.spec == before.spec and after.submission_id == before.submission_id
    assert [e.status for e in after.history][: len(before.history)] == [e.status for e in before.history]
    assert after.status in ("RUNNING", "SUCCEEDED")

    r = cli(api, workspace, "alice", "logs", pre["id"], "-f")
    assert r.exit_code == 0 and "final val loss" in r.stdout, r.stdout[-2000:]
    assert c.wait(pre["id"], timeout=600) == "SUCCEEDED"
    r = cli(api, workspace, "alice", "status", pre["id"], "--json")
    d = json.loads(r.stdout)
    assert d["status"] == "SUCCEEDED"
    # lineage: parent job, input manifest and tokenizer hashes, the checkpoint produced
    lin = d["lineage"]
    assert lin["parent_job"] == prep.id
    assert lin["input_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert lin["tokenizer_sha256"] == json.loads(manifest.read_text())["tokenizer_sha256"]
    from jobs.checkpoint.layout import latest_checkpoint

    assert lin["checkpoint"] == latest_checkpoint(str(run_dir))
    assert d["metrics"]["step"] == 4
    # artifacts: checkpoints, metrics, plot; the archived log outlives the cluster's copy
    a = c.artifacts(pre["id"])
    assert a.checkpoints and all("model.safetensors" in ck.files for ck in a.checkpoints)
    assert any(m.path == "metrics.jsonl" for m in a.metrics) and [p.path for p in a.plots] == ["loss.png"]
    assert c.artifact(pre["id"], "loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(NotFound):
        c.artifact(pre["id"], "../prep/manifest.json")
    assert a.logs and "final val loss" in Path(a.logs).read_text()
    assert "final val loss" in "".join(c.logs(pre["id"], tail=50))

    # --- generate through the CLI, waiting and following
    g = tmp_path / "gen.yaml"
    g.write_text(yaml.safe_dump({"kind": "generate", "run": str(run_dir), "prompts": ["ROMEO:"], "max_new_tokens": 8,
                                 "output": str(ws / "alice" / "samples.jsonl")}))
    r = cli(api, workspace, "alice", "submit", str(g), "--wait", "--follow")
    assert r.exit_code == 0, r.output[-3000:]
    assert "SUCCEEDED" in r.stdout
    gen = c.list(kind="generate").items[0]
    assert gen.lineage["parent_job"] == pre["id"]
    assert json.loads((ws / "alice" / "samples.jsonl").read_text().splitlines()[0])["prompt"] == "ROMEO:"

    r = cli(api, workspace, "alice", "list", "--kind", "pretrain")
    assert r.exit_code == 0 and pre["id"] in r.stdout
    r = cli(api, workspace, "alice", "artifacts", pre["id"])
    assert "loss.png" in r.stdout and "checkpoint_" in r.stdout


def test_stop_running_job(api, workspace):
    ws = workspace["dir"]
    c = client(api, workspace, "alice")
    job = c.submit(pretrain_spec(ws, str(ws / "alice" / "long"), 100_000))
    wait_for(lambda: c.get(job.id).status in ("RUNNING", "FAILED"), 600, "long job running")
    assert c.get(job.id).status == "RUNNING"
    assert c.stop(job.id).id == job.id
    assert c.wait(job.id, timeout=300) == "STOPPED"
    with pytest.raises(Conflict):
        c.stop(job.id)
    c.delete(job.id)
    with pytest.raises(NotFound):
        c.get(job.id)


def test_auth_and_tenant_isolation(api, workspace):
    alice_job = STATE.get("prepare") or client(api, workspace, "alice").list().items[0].id
    assert httpx.get(f"{api.url}/v1/health").status_code == 200
    for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{alice_job}"),
                         ("GET", "/v1/cluster"), ("POST", f"/v1/jobs/{alice_job}/stop")):
        assert httpx.request(method, api.url + path).status_code == 401
        assert httpx.request(method, api.url + path, headers={"Authorization": "Bearer nope"}).status_code == 401
    # the digest stored for alice is not itself a token
    digest = hashlib.sha256(workspace["tokens"]["alice"].encode()).hexdigest()
    assert httpx.get(f"{api.url}/v1/jobs", headers={"Authorization": f"Bearer {digest}"}).status_code == 401
    bob = {"Authorization": f"Bearer {workspace['tokens']['bob']}"}
    for method, path in (("GET", ""), ("GET", "/logs"), ("GET", "/artifacts"), ("GET", "/metrics"), ("GET", "/report"),
                         ("POST", "/stop"), ("DELETE", "")):
        assert httpx.request(method, f"{api.url}/v1/jobs/{alice_job}{path}", headers=bob).status_code == 404
    assert alice_job not in {j.id for j in client(api, workspace, "bob").list().items}
    cl = client(api, workspace, "bob").cluster()
    assert cl.cpus == 4 and len(cl.nodes) == 1


def test_paths_and_quotas_rejected_naming_the_field(api, workspace):
    ws = workspace["dir"]
    bob, carol = client(api, workspace, "bob"), client(api, workspace, "carol")
    before = bob.list().total, carol.list().total  # other tests of the session may have submitted as them
    gen = {"kind": "generate", "run": str(ws / "bob" / "run")}
    bad = {
        "output": ["../alice/x", "/etc/x", f"{ws}/bob/../alice/x", f"{ws}/bob/%2e%2e/alice", "file:///etc/passwd",
                   "http://example.com/x", f"{ws}/bob/escape/x", "s3://other-bucket/x", "s3://lm-bucket/bob/../alice",
                   "s3://lm-bucket/bobby/x", f"{ws}/bob\\..\\alice", ""],
        "run": [f"{ws}/alice/run", f"{ws}/bob/escape"],
        "checkpoint": ["gs://bucket/x"],
    }
    for field, values in bad.items():
        for v in values:
            with pytest.raises(InvalidSpec) as e:
                bob.submit({**gen, field: v})
            assert e.value.status == 422 and any(d["loc"][-1] == field for d in e.value.detail), (field, v, e.value.detail)
            assert field in e.value.message
    with pytest.raises(InvalidSpec) as e:
        bob.submit({"kind": "prepare", "inputs": [f"{ws}/bob/a.txt", "/etc/*"], "output": f"{ws}/bob/p"})
    assert e.value.detail[0]["loc"][-2:] == ["inputs", 1]
    # a glob inside the prefix whose matches escape through a link
    with pytest.raises(InvalidSpec):
        bob.submit({"kind": "prepare", "inputs": [f"{ws}/bob/*/play.md"], "output": f"{ws}/bob/p"})
    # nested configs must come inline (the service reads no files), presets are names
    r = httpx.post(f"{api.url}/v1/jobs", headers={"Authorization": f"Bearer {workspace['tokens']['bob']}"},
                   json={"kind": "tune", "pretrain": "/etc/passwd", "output": f"{ws}/bob/t"})
    assert r.status_code == 422 and "pretrain" in r.text and "root:" not in r.text
    with pytest.raises(InvalidSpec) as e:
        bob.submit({"kind": "pretrain", "data": f"{ws}/bob/d", "output": f"{ws}/bob/o", "model": {"preset": "../../x"}})
    assert "preset" in e.value.message
    # quotas: CPUs and GPUs per job name the fields; concurrent jobs get 429
    with pytest.raises(InvalidSpec) as e:
        bob.submit({"kind": "pretrain", "data": f"{ws}/bob/d", "output": f"{ws}/bob/o", "num_workers": 2,
                    "cpus_per_worker": 2})
    assert "num_workers" in e.value.message and "max_cpus_per_job" in e.value.message
    with pytest.raises(InvalidSpec) as e:
        bob.submit({**gen, "use_gpu": True})
    assert "use_gpu" in e.value.message and "max_gpus_per_job" in e.value.message
    with pytest.raises(QuotaExceeded) as e:
        carol.submit({"kind": "generate", "run": str(ws / "carol" / "run")})
    assert e.value.status == 429 and "max_concurrent_jobs" in e.value.message
    # nothing of the above reached the store
    assert (bob.list().total, carol.list().total) == before  # nothing refused was recorded


def test_cli_run_locally_and_spec_files(ray_head, workspace, tmp_path, monkeypatch):
    """`raylm run` runs a job in-process, without the service (here attached to the test head)."""
    from service.cli import spec_from_file

    ws = workspace["dir"]
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump({"prepare": {"output": "x"}, "pretrain": {"data": "x", "output": "y"}}))
    assert spec_from_file(pipe, "pretrain", ["model.n_layers=1"]) == {"kind": "pretrain", "data": "x", "output": "y",
                                                                      "model": {"n_layers": 1}}
    # a nested config named by file (the service reads no files) is inlined on the client
    monkeypatch.chdir(REPO)
    tune = spec_from_file(REPO / "configs" / "tune-demo.yaml", None)
    assert tune["pretrain"]["data"] == "runs/demo/data" and tune["pretrain"]["model"]["d_model"] == 128
    if not (ws / "alice" / "run").is_dir():
        pytest.skip("needs the pretrain run of test_pipeline_sdk_cli_restart")
    g = tmp_path / "gen.yaml"
    g.write_text(yaml.safe_dump({"kind": "generate", "run": str(ws / "alice" / "run"), "prompts": ["KING:"],
                                 "max_new_tokens": 4, "output": str(tmp_path / "s.jsonl")}))
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["gcs"]}
    r = subprocess.run([str(BIN / "raylm"), "run", str(g)], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])["prompt"] == "KING:"


def tune_spec(ws: Path, output: str, **search) -> dict:
    """A learning-rate sweep of 1-worker, 4-step trials of a half-width proxy of TINY_MODEL."""
    return {"kind": "tune", "output": output,
            "pretrain": {"data": str(ws / "alice" / "prep"), "output": f"{output}-target", "model": TINY_MODEL,
                         "num_workers": 1, "zero_stage": 0, "global_batch_size": 4, "micro_batch_size": 4,
                         "max_steps": 40, "warmup_steps": 2},
            "proxy": {"d_model": 32, "d_ff": 64},
            "trial": {"max_steps": 4, "eval_every": 2, "eval_batches": 1, "warmup_steps": 1}, **search}


@pytest.mark.slow
def test_tune_sweep_through_api_and_ray_job_submit(api, workspace, ray_head, tmp_path):
    """A sweep is a job like any other: kind `tune` through the SDK, and `ray job submit` as in the README."""
    from jobs.pretrain import PretrainConfig

    ws = workspace["dir"]
    if not (ws / "alice" / "prep" / "manifest.json").exists():
        pytest.skip("needs the prepare output of test_pipeline_sdk_cli_restart")
    c = client(api, workspace, "alice")
    job = c.submit(tune_spec(ws, "sweep", searcher="grid", num_samples=2, search={"lr": [1e-3, 1e-2]}))
    assert job.spec["output"] == str(ws / "alice" / "sweep")
    assert c.wait(job.id, timeout=900) == "SUCCEEDED", "".join(c.logs(job.id, tail=80))
    sweep = ws / "alice" / "sweep"
    summary = json.loads((sweep / "sweep.json").read_text())
    assert summary["trials"] == 2 and summary["best"]["lr"] in (1e-3, 1e-2)
    best = PretrainConfig.model_validate(yaml.safe_load(c.artifact(job.id, "best.yaml")))
    assert best.lr == pytest.approx(summary["best"]["lr"] * 32 / 64) and best.model.d_model == 64
    a = c.artifacts(job.id)
    assert "trials.csv" in [m.path for m in a.metrics] and "loss_vs_lr.png" in [p.path for p in a.plots]

    # `ray job submit --working-dir .` with a config file, against the same head and its token
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(tune_spec(ws, str(ws / "alice" / "sweep-cli"), num_samples=1,
                                               search={"lr": [1e-3, 1e-2]})))
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", ray_head["url"], "--working-dir", ".",
                        "--", "python", "-m", "jobs.tune", "--config", str(config)],
                       cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "succeeded" in r.stdout, (r.stdout[-3000:], r.stderr[-3000:])
    assert "best proxy lr" in r.stdout
    out = ws / "alice" / "sweep-cli"
    assert json.loads((out / "sweep.json").read_text())["trials"] == 1
    assert PretrainConfig.model_validate(yaml.safe_load((out / "best.yaml").read_text())).model.d_model == 64


def test_50_concurrent_submissions_idempotent(api, workspace, ray_head):
    ws = workspace["dir"]
    run = str(ws / "alice" / "run")
    hdr = {"Authorization": f"Bearer {workspace['tokens']['alice']}"}

    def post(i: int) -> tuple[int, str, float]:
        t = time.perf_counter()
        r = httpx.post(f"{api.url}/v1/jobs", headers={**hdr, "Idempotency-Key": f"burst-{i}"}, timeout=300,
                       json={"kind": "generate", "run": run, "prompts": [f"prompt {i}"], "max_new_tokens": 1})
        return r.status_code, r.json().get("id", r.text), time.perf_counter() - t

    with cf.ThreadPoolExecutor(50) as pool:
        first = list(pool.map(post, range(50)))
    assert [s for s, _, _ in first] == [201] * 50, [x for x in first if x[0] != 201][:3]
    ids = [i for _, i, _ in first]
    assert len(set(ids)) == 50
    lat = sorted(t for _, _, t in first)
    STATE["burst_latency"] = {"p50": statistics.median(lat), "p95": lat[int(0.95 * len(lat)) - 1], "max": lat[-1]}
    print(f"50 concurrent submissions: p50 {STATE['burst_latency']['p50']:.2f}s, p95 "
          f"{STATE['burst_latency']['p95']:.2f}s, max {lat[-1]:.2f}s")
    # the same keys again, concurrently: the same jobs, none new
    with cf.ThreadPoolExecutor(50) as pool:
        again = list(pool.map(post, range(50)))
    assert [s for s, _, _ in again] == [200] * 50 and [i for _, i, _ in again] == ids
    c = client(api, workspace, "alice")
    burst = [j for j in c.list(kind="generate", limit=500).items if (j.idempotency_key or "").startswith("burst-")]
    assert sorted(j.id for j in burst) == sorted(ids)
    # Ray has each job the service has admitted exactly once (one queued a moment ago may have been
    # admitted since: at most once)
    from ray.job_submission import JobSubmissionClient

    burst = [c.get(j.id) for j in burst]
    ray_ids = [j.submission_id for j in JobSubmissionClient(
        ray_head["url"], headers={"Authorization": f"Bearer {ray_head['token']}"}).list_jobs()]
    assert all(ray_ids.count(j.submission_id) == 1 for j in burst if j.status != "QUEUED")
    assert all(ray_ids.count(j.submission_id) <= 1 for j in burst)
    # a key reused with another spec is a conflict, not a new job
    r = httpx.post(f"{api.url}/v1/jobs", headers={**hdr, "Idempotency-Key": "burst-0"},
                   json={"kind": "generate", "run": run, "prompts": ["other"]})
    assert r.status_code == 409
    with cf.ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(lambda i: httpx.post(f"{api.url}/v1/jobs/{i}/stop", headers=hdr, timeout=120).status_code,
                              ids))
    assert set(codes) <= {202, 409}
