"""The files under a report's root, read through cluster.storage with bounded sizes.

Everything here treats the files as hostile: a read names the file (relative to the root, never
the machine's own paths) in every error, sizes are capped, and on local disk a symlink that
leads outside the root is not followed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from cluster import storage

# A metrics.jsonl of a million steps is ~250 MB; anything larger is not a file raylm wrote.
MAX_FILE_BYTES = 256 << 20


# What the report reads of a job's output (collect.py): no shards, weights or optimizer state.
INPUT_NAMES = frozenset({"manifest.json", "report.json", "config.json", "metrics.jsonl", "results.json", "trials.csv",
                         "sweep.json", "tune_config.json", "train_state.json", "loss_vs_lr.png"})
MAX_INPUT_BYTES = 64 << 20  # a .jsonl may be samples (generate): a page built from copies skips larger files


def report_inputs(sizes: dict[str, int]) -> list[str]:
    """Of an output's files (relative path -> size), those a report built from copies of them needs;
    a checkpoint's rank manifests come too, so its files are listed, though not verified."""
    out = []
    for rel, size in sizes.items():
        name = posixpath.basename(rel)
        if size <= MAX_INPUT_BYTES and (name in INPUT_NAMES or name.endswith(".jsonl") or (
                name.startswith("MANIFEST.rank") and name.endswith(".json"))):
            out.append(rel)
    return out


class ReportError(ValueError):
    """A file the report cannot use; the message starts with the file's path under the root."""


@dataclass
class Tree:
    """A directory (local or s3://) and every file under it, by path relative to it."""

    root: str
    """The root as given (what the page shows)."""
    uri: str
    """The root as storage addresses it (absolute path or s3:// URI)."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Relative path -> size in bytes."""

    @classmethod
    def scan(cls, root: str) -> Tree:
        uri = storage.absolute(root).rstrip("/") or "/"
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.Directory and not (storage.is_s3(uri) and info.type == pafs.FileType.NotFound
                                                         and _has_objects(fs, path)):
            raise FileNotFoundError(f"{root}: no such directory")
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        sizes = {}
        real_root = os.path.realpath(path) if not storage.is_s3(uri) else None
        for i in infos:
            if i.type != pafs.FileType.File or not i.path.startswith(path.rstrip("/") + "/"):
                continue
            rel = i.path[len(path.rstrip("/")) + 1:]
            if real_root is not None and not _inside(os.path.realpath(i.path), real_root):
                continue  # a symlink out of the root: not this output's file
            sizes[rel] = int(i.size or 0)
        return cls(root=root, uri=uri, sizes=dict(sorted(sizes.items())))

    def file_uri(self, rel: str) -> str:
        return storage.join(self.uri, rel)

    def exists(self, rel: str) -> bool:
        return rel in self.sizes

    def under(self, rel_dir: str) -> dict[str, int]:
        """Files below a directory, by path relative to that directory."""
        if not rel_dir:
            return dict(self.sizes)
        prefix = rel_dir.rstrip("/") + "/"
        return {k[len(prefix):]: v for k, v in self.sizes.items() if k.startswith(prefix)}

    def read_bytes(self, rel: str) -> bytes:
        if rel not in self.sizes:
            raise ReportError(f"{rel}: missing")
        if self.sizes[rel] > MAX_FILE_BYTES:
            raise ReportError(f"{rel}: {self.sizes[rel] / 2**20:.0f} MiB, larger than the report reads "
                              f"({MAX_FILE_BYTES >> 20} MiB)")
        try:
            return storage.read_bytes(self.file_uri(rel))
        except OSError as e:
            raise ReportError(f"{rel}: cannot be read ({type(e).__name__})") from None

    def head(self, rel: str, n: int = 1 << 16) -> bytes:
        """The first n bytes of a file (to tell what a JSONL file holds without reading it all)."""
        fs, path = storage.resolve(self.file_uri(rel))
        try:
            with fs.open_input_stream(path) as f:
                return f.read(n)
        except OSError as e:
            raise ReportError(f"{rel}: cannot be read ({type(e).__name__})") from None

    def read_text(self, rel: str) -> str:
        try:
            return self.read_bytes(rel).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ReportError(f"{rel}: not UTF-8 text (byte {e.start})") from None

    def read_json(self, rel: str, expect: type = dict) -> Any:
        try:
            obj = json.loads(self.read_text(rel))
        except json.JSONDecodeError as e:
            raise ReportError(f"{rel}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        if not isinstance(obj, expect):
            raise ReportError(f"{rel}: expected a JSON {expect.__name__}, got {type(obj).__name__}")
        return obj

    def read_jsonl(self, rel: str, problems: list[str]) -> list[dict]:
        """The JSON objects of a JSONL file; each bad line is skipped and named in `problems`."""
        out = []
        bad = []
        for n, line in enumerate(self.read_text(rel).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(f"{rel}:{n}: not valid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                bad.append(f"{rel}:{n}: expected a JSON object, got {type(obj).__name__}")
                continue
            out.append(obj)
        problems += bad[:5]
        if len(bad) > 5:
            problems.append(f"{rel}: {len(bad) - 5} more bad lines skipped")
        return out

    def read_csv(self, rel: str) -> list[dict[str, str]]:
        try:
            return list(csv.DictReader(io.StringIO(self.read_text(rel))))
        except csv.Error as e:
            raise ReportError(f"{rel}: not valid CSV ({e})") from None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _has_objects(fs, path: str) -> bool:
    """An S3 prefix with objects under it (S3 has no directories to stat)."""
    return bool(fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)))


def parent_dir(rel: str) -> str:
    return posixpath.dirname(rel)
