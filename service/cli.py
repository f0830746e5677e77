"""`raylm`: serve the control API, talk to it, or run a job locally without it.

    raylm serve --port 8000
    raylm submit configs/demo.yaml --kind prepare --wait --follow
    raylm list --status RUNNING
    raylm status ID; raylm logs ID -f; raylm stop ID
    raylm run configs/demo.yaml --kind prepare        # local, no service
    raylm report runs/demo; raylm report ID           # the run report, one HTML page

The client commands read RAYLM_URL and RAYLM_TOKEN (or --url/--token).
"""

from __future__ import annotations

import importlib
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

app = typer.Typer(help="raylm: build LLMs on a Ray cluster. Serve the control API, submit and follow jobs.",
                  no_args_is_help=True, add_completion=False)

Url = Annotated[str, typer.Option(envvar="RAYLM_URL", help="Control API URL.")]
Token = Annotated[Optional[str], typer.Option(envvar="RAYLM_TOKEN", help="Bearer token of your tenant.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Kind = Annotated[Optional[str], typer.Option(help="Which job of a pipeline file (a section name).")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: KEY=VALUE (dotted).")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _client(url: str, token: str | None):
    from service.client import Client

    return Client(url, token)


def _fail(msg: str, code: int = 1) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def spec_from_file(path: Path, kind: str | None, sets: list[str] | None = None) -> dict:
    """One job's spec from a job file (with `kind:`) or a pipeline file (a section per job)."""
    from jobs.config import ConfigError, parse_overrides, set_dotted

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        _fail(f"{path}: {e}")
    if not isinstance(data, dict):
        _fail(f"{path}: expected a mapping at the top level")
    if "kind" in data:
        if kind and kind != data["kind"]:
            _fail(f"{path}: kind is {data['kind']!r}, not {kind!r}")
        spec = dict(data)
    else:
        sections = [k for k, v in data.items() if isinstance(v, dict)]
        if kind is None and len(sections) == 1:
            kind = sections[0]
        if kind is None:
            _fail(f"{path} is a pipeline file with jobs {sections}; pick one with --kind")
        if not isinstance(data.get(kind), dict):
            _fail(f"{path}: no section {kind!r} (sections: {sections})")
        spec = {"kind": kind, **data[kind]}
    try:
        for key, value in parse_overrides(sets or []).items():
            set_dotted(spec, key, value)
        return inline_nested_files(spec)
    except ConfigError as e:
        _fail(str(e))


def inline_nested_files(spec: dict) -> dict:
    """Nested configs given as file names (tune's `pretrain: configs/demo.yaml`), read here: the
    service reads no files, and the file is on this machine, where a local run would read it.

    The spec classes (service.specs imports every job's config module) are loaded only when some
    top-level value names a YAML file here, so a plain `raylm submit` stays a small, quick client."""
    if not any(isinstance(v, str) and _is_yaml_mapping(v) for v in spec.values()):
        return spec
    from jobs.config import load_config
    from service.specs import CLASS_BY_KIND, nested_models

    cls = CLASS_BY_KIND.get(spec.get("kind"))
    nested = nested_models(cls) if cls else {}
    return {k: load_config(nested[k], v).model_dump(mode="json") if k in nested and isinstance(v, str) else v
            for k, v in spec.items()}


def _is_yaml_mapping(value: str) -> bool:
    p = Path(value)
    try:
        return p.suffix in (".yaml", ".yml", ".json") and p.is_file() and isinstance(yaml.safe_load(p.read_text()), dict)
    except (OSError, ValueError, yaml.YAMLError):
        return False


def _api_errors(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        import httpx

        from service.client import APIError

        try:
            return fn(*a, **kw)
        except APIError as e:
            _fail(e.message, 2 if e.status in (401, 404, 409, 413, 422, 429) else 1)
        except httpx.TransportError as e:
            _fail(f"cannot reach the control API: {e}")

    return wrapper


def _ts(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj, indent=2))


def _table(columns: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """A table on a terminal; tab-separated lines, nothing cut, when the output is a pipe or a file
    (where rich would squeeze the columns to the default width)."""
    if not sys.stdout.isatty():
        for row in [columns, *rows]:
            typer.echo("\t".join(c.replace("\t", " ").replace("\n", " ") for c in row))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for i, name in enumerate(columns):
        # ids, kinds and statuses are what people copy and grep: never squeezed; the last column gives way
        if i == len(columns) - 1:
            t.add_column(name, no_wrap=True, overflow="ellipsis", ratio=1)
        else:
            t.add_column(name, no_wrap=True, min_width=min(40, max(len(r[i]) for r in [columns, *rows])))
    for row in rows:
        t.add_row(*row)
    Console().print(t)


def _jobs_table(items) -> None:
    rows = []
    for j in items:
        run = j.timings.run_s
        rows.append([j.id, j.kind, j.status, _ts(j.timings.created_at), f"{run:.1f}" if run else "-",
                     (j.message or "")[:120]])
    _table(["ID", "KIND", "STATUS", "CREATED", "RUN (s)", "MESSAGE"], rows)


def _follow(c, job_id: str) -> None:
    for chunk in c.logs(job_id, follow=True):
        sys.stdout.write(chunk)
        sys.stdout.flush()


@app.command()
def serve(host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port.")] = 8000,
          workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1) -> None:
    """Serve the control API (settings from RAYLM_* variables; see docs/api.md)."""
    import uvicorn

    uvicorn.run("service.main:app", host=host, port=port, workers=workers)


@app.command()
@_api_errors
def submit(file: Annotated[Path, typer.Argument(help="Job YAML (with kind:) or pipeline YAML (with --kind).")],
           kind: Kind = None, set_: Sets = None,
           wait: Annotated[bool, typer.Option("--wait", help="Wait for the job to end.")] = False,
           follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream the log until the job ends.")] = False,
           idempotency_key: Annotated[Optional[str], typer.Option(help="Resubmitting with it returns the same job.")] = None,
           url: Url = DEFAULT_URL, token: Token = None, json_: Json = False) -> None:
    """Submit a job to the control API."""
    spec = spec_from_file(file, kind, set_)
    with _client(url, token) as c:
        job = c.submit(spec, idempotency_key=idempotency_key)
        if not json_:
            typer.echo(f"submitted {job.kind} job {job.id} ({job.status})", err=True)
        if follow:
            _follow(c, job.id)
        if wait or follow:
            status = c.wait(job.id)
            job = c.get(job.id)
        if json_:
            _print_json(job)
        elif wait or follow:
            typer.echo(f"job {job.id}: {status}" + (f" ({job.message})" if job.message and status != "SUCCEEDED" else ""))
        else:
            typer.echo(job.id)
        if (wait or follow) and job.status != "SUCCEEDED":
            raise typer.Exit(1)


@app.command("list")
@_api_errors
def list_(kind: Annotated[Optional[str], typer.Option(help="Only this kind.")] = None,
          status: Annotated[Optional[str], typer.Option(help="Only this status.")] = None,
          limit: int = 50, offset: int = 0, url: Url = DEFAULT_URL, token: Token = None, json_: Json = False) -> None:
    """List your jobs, newest first."""
    with _client(url, token) as c:
        page = c.list(kind=kind, status=status, limit=limit, offset=offset)
    if json_:
        _print_json(page)
    else:
        _jobs_table(page.items)
        typer.echo(f"{len(page.items)} of {page.total}")


@app.command()
@_api_errors
def status(job_id: str, url: Url = DEFAULT_URL, token: Token = None, json_: Json = False) -> None:
    """A job's status, history, timings, metrics, lineage and artifacts."""
    with _client(url, token) as c:
        job = c.get(job_id)
    if json_:
        _print_json(job)
        return
    typer.echo(f"{job.id}  {job.kind}  {job.status}  {job.message or ''}")
    _table(["STATUS", "AT", "MESSAGE"], [[e.status, _ts(e.at), (e.message or "")[:120]] for e in job.history],
           title="history")
    tm = job.timings
    typer.echo(f"queued {tm.queued_s or 0:.1f}s, ran {tm.run_s or 0:.1f}s; resources {job.resources}")
    if job.metrics:
        typer.echo(f"last metrics: {job.metrics}")
    for k, v in job.lineage.items():
        typer.echo(f"lineage {k}: {v}")
    if job.artifacts and job.artifacts.output:
        a = job.artifacts
        typer.echo(f"output {a.output}: {len(a.checkpoints)} checkpoints, {len(a.manifests)} manifests, "
                   f"{len(a.metrics)} metrics, {len(a.plots)} plots, {len(a.other)} other files")


@app.command()
@_api_errors
def logs(job_id: str, follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False,
         tail: Annotated[Optional[int], typer.Option(help="Only the last N lines.")] = None,
         url: Url = DEFAULT_URL, token: Token = None) -> None:
    """Print a job's log."""
    with _client(url, token) as c:
        for chunk in c.logs(job_id, follow=follow, tail=tail):
            sys.stdout.write(chunk)
            sys.stdout.flush()


@app.command()
@_api_errors
def stop(job_id: str, url: Url = DEFAULT_URL, token: Token = None, json_: Json = False) -> None:
    """Stop a job."""
    with _client(url, token) as c:
        job = c.stop(job_id)
    _print_json(job) if json_ else typer.echo(f"stopping {job.id} ({job.status})")


@app.command()
@_api_errors
def delete(job_id: str, url: Url = DEFAULT_URL, token: Token = None) -> None:
    """Delete an ended job's record (outputs and the archived log stay)."""
    with _client(url, token) as c:
        c.delete(job_id)
    typer.echo(f"deleted {job_id}")


@app.command()
@_api_errors
def artifacts(job_id: str, url: Url = DEFAULT_URL, token: Token = None, json_: Json = False) -> None:
    """A job's checkpoints, manifests, metrics, plots and log."""
    with _client(url, token) as c:
        a = c.artifacts(job_id)
    if json_:
        _print_json(a)
        return
    rows = [["checkpoint", ck.name, f"{len(ck.files)} files"] for ck in a.checkpoints]
    for kind, files in (("manifest", a.manifests), ("metrics", a.metrics), ("plot", a.plots), ("other", a.other)):
        rows += [[kind, f.path, str(f.size or "")] for f in files]
    if a.logs:
        rows.append(["logs", a.logs, ""])
    _table(["TYPE", "PATH", "SIZE"], rows)


@app.command()
@_api_errors
def cluster(url: Url = DEFAULT_URL, token: Token = None, json_: Json = False) -> None:
    """Cluster nodes and free CPUs/GPUs."""
    with _client(url, token) as c:
        cl = c.cluster()
    if json_:
        _print_json(cl)
        return
    _table(["NODE", "IP", "STATE", "CPUS (free/total)", "GPUS (free/total)"],
           [[(n.node_id or "")[:12] + (" (head)" if n.is_head else ""), n.ip or "", n.state or "",
             f"{n.free_cpus:g}/{n.cpus:g}", f"{n.free_gpus:g}/{n.gpus:g}"] for n in cl.nodes])


@app.command()
def run(file: Annotated[Path, typer.Argument(help="Job YAML (with kind:) or pipeline YAML (with --kind).")],
        kind: Kind = None, set_: Sets = None, json_: Json = False) -> None:
    """Run a job here, without the service (like `python -m jobs.<kind> --config FILE`)."""
    from pydantic import ValidationError

    from jobs.config import ConfigError, format_validation_error
    from service.specs import CLASS_BY_KIND, spec_adapter

    spec = spec_from_file(file, kind, set_)
    if spec.get("kind") not in CLASS_BY_KIND:
        _fail(f"{file}: unknown kind {spec.get('kind')!r}; known: {sorted(CLASS_BY_KIND)}")
    try:
        cfg = spec_adapter.validate_python(spec)
    except ValidationError as e:
        _fail(format_validation_error(e, str(file)), 2)
    except ConfigError as e:
        _fail(str(e), 2)
    result = importlib.import_module(f"jobs.{cfg.kind}").run(cfg)  # the job's entry module, as `python -m` runs
    if json_:
        typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
@_api_errors
def report(target: Annotated[str, typer.Argument(help="A directory or s3:// prefix (built here), or a job id.")],
           output: Annotated[Optional[Path], typer.Option(help="Where to write the page (default: report.html in "
                                                                 "the directory; report-<job id>.html for a job).")] = None,
           url: Url = DEFAULT_URL, token: Token = None) -> None:
    """Write a run's report: one HTML page (charts inline, opens offline). A job's is its report.html
    artifact, or else one built here from its downloaded artifacts (checkpoints not verified)."""
    import tempfile
    from pathlib import PurePosixPath

    from cluster import storage
    from jobs.report import REPORT_FILE, write_report
    from jobs.report.files import report_inputs

    if storage.is_s3(target) or Path(target).exists():
        try:
            typer.echo(write_report(target, str(output) if output else None))
        except FileNotFoundError as e:
            _fail(str(e), 2)
        return
    if "/" in target or target.startswith("."):
        _fail(f"{target}: no such directory", 2)
    out = output or Path(f"report-{target}.html")
    with _client(url, token) as c:
        a = c.artifacts(target)
        files = {f.path: f.size or 0 for f in (*a.manifests, *a.metrics, *a.plots, *a.other)}
        if REPORT_FILE in files:
            out.write_bytes(c.artifact(target, REPORT_FILE))
            typer.echo(str(out))
            return
        files.update({f"{ck.name}/{f}": 0 for ck in a.checkpoints for f in ck.files})
        wanted = report_inputs(files)
        with tempfile.TemporaryDirectory(prefix="raylm-report-") as tmp:
            for rel in wanted:
                parts = PurePosixPath(rel).parts
                if PurePosixPath(rel).is_absolute() or ".." in parts:
                    continue  # the listing names files under the job's output, nothing else
                dest = Path(tmp, *parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(c.artifact(target, rel))
            write_report(tmp, str(out), verify_checkpoints=False, origin=a.output)
    typer.echo(str(out))
