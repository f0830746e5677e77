"""What raylm's jobs wrote under a directory, found by the files each output holds, read into the
sections of the report.

    data       a jobs.prepare output: report.json, or manifest.json + tokenizer.json
    run        a jobs.pretrain / sft / dpo / reward run: metrics.jsonl, config.json, checkpoint_*/
    sweep      a jobs.tune output: trials.csv, sweep.json, tune_config.json
    eval       a jobs.evaluate output: results.json
    samples    a jobs.generate output: a JSONL file whose records have a `completion`

A directory recognised as one output owns everything below it (a sweep's trials are not runs of
their own). Whatever cannot be read becomes a problem naming the file; its section, or the part of
it, is left out.
"""

from __future__ import annotations

import functools
import hashlib
import json
import posixpath
import statistics
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster import storage
from jobs.report.charts import Chart, Charts, Series, finite
from jobs.checkpoint.layout import TRAIN_STATE, verify_checkpoint
from jobs.report.files import ReportError, Tree, parent_dir

# File names of the jobs' outputs (jobs.prepare, jobs.pretrain, jobs.tune, jobs.evaluate), spelled
# out here: importing those modules would import torch and Ray.
SHARDS_FORMAT = "raylm.shards/1"
CHECKPOINT_PREFIX = "checkpoint_"
# Directories inside an output that hold no output of their own.
INNER_DIRS = ("tensorboard", "rejects", "tuner", "trials", "state", "deepspeed")
MAX_SAMPLE_FILES = 100
SAMPLES_SHOWN = 6
EXAMPLES_SHOWN = 12
STAGE_OF_KIND = {None: "base", "pretrain": "base", "sft": "SFT", "dpo": "DPO", "rl": "RL", "grpo": "RL", "ppo": "RL",
                 "reward": "reward model"}
STAGE_ORDER = ("base", "SFT", "DPO", "RL")


# ----------------------------------------------------------------------------- sections


@dataclass
class Link:
    """A parent an output records: the section it is in this report (anchor), or only the recorded text."""

    text: str
    anchor: str | None = None


@dataclass
class Section:
    kind: str
    rel: str
    """Directory (a file, for samples) relative to the root; "" is the root itself."""
    anchor: str = ""
    uri: str = ""
    problems: list[str] = field(default_factory=list)
    config_sha256: str | None = None
    data_manifest_sha256: str | None = None
    tokenizer_sha256: str | None = None
    parents: list[Link] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Lineage remarks: hashes that disagree with a parent's."""
    config: dict = field(default_factory=dict)
    """The resolved config the job saved (what its lineage is read from)."""

    @property
    def label(self) -> str:
        return self.rel or "."


@dataclass
class DataSection(Section):
    manifest: dict = field(default_factory=dict)
    funnel: list[dict] = field(default_factory=list)
    summary: list[tuple[str, Any]] = field(default_factory=list)
    splits: list[dict] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)
    dedup: list[tuple[str, Any]] = field(default_factory=list)
    unigram_val_loss: float | None = None
    chart: Chart | None = None


@dataclass
class CheckpointRow:
    name: str
    step: int | None
    world_size: int | None
    files: int
    bytes: int
    status: str
    """`verified`, `failed` or `not checked`."""
    reason: str = ""
    role: str = ""


@dataclass
class RunSection(Section):
    job: str = "pretrain"
    stage: str = "base"
    metrics_file: str | None = None
    records: int = 0
    summary: list[tuple[str, Any]] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    checkpoints: list[CheckpointRow] = field(default_factory=list)
    world_changes: list[dict] = field(default_factory=list)
    unigram_val_loss: float | None = None
    history: list[dict] = field(default_factory=list)
    """The metrics records (drawn once the lineage has found the run's data and its unigram loss)."""
    states: dict[str, TrainState] = field(default_factory=dict)
    """train_state.json of each checkpoint, newest first."""


@dataclass
class SweepSection(Section):
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    best_trial: str | None = None
    summary: list[tuple[str, Any]] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    png: str | None = None
    """loss_vs_lr.png as base64, when there is no trials.csv to draw from."""


@dataclass
class EvalSection(Section):
    results: list[dict] = field(default_factory=list)


@dataclass
class SamplesSection(Section):
    total: int = 0
    rows: list[dict] = field(default_factory=list)


@dataclass
class EvalColumn:
    stage: str
    label: str
    step: int | None
    checkpoint: str
    anchor: str | None


@dataclass
class EvalCell:
    value: str
    ci: str = ""
    n: int | None = None


@dataclass
class EvalRow:
    task: str
    metric: str
    note: str
    cells: list[EvalCell | None]


@dataclass
class EvalTable:
    columns: list[EvalColumn]
    rows: list[EvalRow]
    examples: list[dict]


@dataclass
class Report:
    root: str
    data: list[DataSection] = field(default_factory=list)
    runs: list[RunSection] = field(default_factory=list)
    sweeps: list[SweepSection] = field(default_factory=list)
    evals: list[EvalSection] = field(default_factory=list)
    samples: list[SamplesSection] = field(default_factory=list)
    eval_table: EvalTable | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def sections(self) -> list[Section]:
        return [*self.data, *self.runs, *self.sweeps, *self.evals, *self.samples]

    @property
    def pretrain_runs(self) -> list[RunSection]:
        return [r for r in self.runs if r.job == "pretrain"]

    @property
    def posttrain_runs(self) -> list[RunSection]:
        return [r for r in self.runs if r.job != "pretrain"]


# ----------------------------------------------------------------------------- file schemas
#
# Only the fields the report shows; a field of the wrong type is a problem naming the file and field.


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunnelRow(_Lenient):
    stage: str
    documents_in: int
    documents_out: int
    dropped: dict[str, int] = {}


class PrepareReport(_Lenient):
    config_sha256: str | None = None
    cpus: int | None = None
    seconds: float | None = None
    input: dict[str, int] = {}
    output: dict[str, int] = {}
    funnel: list[FunnelRow] = []
    timings: dict[str, dict[str, Any]] = {}


class Shard(_Lenient):
    file: str
    sequences: int
    tokens: int
    documents: int
    bytes: int | None = None


class Split(_Lenient):
    shards: list[Shard] = []
    sequences: int = 0
    tokens: int = 0
    documents: int = 0


class DataManifest(_Lenient):
    format: str
    seq_len: int
    dtype: str | None = None
    vocab_size: int
    tokenizer_sha256: str | None = None
    config_sha256: str | None = None
    inputs: list[dict] = []
    splits: dict[str, Split] = {}
    stats: dict[str, float] = {}
    unigram_val_loss: float | None = None


class TrainState(_Lenient):
    step: int | None = None
    world_size: int | None = None
    kind: str | None = None
    config: dict = {}
    init_from: str | None = None
    tokenizer_sha256: str | None = None
    data_manifest_sha256: str | None = None


class TaskResult(_Lenient):
    items: int = Field(ge=0)
    accuracy: float | None = None
    accuracy_norm: float | None = None
    chance: float | None = None
    exact_match: float | None = None
    examples: list[dict] = []


class LMResult(_Lenient):
    loss: float
    perplexity: float | None = None
    bits_per_byte: float | None = None
    sequences: int | None = None
    tokens: int | None = None


class CheckpointResult(_Lenient):
    checkpoint: str
    kind: str | None = None
    step: int | None = None
    chat: bool = False
    label: str | None = None
    lm: LMResult | None = None
    tasks: dict[str, TaskResult] = {}


class EvalResults(_Lenient):
    config: dict = {}
    results: list[CheckpointResult]


class SweepSummary(_Lenient):
    trials: int | None = None
    wall_s: float | None = None
    status: dict[str, int] = {}
    best: dict | None = None
    width_ratio: float | None = None
    target_lr: float | None = None


def parse(model: type[BaseModel], obj: Any, rel: str):
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<top level>"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ReportError(f"{rel}: {where}: {first['msg']}{more}") from None


def config_sha256(config: dict) -> str:
    """The hash JobConfig.sha256 gives the config a job saved (its resolved fields, as JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- detection


def detect(tree: Tree) -> list[tuple[str, str]]:
    """(kind, directory or file) of every output under the root, outermost first."""
    names: dict[str, set[str]] = {}
    for rel in tree.sizes:
        names.setdefault(parent_dir(rel), set()).add(posixpath.basename(rel))
    with_checkpoints = {parent_dir(d) for d, here in names.items()
                        if posixpath.basename(d).startswith(CHECKPOINT_PREFIX) and TRAIN_STATE in here}
    found: list[tuple[str, str]] = []
    owned: dict[str, str] = {}  # directory of an output -> its kind: nothing below it is an output of its own
    for d in sorted(names, key=lambda d: (d.count("/") + bool(d), d)):
        if _owner(d, owned):
            continue
        kind = _kind_of(d, names[d], d in with_checkpoints)
        if kind:
            owned[d] = kind
            if kind != "other":
                found.append((kind, d))
    candidates = [rel for rel in tree.sizes if _may_hold_samples(rel, owned)]
    for rel in candidates[:MAX_SAMPLE_FILES]:
        if _is_samples(tree, rel):
            found.append(("samples", rel))
    return found


def _owner(d: str, owned: dict[str, str]) -> str | None:
    """The kind of the output that directory `d` is part of, if any."""
    return next((k for o, k in owned.items() if not o or d == o or d.startswith(o + "/")), None)


def _kind_of(d: str, here: set[str], has_checkpoints: bool) -> str | None:
    base = posixpath.basename(d)
    if base.startswith(CHECKPOINT_PREFIX) or base in INNER_DIRS:
        return None
    if "report.json" in here or {"manifest.json", "tokenizer.json"} <= here:
        return "data"
    if {"sweep.json", "trials.csv", "tune_config.json"} & here:
        return "sweep"
    if "results.json" in here:
        return "eval"
    if "metrics.jsonl" in here or has_checkpoints:
        return "run"
    if "manifest.json" in here and "sft_train.jsonl" in here:
        return "other"  # jobs.tasks output: training data and eval items, not results
    if "model.safetensors" in here:
        return "other"  # an HF export
    return None


def _may_hold_samples(rel: str, owned: dict[str, str]) -> bool:
    """A JSONL file that may be a jobs.generate output: not a run's metrics, not inside a
    checkpoint, and not the training data of a data or tasks output."""
    if not rel.endswith(".jsonl") or posixpath.basename(rel) in ("metrics.jsonl", "attempts.jsonl"):
        return False
    if any(p.startswith(CHECKPOINT_PREFIX) or p in INNER_DIRS for p in rel.split("/")[:-1]):
        return False
    return _owner(parent_dir(rel), owned) not in ("data", "other")


def _is_samples(tree: Tree, rel: str) -> bool:
    try:
        head = tree.head(rel).decode("utf-8", errors="replace")
    except ReportError:
        return False
    first = next((ln for ln in head.splitlines() if ln.strip()), "")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "completion" in obj


# ----------------------------------------------------------------------------- collection


def collect(root: str, verify_checkpoints: bool = True, origin: str | None = None) -> Report:
    """Everything the report shows about the outputs under `root` (a directory or s3:// prefix).

    `origin`: where these files were written, when `root` holds a copy (a job's artifacts
    downloaded through the API): the paths the outputs record of each other are read against it.
    """
    tree = Tree.scan(root)
    report = Report(root=origin or root)
    base = origin.rstrip("/") if origin else tree.uri
    charts = Charts()
    readers = {"data": _data, "run": functools.partial(_run, verify_checkpoints=verify_checkpoints),
               "sweep": _sweep, "eval": _eval, "samples": _samples}
    for kind, rel in detect(tree):
        try:
            section = readers[kind](tree, rel, charts)
        except Exception as e:  # noqa: BLE001 (one unreadable output must not cost the others their report)
            report.problems.append(_unexpected(rel, e))
            continue
        section.uri = f"{base}/{rel}" if rel else base
        section.anchor = f"{kind}-{len(report.sections)}"
        {"data": report.data, "run": report.runs, "sweep": report.sweeps, "eval": report.evals,
         "samples": report.samples}[kind].append(section)
    _link(report)
    for run in report.runs:
        try:
            run.charts = _run_charts(run, charts, run.history)
        except Exception as e:  # noqa: BLE001
            run.problems.append(_unexpected(run.rel, e))
    try:
        report.eval_table = _eval_table(report)
    except Exception as e:  # noqa: BLE001
        report.problems.append(_unexpected("evaluation table", e))
    for s in report.sections:
        report.problems += s.problems
    # an OSError names the file with the machine's path: the page names files relative to the root
    for problems in (report.problems, *(s.problems for s in report.sections)):
        problems[:] = [p.replace(tree.uri + "/", "").replace(tree.uri, ".") for p in problems]
    return report


def _unexpected(what: str, e: Exception) -> str:
    """A problem for an error no file check foresaw."""
    return f"{what or '.'}: not shown ({type(e).__name__}: {e})"


def _guard(section: Section, fn, *args):
    """Run one reader of a section's part; a file it cannot use becomes a problem, the rest goes on."""
    try:
        return fn(*args)
    except ReportError as e:
        section.problems.append(str(e))
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
        # a file of the right shape with values no job writes (a negative count, a string step...)
        section.problems.append(f"{section.label}: unusable content ({type(e).__name__}: {e})")
    return None


# ----------------------------------------------------------------------------- data


def _data(tree: Tree, rel: str, charts: Charts) -> DataSection:
    s = DataSection(kind="data", rel=rel)
    j = lambda name: posixpath.join(rel, name)  # noqa: E731
    if tree.exists(j("manifest.json")):
        _guard(s, _data_manifest, s, tree, j("manifest.json"))
    else:
        s.problems.append(f"{j('manifest.json')}: missing (the prepare job did not finish)")
    if tree.exists(j("report.json")):
        _guard(s, _data_report, s, tree, j("report.json"), charts)
    return s


def _data_manifest(s: DataSection, tree: Tree, rel: str) -> None:
    raw = tree.read_bytes(rel)
    m = parse(DataManifest, tree.read_json(rel), rel)
    if m.format != SHARDS_FORMAT:
        raise ReportError(f"{rel}: format {m.format!r}, expected {SHARDS_FORMAT!r}")
    s.data_manifest_sha256 = hashlib.sha256(raw).hexdigest()
    s.tokenizer_sha256 = m.tokenizer_sha256
    s.config_sha256 = s.config_sha256 or m.config_sha256
    s.unigram_val_loss = m.unigram_val_loss
    s.manifest = m.model_dump()
    for name, sp in m.splits.items():
        s.splits.append({"split": name, "documents": sp.documents, "sequences": sp.sequences, "tokens": sp.tokens,
                         "shards": len(sp.shards), "bytes": sum(x.bytes or 0 for x in sp.shards)})
    s.summary += [("vocabulary", m.vocab_size), ("sequence length", m.seq_len), ("token dtype", m.dtype),
                  ("input files", len(m.inputs)), ("unigram val loss", m.unigram_val_loss)]


def _data_report(s: DataSection, tree: Tree, rel: str, charts: Charts) -> None:
    r = parse(PrepareReport, tree.read_json(rel), rel)
    s.config_sha256 = r.config_sha256 or s.config_sha256
    s.funnel = [row.model_dump() for row in r.funnel]
    s.chart = charts.funnel(s.funnel)
    s.summary = [("documents in", r.input.get("documents")), ("raw bytes in", r.input.get("raw_bytes")),
                 ("documents out", r.output.get("documents")), ("tokens", r.output.get("tokens")),
                 ("train tokens", r.output.get("train_tokens")), ("val tokens", r.output.get("val_tokens")),
                 *s.summary, ("CPUs", r.cpus), ("seconds", r.seconds)]
    s.timings = [(name, t.get("seconds")) for name, t in r.timings.items() if isinstance(t, dict)]
    dropped = {reason: n for row in r.funnel for reason, n in row.dropped.items()}
    fuzzy = next((t for name, t in r.timings.items() if name.startswith("fuzzy") and isinstance(t, dict)), None)
    s.dedup = [("exact duplicates removed", dropped.get("exact_duplicate", 0)),
               ("near duplicates removed", dropped.get("near_duplicate", 0))]
    if fuzzy:
        s.dedup += [("near-duplicate clusters", fuzzy.get("components")),
                    ("documents in clusters", fuzzy.get("documents_in_components")),
                    ("candidate pairs (LSH edges)", fuzzy.get("edges")),
                    ("LSH bands x rows", f"{fuzzy.get('bands')} x {fuzzy.get('rows')}")]


# ----------------------------------------------------------------------------- runs


def _run(tree: Tree, rel: str, charts: Charts, verify_checkpoints: bool = True) -> RunSection:
    s = RunSection(kind="run", rel=rel)
    j = lambda name: posixpath.join(rel, name)  # noqa: E731
    config = _guard(s, tree.read_json, j("config.json")) if tree.exists(j("config.json")) else None
    files = tree.under(rel)
    names = sorted({f.split("/", 1)[0] for f in files if f.startswith(CHECKPOINT_PREFIX) and "/" in f}, reverse=True)
    states: dict[str, TrainState] = {}
    for name in names:
        f = j(f"{name}/{TRAIN_STATE}")
        if tree.exists(f):
            st = _guard(s, lambda f=f: parse(TrainState, tree.read_json(f), f))
            if st is not None:
                states[name] = st
    newest = states[next(iter(states))] if states else None
    config = config if isinstance(config, dict) else (newest.config if newest else {})
    s.job = str(config.get("kind") or (newest.kind if newest else None) or "pretrain")
    s.stage = STAGE_OF_KIND.get(s.job, s.job)
    if config:
        s.config_sha256 = config_sha256(config)
    if newest:
        s.tokenizer_sha256 = newest.tokenizer_sha256
        s.data_manifest_sha256 = newest.data_manifest_sha256
    metrics = j("metrics.jsonl") if tree.exists(j("metrics.jsonl")) else next(
        (j(f"{n}/metrics.jsonl") for n in names if tree.exists(j(f"{n}/metrics.jsonl"))), None)
    records: list[dict] = []
    if metrics:
        s.metrics_file = metrics
        records = _guard(s, _metrics, s, tree, metrics) or []
    s.records = len(records)
    s.checkpoints = _checkpoints(s, tree, rel, names, states, verify_checkpoints)
    s.world_changes = _world_changes(records)
    s.summary = _run_summary(s, config, records)
    s.history, s.config, s.states = records, config, states
    return s


def _metrics(s: RunSection, tree: Tree, rel: str) -> list[dict]:
    out = []
    for rec in tree.read_jsonl(rel, s.problems):
        step = rec.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            s.problems.append(f"{rel}: a record without an integer `step` skipped")
            continue
        out.append(rec)
    return out


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in records if _number(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


KNOWN_METRICS = {"step", "loss", "val_loss", "val_ppl", "eval_loss", "lr", "grad_norm", "tokens_per_s", "tokens",
                 "world_size", "memory_gib", "mfu", "diverged"}
MAX_EXTRA_CHARTS = 6
# Of a job's other metrics these are drawn first (RL logs more than MAX_EXTRA_CHARTS); the rest
# alphabetically. Counts behind a rate (RL's eval_correct / eval_items) are not curves.
FIRST_METRICS = ("reward_mean", "accuracy", "kl", "eval_reward", "entropy", "logprob_diff_max")
COUNTS = {"eval_correct", "eval_items"}


def _run_charts(s: RunSection, charts: Charts, records: list[dict]) -> list[Chart]:
    out = []
    x, y = _series(records, "loss")
    loss = [Series("train-loss", "train", x, y)]
    for key, label in (("val_loss", "val"), ("eval_loss", "eval")):
        vx, vy = _series(records, key)
        if vx:
            loss.append(Series(key.replace("_", "-"), label, vx, vy, style="markers"))
    hl = [("unigram", "unigram baseline", s.unigram_val_loss)] if s.unigram_val_loss is not None else []
    out.append(charts.lines("loss", "loss", loss, ylabel="nats/token", hlines=hl))
    out.append(charts.lines("lr", "learning rate", [Series("lr", "lr", *_series(records, "lr"))]))
    out.append(charts.lines("grad-norm", "gradient norm",
                            [Series("grad-norm", "global norm", *_series(records, "grad_norm"))]))
    out.append(charts.lines("throughput", "throughput",
                            [Series("tokens-per-s", "tokens/s", *_series(records, "tokens_per_s"))], ylabel="tokens/s"))
    out.append(charts.lines("mfu", "model FLOPs utilisation", [Series("mfu", "MFU", *_series(records, "mfu"))]))
    sizes = {r.get("world_size") for r in records if "world_size" in r}
    if len(sizes) > 1:
        out.append(charts.lines("world-size", "workers per step",
                                [Series("world-size", "world size", *_series(records, "world_size"), style="step")],
                                ylabel="workers"))
    # other metrics a job logs (DPO rewards, reward-model accuracy), each with its eval_ twin if any
    extras = {k for r in records for k, v in r.items() if k not in KNOWN_METRICS | COUNTS and _number(v)}
    keys = sorted((k for k in extras if not (k.startswith("eval_") and k[5:] in extras)),
                  key=lambda k: (FIRST_METRICS.index(k) if k in FIRST_METRICS else len(FIRST_METRICS), k))
    for key in keys[:MAX_EXTRA_CHARTS]:
        series = [Series(f"metric-{key}", key, *_series(records, key),
                         style="markers" if key.startswith(("eval_", "val_")) else "line")]
        if f"eval_{key}" in extras:
            series.append(Series(f"metric-eval-{key}", f"eval_{key}", *_series(records, f"eval_{key}"),
                                 style="markers"))
        out.append(charts.lines(f"metric-{key}", key, series))
    out = [c for c in out if c is not None]
    if len(keys) > MAX_EXTRA_CHARTS and out:
        out[-1].notes.append(f"{len(keys) - MAX_EXTRA_CHARTS} more metrics not drawn: "
                             f"{', '.join(keys[MAX_EXTRA_CHARTS:])}")
    return out


def _checkpoints(s: RunSection, tree: Tree, rel: str, names: list[str], states: dict[str, TrainState],
                 verify_checkpoints: bool) -> list[CheckpointRow]:
    rows = []
    for name in names:  # newest first
        files = tree.under(posixpath.join(rel, name))
        st = states.get(name)
        row = CheckpointRow(name=name, step=st.step if st else None, world_size=st.world_size if st else None,
                            files=len(files), bytes=sum(files.values()), status="not checked")
        if verify_checkpoints:
            why = verify_checkpoint(tree.file_uri(posixpath.join(rel, name)))
            row.status, row.reason = ("verified", "") if why is None else ("failed", why)
        rows.append(row)
    if verify_checkpoints:
        good = next((r for r in rows if r.status == "verified"), None)
        for r in rows:
            if r is good:
                r.role = "resume point"
                break
            r.role = f"skipped: a resume falls back to {good.name}" if good else "skipped: no complete checkpoint"
    return rows


def _world_changes(records: list[dict]) -> list[dict]:
    changes, prev = [], None
    for r in records:
        w = r.get("world_size")
        if not isinstance(w, int):
            continue
        if prev is not None and w != prev:
            changes.append({"step": r["step"], "from": prev, "to": w})
        prev = w
    return changes


def _run_summary(s: RunSection, config: dict, records: list[dict]) -> list[tuple[str, Any]]:
    last = records[-1] if records else {}
    val_key = "val_loss" if any("val_loss" in r for r in records) else "eval_loss"
    vals = [r[val_key] for r in records if finite(r.get(val_key))]
    tps = [r["tokens_per_s"] for r in records if finite(r.get("tokens_per_s"))]
    mfu = [r["mfu"] for r in records if finite(r.get("mfu"))]
    mem = [r["memory_gib"] for r in records if finite(r.get("memory_gib"))]
    sizes = sorted({r["world_size"] for r in records if isinstance(r.get("world_size"), int)})
    max_steps = config.get("max_steps") if isinstance(config, dict) else None
    out = [("steps", f"{last.get('step', 0)}" + (f" of {max_steps}" if max_steps else "")),
           ("final train loss", last.get("loss")),
           (f"final {val_key.replace('_', ' ')}", vals[-1] if vals else None),
           (f"best {val_key.replace('_', ' ')}", min(vals) if vals else None)]
    if last.get("tokens") is not None:
        out.append(("tokens seen", last.get("tokens")))
    if tps:
        out.append(("median tokens/s", statistics.median(tps)))
    if mfu:
        out.append(("median MFU", f"{statistics.median(mfu):.1%}"))
    if mem:
        out.append(("peak memory per worker (GiB)", max(mem)))
    if sizes:
        out.append(("workers", " → ".join(map(str, _distinct_in_order(records))) if len(sizes) > 1 else sizes[0]))
    if isinstance(config, dict) and config.get("lr") is not None:
        out.append(("peak lr", config.get("lr")))
    verified = [c for c in s.checkpoints if c.status == "verified"]
    if s.checkpoints:
        out.append(("checkpoints verified", f"{len(verified)} of {len(s.checkpoints)}"))
    return out


def _distinct_in_order(records: list[dict]) -> list[int]:
    out = []
    for r in records:
        w = r.get("world_size")
        if isinstance(w, int) and (not out or out[-1] != w):
            out.append(w)
    return out


# ----------------------------------------------------------------------------- sweeps


def _sweep(tree: Tree, rel: str, charts: Charts) -> SweepSection:
    s = SweepSection(kind="sweep", rel=rel)
    j = lambda name: posixpath.join(rel, name)  # noqa: E731
    if tree.exists(j("tune_config.json")):
        tc = _guard(s, tree.read_json, j("tune_config.json"))
        if isinstance(tc, dict):
            s.config_sha256 = tc.get("sha256") if isinstance(tc.get("sha256"), str) else None
            s.config = tc.get("config") if isinstance(tc.get("config"), dict) else {}
    summary = None
    if tree.exists(j("sweep.json")):
        summary = _guard(s, lambda: parse(SweepSummary, tree.read_json(j("sweep.json")), j("sweep.json")))
    if summary:
        best = summary.best or {}
        s.best_trial = str(best.get("trial_id")) if best.get("trial_id") is not None else None
        s.summary = [("trials", summary.trials), ("wall time (s)", summary.wall_s),
                     *[(f"{k} trials", v) for k, v in summary.status.items()],
                     ("best trial", s.best_trial), ("best proxy lr", best.get("lr")),
                     ("best eval loss", best.get("val_loss")), ("proxy/target width", summary.width_ratio),
                     ("target lr", summary.target_lr)]
    rows = _guard(s, tree.read_csv, j("trials.csv")) if tree.exists(j("trials.csv")) else None
    if rows:
        s.columns = list(rows[0].keys())
        s.rows = [[_short_number(r.get(c) or "") for c in s.columns] for r in rows]
        parsed = [{"lr": _float(r.get("lr")), "val_loss": _float(r.get("val_loss")), "status": r.get("status") or "?",
                   "trial_id": r.get("trial_id")} for r in rows]
        best_lr = _float((summary.best or {}).get("lr")) if summary and summary.best else None
        chart = charts.sweep(parsed, best_lr)
        if chart:
            s.charts.append(chart)
        curves = _trial_curves(s, tree, rel, parsed, charts)
        if curves:
            s.charts.append(curves)
    elif tree.exists(j("loss_vs_lr.png")):
        import base64

        png = _guard(s, tree.read_bytes, j("loss_vs_lr.png"))
        if png and png.startswith(b"\x89PNG\r\n\x1a\n"):
            s.png = base64.b64encode(png).decode()
    return s


def _trial_curves(s: SweepSection, tree: Tree, rel: str, trials: list[dict], charts: Charts) -> Chart | None:
    """Eval loss of each trial over its steps (from trials/<id>/metrics.jsonl)."""
    series = []
    for t in trials[:20]:
        f = posixpath.join(rel, "trials", str(t["trial_id"]), "metrics.jsonl")
        if not t["trial_id"] or not tree.exists(f):
            continue
        recs = [r for r in tree.read_jsonl(f, s.problems) if isinstance(r.get("step"), int)]
        x, y = _series(recs, "val_loss")
        if x:
            series.append(Series(f"trial-{len(series)}", f"lr {t['lr']:.3g}" if finite(t["lr"]) else str(t["trial_id"]),
                                 x, y, style="markers"))
    return charts.lines("trial-curves", "eval loss per trial", series, ylabel="nats/token") if series else None


def _short_number(v: str) -> str:
    """A float of the CSV to 5 significant digits (lr 0.004311710058685493 -> 0.0043117)."""
    if not any(c in v for c in ".eE") or (f := _float(v)) is None:
        return v
    return f"{f:.5g}"


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- evaluation and samples


def _eval(tree: Tree, rel: str, charts: Charts) -> EvalSection:
    s = EvalSection(kind="eval", rel=rel)
    f = posixpath.join(rel, "results.json")
    res = _guard(s, lambda: parse(EvalResults, tree.read_json(f), f))
    if res is None:
        return s
    s.results = [r.model_dump() for r in res.results]
    if res.config:
        s.config_sha256 = config_sha256(res.config)
    s.config = res.config
    return s


def _samples(tree: Tree, rel: str, charts: Charts) -> SamplesSection:
    s = SamplesSection(kind="samples", rel=rel)
    recs = _guard(s, tree.read_jsonl, rel, s.problems) or []
    s.total = len(recs)
    for r in recs[:SAMPLES_SHOWN]:
        if isinstance(r.get("messages"), list):
            prompt = "\n".join(f"{m.get('role')}: {m.get('content')}" if isinstance(m, dict) else str(m)
                               for m in r["messages"])
        else:
            prompt = str(r.get("prompt", ""))
        s.rows.append({"prompt": prompt, "completion": str(r.get("completion", "")), "step": r.get("step"),
                       "checkpoint": r.get("checkpoint") if isinstance(r.get("checkpoint"), str) else None})
    return s


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials (scipy's binomtest)."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _eval_table(report: Report) -> EvalTable | None:
    """Every task of every results.json, one column per checkpoint, base -> SFT -> DPO -> RL."""
    columns: dict[str, EvalColumn] = {}
    cells: dict[tuple[str, str], dict[str, EvalCell]] = {}
    notes: dict[tuple[str, str], str] = {}
    examples = []
    for ev in report.evals:
        for r in ev.results:
            ck = r["checkpoint"]
            stage = STAGE_OF_KIND.get(r.get("kind"), r.get("kind") or "base")
            if stage == "base" and r.get("chat"):
                stage = "chat"
            target = _find(report, ck)
            label = r.get("label") or ck.rstrip("/").rsplit("/", 1)[-1]
            col = columns.setdefault(ck, EvalColumn(stage=stage, label=label, step=r.get("step"), checkpoint=ck,
                                                    anchor=target.anchor if target else None))
            if r.get("lm"):
                lm = r["lm"]
                n = lm.get("sequences")
                for key, fmt in (("loss", "{:.4f}"), ("perplexity", "{:.2f}"), ("bits_per_byte", "{:.4f}")):
                    if lm.get(key) is not None:
                        cells.setdefault(("val (held-out shards)", key), {})[ck] = EvalCell(fmt.format(lm[key]), n=n)
                        notes[("val (held-out shards)", key)] = "n = sequences"
            for task, t in r.get("tasks", {}).items():
                n = t["items"]
                for key in ("accuracy", "accuracy_norm", "exact_match"):
                    v = t.get(key)
                    if v is None or not finite(v) or not 0 <= v <= 1:
                        continue
                    cell = EvalCell(f"{v:.3f}", n=n)
                    if n:
                        lo, hi = wilson(round(v * n), n)
                        cell.ci = f"{lo:.3f}–{hi:.3f}"
                    cells.setdefault((task, key), {})[ck] = cell
                    if t.get("chance") is not None:
                        notes[(task, key)] = f"chance {t['chance']:.2f}"
                for ex in t.get("examples", [])[:2]:
                    if isinstance(ex, dict) and len(examples) < EXAMPLES_SHOWN:
                        examples.append({"task": task, "stage": stage, "label": col.label,
                                         "prompt": str(ex.get("prompt", "")), "output": str(ex.get("output", "")),
                                         "answer": str(ex.get("answer", "")), "correct": bool(ex.get("correct"))})
    if not columns:
        return None
    order = sorted(columns.values(), key=lambda c: (STAGE_ORDER.index(c.stage) if c.stage in STAGE_ORDER
                                                    else len(STAGE_ORDER), list(columns).index(c.checkpoint)))
    rows = [EvalRow(task=task, metric=metric, note=notes.get((task, metric), ""),
                    cells=[by_ck.get(c.checkpoint) for c in order])
            for (task, metric), by_ck in cells.items()]
    return EvalTable(columns=order, rows=rows, examples=examples)


# ----------------------------------------------------------------------------- lineage


def _find(report: Report, path: Any) -> Section | None:
    """The section whose output holds `path` (a URI an output recorded), the innermost one."""
    if not isinstance(path, str) or not path:
        return None
    path = path.rstrip("/")
    best = None
    for s in report.sections:
        if s.kind == "samples" or not s.uri:
            continue
        if path == s.uri or path.startswith(s.uri.rstrip("/") + "/"):
            if best is None or len(s.uri) > len(best.uri):
                best = s
    return best


def _link_to(report: Report, path: Any, what: str) -> Link:
    target = _find(report, path)
    text = f"{what}: {path}"
    if target:
        inner = path.rstrip("/")[len(target.uri.rstrip("/")) + 1:] if isinstance(path, str) else ""
        text = f"{what}: {target.label}" + (f" ({inner})" if inner else "")
    return Link(text=text, anchor=target.anchor if target else None)


def _outside_unigram(data: Any, sha256: str | None) -> float | None:
    """The unigram loss in the manifest of a run's data that lies outside the report's root (a
    job's own report), read only if it is the very manifest the run recorded (same sha256)."""
    if not isinstance(data, str) or not sha256:
        return None
    try:
        uri = storage.join(data, "manifest.json")
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File or (info.size or 0) > 16 << 20:  # no FIFO, no device, no giant
            return None
        raw = storage.read_bytes(uri)
        if hashlib.sha256(raw).hexdigest() != sha256:
            return None
        loss = json.loads(raw).get("unigram_val_loss")
        return float(loss) if finite(loss) else None
    except (OSError, ValueError, AttributeError):
        return None


def _link(report: Report) -> None:
    """Parents of every output, their hashes checked against the parent's (and the unigram
    baseline a pretraining run's loss chart draws, from its data)."""
    by_manifest = {d.data_manifest_sha256: d for d in report.data if d.data_manifest_sha256}
    for run in report.runs:
        config = run.config
        data = by_manifest.get(run.data_manifest_sha256) or _find(report, config.get("data"))
        if isinstance(data, DataSection):
            run.parents.append(Link(f"data: {data.label}", data.anchor))
            run.unigram_val_loss = data.unigram_val_loss if run.job == "pretrain" else None
            if run.tokenizer_sha256 and data.tokenizer_sha256 and run.tokenizer_sha256 != data.tokenizer_sha256:
                run.notes.append(f"tokenizer differs from the one of {data.label}")
            if run.data_manifest_sha256 and run.data_manifest_sha256 != data.data_manifest_sha256:
                run.notes.append(f"trained on another version of {data.label} (manifest sha256 differs)")
        elif config.get("data"):
            run.parents.append(Link(f"data: {config['data']}"))
            if run.job == "pretrain":
                run.unigram_val_loss = _outside_unigram(config["data"], run.data_manifest_sha256)
        newest = next(iter(run.states.values()), None)
        init = (newest.init_from if newest else None) or config.get("init_from")
        if init:
            link = _link_to(report, init, "init from")
            run.parents.append(link)
            parent = _find(report, init)
            if parent and None not in (parent.tokenizer_sha256, run.tokenizer_sha256) \
                    and parent.tokenizer_sha256 != run.tokenizer_sha256:
                run.notes.append(f"tokenizer differs from the one of {parent.label}")
    for sw in report.sweeps:
        cfg = sw.config
        target = cfg.get("pretrain") if isinstance(cfg.get("pretrain"), dict) else {}
        if target.get("data"):
            sw.parents.append(_link_to(report, target["data"], "data"))
    for ev in report.evals:
        cfg = ev.config
        for r in ev.results:
            ev.parents.append(_link_to(report, r["checkpoint"], "checkpoint"))
        if cfg.get("data"):
            ev.parents.append(_link_to(report, cfg["data"], "data"))
    for sm in report.samples:
        ckpts = sorted({r["checkpoint"] for r in sm.rows if r["checkpoint"]})
        sm.parents += [_link_to(report, c, "checkpoint") for c in ckpts]
        for row in sm.rows:
            target = _find(report, row["checkpoint"])
            row["source"] = target.label if target else row["checkpoint"]
            row["anchor"] = target.anchor if target else None
