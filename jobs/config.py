"""Job configs: one pydantic model per job, loaded from YAML, unknown keys rejected by name.

A YAML file is either one job's config (it may say `kind: <job>`), or a pipeline file whose
top-level keys are job names (`prepare:`, `pretrain:`, ...), from which each job takes its own
section. Either way the job validates exactly its own keys.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="JobConfig")


class JobConfig(BaseModel):
    """Base of every job's config. Subclasses declare `kind: Literal["<job>"] = "<job>"`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

    def resolved(self) -> dict[str, Any]:
        """The config with every default filled in, as plain JSON types (saved with each output)."""
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()


class Section(BaseModel):
    """Base of a nested config section (a job's `clean:`, `dedup:`, `search:` ...): unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def job_kind(cls: type[JobConfig]) -> str:
    return cls.model_fields["kind"].default


def select_section(cls: type[JobConfig], data: Any, source: str) -> dict:
    kind = job_kind(cls)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    if "kind" in data:
        if data["kind"] != kind:
            raise ConfigError(f"{source}: kind is {data['kind']!r}, but this job is {kind!r}")
        return data
    if kind in data and isinstance(data[kind], dict):
        return {"kind": kind, **data[kind]}
    return {"kind": kind, **data}


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        data = data.setdefault(k, {})
    data[keys[-1]] = value


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Read and validate a job's config. `overrides` maps dotted keys to values (applied last)."""
    source = str(path) if path else "<arguments>"
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from e
        data = select_section(cls, raw, source)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def main(cls: type[C], run: Callable[[C], Any], argv: list[str] | None = None,
         extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
         flag_overrides: Callable[[argparse.Namespace], dict] | None = None,
         run_kwargs: Callable[[argparse.Namespace], dict] | None = None) -> Any:
    """The `python -m jobs.<kind> --config FILE [--set key=value ...]` entry point of every job."""
    kind = job_kind(cls)
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{kind}", description=(cls.__doc__ or "").strip())
    parser.add_argument("--config", help="YAML config file (a job file or a pipeline file with a section per job)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted for nested keys (e.g. model.n_layers=2)")
    if extra_args:
        extra_args(parser)
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        if flag_overrides:
            overrides = {**flag_overrides(args), **overrides}
        cfg = load_config(cls, args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return run(cfg, **(run_kwargs(args) if run_kwargs else {}))
