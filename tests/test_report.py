"""The run report (jobs.report), built from what the real jobs wrote on tiny configs and read back
from its HTML: the data funnel, the training curves, checkpoint verification, the eval table by
stage, escaping of hostile text, no external requests, lineage, malformed files, S3, and the CLIs.

The pipeline reuses the session's tiny base model (tests/conftest.py: prepare -> 30-step
pretrain -> jobs.tasks) and adds only short jobs: a 4-step SFT, evaluate, generate, a 2-trial
sweep of 4-step trials.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOSTILE = '<script>alert("pwned")</script><img src=x onerror=alert(1)> https://evil.example/x.js'

pytestmark = pytest.mark.slow  # the session's base model: a real prepare and Ray Train run


# ----------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def pipeline(tiny_chat_base, tmp_path_factory) -> Path:
    """A pipeline root: data/ and pretrain/ (copies of the session's), sft/, eval/, samples.jsonl, tune/."""
    from jobs.evaluate import EvaluateConfig
    from jobs.infer.config import TaskSpec
    from jobs.evaluate import run as evaluate
    from jobs.generate import GenerateConfig
    from jobs.generate import run as generate
    from jobs.sft import SFTConfig
    from jobs.sft import run as sft
    from jobs.tune import TuneConfig
    from jobs.tune import run as tune

    src, _, _ = tiny_chat_base
    root = tmp_path_factory.mktemp("report") / "pipeline"
    shutil.copytree(src / "data", root / "data")
    shutil.copytree(src / "base", root / "pretrain")
    tasks = src / "tasks"
    sft(SFTConfig(init_from=str(root / "pretrain"), data=str(tasks / "sft_train.jsonl"),
                  eval_file=str(tasks / "sft_val.jsonl"), output=str(root / "sft"), num_workers=1, zero_stage=0,
                  global_batch_size=8, micro_batch_size=8, max_steps=4, lr=2e-3, warmup_steps=1, eval_every=2,
                  checkpoint_every=4))
    evaluate(EvaluateConfig(
        checkpoints=[str(root / "pretrain"), str(root / "sft")], data=str(root / "data"), max_sequences=16,
        output=str(root / "eval"), tasks=[
            TaskSpec(name="speaker", task_file=str(tasks / "eval" / "speaker.jsonl"), type="multiple_choice", limit=24),
            TaskSpec(name="count_words", task_file=str(tasks / "eval" / "count_words.jsonl"), type="generative",
                     match="number", max_new_tokens=4, limit=6)]))
    prompts = root / "prompts.txt"  # not .jsonl: the report must not take the prompts for samples
    prompts.write_text(json.dumps({"prompt": HOSTILE}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Who speaks next?"}]}) + "\n")
    generate(GenerateConfig(run=str(root / "sft"), prompts_file=str(prompts), max_new_tokens=6, temperature=0,
                            output=str(root / "samples.jsonl")))
    model = {"preset": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
             "max_seq_len": 128}
    tune(TuneConfig(
        pretrain={"data": str(root / "data"), "output": str(root / "target"), "model": model, "num_workers": 1,
                  "zero_stage": 0, "global_batch_size": 8, "micro_batch_size": 8, "max_steps": 40, "warmup_steps": 4},
        proxy={"d_model": 32, "n_heads": 2, "n_kv_heads": 1}, output=str(root / "tune"), searcher="grid",
        num_samples=2, search={"lr": [1e-3, 1e-2]},
        trial={"max_steps": 4, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1}))
    return root


class Page(HTMLParser):
    """The report's elements, each with its attributes, text and the ids of its enclosing elements."""

    VOID = {"meta", "img", "br", "hr", "input", "link", "use", "path", "rect", "circle", "line", "stop"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self.stack: list[dict] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        parents = [{**p["attrs"], "<tag>": p["tag"]} for p in self.stack]
        el = {"tag": tag, "attrs": dict(attrs), "text": "", "parents": parents}
        self.elements.append(el)
        if tag not in self.VOID:
            self.stack.append(el)

    def handle_startendtag(self, tag, attrs):
        parents = [{**p["attrs"], "<tag>": p["tag"]} for p in self.stack]
        self.elements.append({"tag": tag, "attrs": dict(attrs), "text": "", "parents": parents})

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i]["tag"] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        for el in self.stack:
            el["text"] += data

    def find(self, tag: str | None = None, within: dict | None = None, **attrs) -> list[dict]:
        """Elements with these attributes (`_` for `-`), optionally inside an element with `within`'s attributes."""
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        out = []
        for el in self.elements:
            if tag and el["tag"] != tag:
                continue
            if any(el["attrs"].get(k) != v for k, v in want.items()):
                continue
            inside = {k.replace("_", "-"): v for k, v in (within or {}).items()}
            if within and not any(all(p.get(k) == v for k, v in inside.items()) for p in el["parents"]):
                continue
            out.append(el)
        return out


def cells(page: Page, within: dict) -> list[str]:
    return [td["text"] for td in page.find("td", within=within)]


def path_points(d: str) -> int:
    """Vertices of an SVG path written by matplotlib (`M x y L x y ...`)."""
    return len(re.findall(r"[ML]\s*-?[\d.]+\s+-?[\d.]+", d))


@pytest.fixture(scope="module")
def report(pipeline) -> tuple[str, Page]:
    from jobs.report import write_report

    uri = write_report(str(pipeline))
    assert uri == str(pipeline / "report.html")
    html = (pipeline / "report.html").read_text()
    return html, Page(html)


# ----------------------------------------------------------------------------- content


def test_sections_found_and_nothing_malformed(report):
    html, page = report
    assert not page.find(id="problems"), [e["text"] for e in page.find("li", within={"id": "problems"})]
    kinds = sorted((a["attrs"]["data-kind"], a["attrs"]["data-path"]) for a in page.find("article"))
    assert kinds == [("data", "data"), ("run", "pretrain"), ("run", "sft"), ("samples", "samples.jsonl"),
                     ("sweep", "tune")]
    assert page.find("section", id="evaluation") and page.find("section", id="lineage")


def test_funnel_matches_report_json(pipeline, report):
    _, page = report
    rep = json.loads((pipeline / "data" / "report.json").read_text())
    rows = page.find("tr", within={"data_kind": "data"})
    funnel = [r for r in rows if "data-stage" in r["attrs"]]
    assert [r["attrs"]["data-stage"] for r in funnel] == [s["stage"] for s in rep["funnel"]]
    for want in rep["funnel"]:
        cells = {c["attrs"]["data-field"]: int(c["attrs"]["data-value"])
                 for c in page.find("td", within={"data_stage": want["stage"]}) if "data-field" in c["attrs"]}
        assert cells == {"in": want["documents_in"], "out": want["documents_out"]}
        dropped = {s["attrs"]["data-reason"]: int(s["attrs"]["data-value"])
                   for s in page.find("span", within={"data_stage": want["stage"]}) if "data-reason" in s["attrs"]}
        assert dropped == want["dropped"]
    # the chart: one kept bar per stage, labelled "in -> out" with the same numbers
    chart = {"data_chart": "funnel"}
    kept = [g for g in page.find("g", within=chart) if re.search(r"-funnel-kept-\d+$", g["attrs"].get("id", ""))]
    assert len(kept) == len(rep["funnel"])
    labels = sorted(t["text"] for t in page.find("text", within=chart) if "→" in t["text"])
    assert labels == sorted(f"{s['documents_in']:,} → {s['documents_out']:,}" for s in rep["funnel"])
    assert any(s["dropped"] for s in rep["funnel"])  # the corpus has rejects: the reasons are exercised
    tokens = {split: int(td["attrs"]["data-value"]) for split in ("train", "val")
              for td in page.find("td", within={"data_split": split}, data_field="tokens")}
    assert tokens == {"train": rep["output"]["train_tokens"], "val": rep["output"]["val_tokens"]}


def test_loss_chart_has_every_step(pipeline, report):
    _, page = report
    history = [json.loads(x) for x in (pipeline / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert _points_in(page, "pretrain", "loss", "train-loss") == len(history) == 30
    assert _points_in(page, "pretrain", "loss", "val-loss") == sum("val_loss" in h for h in history)
    assert _points_in(page, "pretrain", "lr", "lr") == len(history)
    assert _points_in(page, "pretrain", "grad-norm", "grad-norm") == len(history)
    assert _points_in(page, "pretrain", "throughput", "tokens-per-s") == len(history)
    # the unigram baseline of the data manifest, as a horizontal line
    assert _points_in(page, "pretrain", "loss", "unigram") == 2
    # post-training run: its own loss and eval loss
    sft_hist = [json.loads(x) for x in (pipeline / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert _points_in(page, "sft", "loss", "train-loss") == len(sft_hist) == 4
    assert _points_in(page, "sft", "loss", "eval-loss") == 2


def _points_in(page: Page, run_path: str, chart: str, gid: str) -> int:
    figs = [f for f in page.find("figure", within={"data_path": run_path}) if f["attrs"].get("data-chart") == chart]
    assert len(figs) == 1, f"{run_path}: {len(figs)} {chart} charts"
    svg_ids = [e["attrs"]["id"] for e in page.find("g", within={"data_path": run_path})
               if e["attrs"].get("id", "").endswith("-" + gid)
               and any(p.get("data-chart") == chart for p in e["parents"])]
    assert len(svg_ids) == 1, f"{run_path}/{chart}: {svg_ids}"
    # the series' own path; a marker's shape is a path too, defined once in <defs>
    paths = [p for p in page.find("path", within={"id": svg_ids[0]}) if all(q["<tag>"] != "defs" for q in p["parents"])]
    return sum(path_points(p["attrs"]["d"]) for p in paths)


def test_checkpoints_verified_and_summary(report):
    _, page = report
    rows = page.find("tr", within={"data_path": "pretrain"})
    ckpts = [r["attrs"] for r in rows if "data-checkpoint" in r["attrs"]]
    assert ckpts == [{"data-checkpoint": "checkpoint_0000030", "data-status": "verified"}]


def test_eval_table_by_stage_with_wilson_intervals(pipeline, report):
    _, page = report
    results = json.loads((pipeline / "eval" / "results.json").read_text())["results"]
    heads = [th["attrs"].get("data-stage") for th in page.find("th", within={"id": "evaluation"})][2:]
    assert heads == ["base", "SFT"]
    for task, metric in (("speaker", "accuracy"), ("speaker", "accuracy_norm"), ("count_words", "exact_match")):
        row = {"data_task": task, "data_metric": metric}
        values = [float(td["attrs"]["data-value"]) for td in page.find("td", within=row) if "data-value" in td["attrs"]]
        assert values == [pytest.approx(r["tasks"][task][metric], abs=5e-4) for r in results]
        cis = [td["attrs"]["data-ci"] for td in page.find("td", within=row) if "data-ci" in td["attrs"]]
        for r, ci in zip(results, cis):
            n = r["tasks"][task]["items"]
            k = round(r["tasks"][task][metric] * n)
            # Wilson score interval, written out here: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
            z, p = 1.959963984540054, k / n
            mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
            lo, hi = (mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n)
            assert ci == f"{lo:.3f}–{hi:.3f}"
    lm = [float(td["attrs"]["data-value"]) for td in page.find("td", within={"data_metric": "loss"})
          if "data-value" in td["attrs"]]
    assert lm == [pytest.approx(r["lm"]["loss"], abs=1e-4) for r in results]


def test_hostile_text_is_escaped_and_no_external_request(pipeline, report):
    html, page = report
    samples = [json.loads(x) for x in (pipeline / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"] == HOSTILE
    # shown as text ...
    assert any(HOSTILE in e["text"] for e in page.find("pre"))
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    # ... never as markup: no script element, no img outside data: URIs, no event handler
    assert not page.find("script") and "<script" not in html.lower()
    assert all(i["attrs"].get("src", "").startswith("data:") for i in page.find("img"))
    assert not any(k.startswith("on") for e in page.elements for k in e["attrs"])
    # no request leaves the page: no http(s) src/href, no stylesheet links, no CSS url() to the network
    assert not [e for e in page.elements for k in ("src", "href", "xlink:href", "action")
                if re.match(r"\s*(https?:)?//", e["attrs"].get(k) or "")]
    assert not page.find("link") and not re.search(r"url\(\s*['\"]?\s*(https?:)?//", html)
    csp = page.find("meta", http_equiv="Content-Security-Policy")
    assert csp and "default-src 'none'" in csp[0]["attrs"]["content"]


def test_sweep_trials_and_plot(pipeline, report):
    _, page = report
    trials = list(csv.DictReader((pipeline / "tune" / "trials.csv").open()))
    assert [th["text"] for th in page.find("th", within={"class": "trials"})] == list(trials[0])
    body = page.find("tr", within={"class": "trials"})[1:]
    assert len(body) == len(trials) == 2
    for tr, t in zip(body, trials):
        assert tr["attrs"]["data-trial"] == t["trial_id"]
        shown = dict(zip(t, [td["text"] for td in page.find("td", within={"data_trial": t["trial_id"]})]))
        for col, value in t.items():  # as in trials.csv, floats to 5 significant digits
            if col != "trial_id" and re.fullmatch(r"-?\d+\.\d*(e-?\d+)?|-?\d+e-?\d+", value):
                assert float(shown[col]) == pytest.approx(float(value), rel=1e-4)
            else:
                assert shown[col] == value
    sweep = json.loads((pipeline / "tune" / "sweep.json").read_text())
    best = [tr for tr in body if tr["attrs"].get("data-best")]
    assert len(best) == 1 and sweep["best"]["trial_id"] in best[0]["text"]
    charts = [f["attrs"]["data-chart"] for f in page.find("figure", within={"data_path": "tune"})]
    assert charts == ["sweep", "trial-curves"]
    statuses = sorted(g["attrs"]["id"].split("-trials-")[1] for g in page.find("g", within={"data_path": "tune"})
                      if "-trials-" in g["attrs"].get("id", ""))
    assert statuses == sorted({t["status"] for t in trials} | {"best"})


def test_lineage_links_parents_and_hashes(pipeline, report):
    _, page = report
    manifest_bytes = (pipeline / "data" / "manifest.json").read_bytes()
    import hashlib

    manifest = json.loads(manifest_bytes)
    sha = hashlib.sha256(manifest_bytes).hexdigest()
    rows = {tr["attrs"]["data-anchor"]: tr for tr in page.find("tr", within={"id": "lineage"})
            if "data-anchor" in tr["attrs"]}
    anchors = {e["attrs"]["data-path"]: e["attrs"]["id"] for e in page.elements if "data-kind" in e["attrs"]}

    def cells(path):
        return [td["attrs"].get("data-sha") for td in page.find("td", within={"data_anchor": anchors[path]})
                if "data-sha" in td["attrs"]]

    def parents(path):
        return [(a["attrs"]["href"], a["text"]) for a in page.find("a", within={"data_anchor": anchors[path]})][1:]

    assert set(rows) == set(anchors.values())
    assert cells("data") == [manifest["config_sha256"], sha, manifest["tokenizer_sha256"]]
    pre_cfg = json.loads((pipeline / "pretrain" / "config.json").read_text())
    assert cells("pretrain") == [hashlib.sha256(json.dumps(pre_cfg, sort_keys=True).encode()).hexdigest(), sha,
                                 manifest["tokenizer_sha256"]]
    assert parents("pretrain") == [(f"#{anchors['data']}", "data: data")]
    assert cells("sft")[2] == manifest["tokenizer_sha256"]
    assert parents("sft") == [(f"#{anchors['pretrain']}", "init from: pretrain (checkpoint_0000030)")]
    assert [h for h, _ in parents("samples.jsonl")] == [f"#{anchors['sft']}"]
    assert [h for h, _ in parents("tune")] == [f"#{anchors['data']}"]
    assert [h for h, _ in parents("eval")] == [f"#{anchors[p]}" for p in ("pretrain", "sft", "data")]
    assert all(page.find(id=a) for a in anchors.values())  # every link of the lineage leads somewhere


# ----------------------------------------------------------------------------- damaged outputs


def test_corrupt_checkpoint_is_not_verified(pipeline, tmp_path):
    from jobs.checkpoint.layout import verify_checkpoint
    from jobs.report import build_html

    run = tmp_path / "pretrain"
    shutil.copytree(pipeline / "pretrain", run)
    shutil.copytree(pipeline / "sft", tmp_path / "sft")
    ck = run / "checkpoint_0000030"
    shard = max((ck / "deepspeed").rglob("*.pt"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-100])  # torn: truncated
    (sft_ck,) = [p for p in (tmp_path / "sft").glob("checkpoint_*") if p.is_dir()]
    (sft_ck / "MANIFEST.rank0.json").unlink()  # an unfinished write
    page = Page(build_html(str(tmp_path)))
    rows = {tr["attrs"]["data-checkpoint"]: tr for tr in page.find("tr") if "data-checkpoint" in tr["attrs"]}
    assert rows["checkpoint_0000030"]["attrs"]["data-status"] == "failed"
    assert "not verified" in rows["checkpoint_0000030"]["text"]
    assert f"checksum mismatch in {shard.relative_to(ck)}" in rows["checkpoint_0000030"]["text"]
    assert "skipped: no complete checkpoint" in rows["checkpoint_0000030"]["text"]
    assert rows[sft_ck.name]["attrs"]["data-status"] == "failed"
    assert "MANIFEST.rank0.json is missing" in rows[sft_ck.name]["text"]
    # the verdicts are the resume logic's (jobs.pretrain.verify_checkpoint)
    assert "checksum mismatch" in verify_checkpoint(str(ck)) and verify_checkpoint(str(sft_ck)) is not None
    assert verify_checkpoint(str(pipeline / "pretrain" / "checkpoint_0000030")) is None


def test_malformed_files_are_named_and_the_rest_is_shown(pipeline, tmp_path):
    from jobs.report import build_html

    for d in ("data", "pretrain", "eval", "tune"):
        shutil.copytree(pipeline / d, tmp_path / d, ignore=shutil.ignore_patterns("checkpoint_*", "*.npy", "trials"))
    (tmp_path / "data" / "report.json").write_text('{"funnel": [')  # torn write
    metrics = (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()
    metrics[5] = "{not json"
    metrics[7] = json.dumps({"step": "eight", "loss": 1.0})
    (tmp_path / "pretrain" / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    res["results"][0]["tasks"]["speaker"]["items"] = "many"
    (tmp_path / "eval" / "results.json").write_text(json.dumps(res))
    (tmp_path / "tune" / "sweep.json").write_text("[1, 2]")
    (tmp_path / "samples.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\x00\xff{{\n")
    (tmp_path / "elsewhere").symlink_to(pipeline / "sft")  # a link out of the root is not followed

    page = Page(build_html(str(tmp_path)))
    problems = [li["text"] for li in page.find("li", within={"id": "problems"})]
    assert any(p.startswith("data/report.json: not valid JSON") for p in problems), problems
    assert "pretrain/metrics.jsonl:6: not valid JSON (Expecting property name enclosed in double quotes)" in problems
    assert "pretrain/metrics.jsonl: a record without an integer `step` skipped" in problems
    assert any(p.startswith("eval/results.json: results.0.tasks.speaker.items: Input should be a valid integer")
               for p in problems), problems
    assert "tune/sweep.json: expected a JSON object, got list" in problems or \
        any(p.startswith("tune/sweep.json:") for p in problems), problems
    assert any(p.startswith("samples.jsonl:2: not valid JSON") for p in problems), problems
    # the rest is still there: the manifest's numbers, the loss curve without the two bad records
    assert page.find("tr", data_split="train")
    assert _points_in(page, "pretrain", "loss", "train-loss") == 28
    assert page.find("section", id="evaluation") and not page.find("table", **{"class": "eval"})  # no usable scores
    assert all(str(tmp_path) not in p for p in problems)  # files named relative to the root
    assert sorted(a["attrs"]["data-path"] for a in page.find("article")) == ["data", "pretrain", "samples.jsonl", "tune"]


def test_world_size_changes_are_shown(pipeline, tmp_path):
    """An elastic run that lost a worker: jobs.pretrain records world_size on every step (the real
    elastic run is tests/test_pretrain.py's; here its record is made by editing a real metrics.jsonl)."""
    from jobs.report import build_html

    shutil.copytree(pipeline / "pretrain", tmp_path / "pretrain", ignore=shutil.ignore_patterns("checkpoint_*"))
    history = [json.loads(x) for x in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    for h in history:
        h["world_size"] = 2 if h["step"] <= 10 else 1 if h["step"] <= 20 else 2
    (tmp_path / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    page = Page(build_html(str(tmp_path)))
    changes = [(int(tr["attrs"]["data-step"]), cells(page, {"data_step": tr["attrs"]["data-step"]}))
               for tr in page.find("tr") if "data-step" in tr["attrs"]]
    assert changes == [(11, ["11", "2", "1"]), (21, ["21", "1", "2"])]
    assert _points_in(page, "pretrain", "world-size", "world-size") > 0


# ----------------------------------------------------------------------------- entry points and storage


def test_torch_free_and_the_module_cli(pipeline, tmp_path):
    out = tmp_path / "r.html"
    code = ("import runpy, sys; sys.argv = ['jobs.report', sys.argv[1], '--output', sys.argv[2]]\n"
            "try:\n    runpy.run_module('jobs.report', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'ray'))\n"
            "assert not bad, bad[:10]\n")
    r = subprocess.run([sys.executable, "-c", code, str(pipeline), str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == str(out) and out.read_text().startswith("<!doctype html>")
    r = subprocess.run([sys.executable, "-m", "jobs.report", str(tmp_path / "nope")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and f"{tmp_path / 'nope'}: no such directory" in r.stderr


def test_raylm_report_command_builds_a_local_path(pipeline, tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    out = tmp_path / "cli.html"
    r = CliRunner().invoke(app, ["report", str(pipeline / "pretrain"), "--output", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    page = Page(out.read_text())
    assert [a["attrs"]["data-path"] for a in page.find("article")] == ["."]  # the run itself is the root


def test_report_of_an_s3_prefix(pipeline, s3):
    from cluster import storage
    from jobs.report import write_report

    for d in ("data", "pretrain"):
        storage.copy_dir(str(pipeline / d), f"s3://raylm/runs/demo/{d}")
    uri = write_report("s3://raylm/runs/demo")
    assert uri == "s3://raylm/runs/demo/report.html"
    page = Page(storage.read_text(uri))
    assert not page.find(id="problems")
    assert [a["attrs"]["data-path"] for a in page.find("article")] == ["data", "pretrain"]
    assert [r["attrs"]["data-status"] for r in page.find("tr") if "data-checkpoint" in r["attrs"]] == ["verified"]
    assert _points_in(page, "pretrain", "loss", "train-loss") == 30


def test_raylm_report_of_a_job_through_the_api(pipeline, tmp_path):
    """`raylm report JOB_ID` against the control API (uvicorn on loopback, a SQLite file): a job's
    report.html artifact when it has one, else a page built from its downloaded artifacts. The job
    record is written into the store directly (a finished job; no Ray cluster is involved)."""
    import secrets
    import socket
    import time

    import httpx
    import yaml
    from typer.testing import CliRunner

    from jobs.report import write_report
    from service.cli import app
    from service.db import Event, Job, session_factory

    ws = tmp_path / "ws"
    run = ws / "alice" / "run"
    shutil.copytree(pipeline / "pretrain", run)
    (run / "report.html").unlink()  # the pretraining job wrote one; first the page built from artifacts
    (ws / "bob").mkdir()
    tokens = {t: secrets.token_urlsafe(16) for t in ("alice", "bob")}
    (ws / "tokens.yaml").write_text(yaml.safe_dump({"tenants": {
        t: {"tokens": [tok], "prefixes": [str(ws / t)]} for t, tok in tokens.items()}}))
    db = f"sqlite:///{ws}/service.db"
    with session_factory(db)() as s:
        t = time.time()
        job = Job(id="j0123456789abcde", tenant="alice", kind="pretrain", status="SUCCEEDED",
                  spec={"kind": "pretrain", "output": str(run)}, spec_sha256="0" * 64, submission_id="raylm-j0123",
                  resources={"CPU": 1}, lineage={}, finalized=True, created_at=t, started_at=t, ended_at=t,
                  updated_at=t)
        job.events.append(Event(status="SUCCEEDED", at=t))
        s.add(job)
        s.commit()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "RAYLM_DATABASE_URL": db, "RAYLM_TOKENS_FILE": str(ws / "tokens.yaml"),
           "RAYLM_RAY_ADDRESS": "http://127.0.0.1:9", "RAYLM_ARTIFACTS": str(ws / "artifacts")}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port",
                               str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/v1/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the API did not start"
            time.sleep(0.3)

        def cli(tenant, *args):
            return CliRunner().invoke(app, ["report", *args], env={"RAYLM_URL": url, "RAYLM_TOKEN": tokens[tenant]},
                                      catch_exceptions=False)

        # no report.html among the artifacts: built from them (no shards or weights downloaded)
        out = tmp_path / "built.html"
        r = cli("alice", "j0123456789abcde", "--output", str(out))
        assert r.exit_code == 0, r.output
        page = Page(out.read_text())
        assert not page.find(id="problems")
        assert [a["attrs"]["data-path"] for a in page.find("article")] == ["."]
        assert str(run) in page.find("div", **{"class": "mono"})[0]["text"]
        assert [r["attrs"]["data-status"] for r in page.find("tr") if "data-checkpoint" in r["attrs"]] == \
            ["not checked"]
        assert _points_in(page, ".", "loss", "train-loss") == 30
        # the job's own report.html, as it is
        write_report(str(run))
        out2 = tmp_path / "artifact.html"
        r = cli("alice", "j0123456789abcde", "--output", str(out2))
        assert r.exit_code == 0, r.output
        assert out2.read_bytes() == (run / "report.html").read_bytes()
        # another tenant does not see the job
        r = cli("bob", "j0123456789abcde", "--output", str(tmp_path / "bob.html"))
        assert r.exit_code == 2 and "not found" in r.output and not (tmp_path / "bob.html").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)
