"""Local-or-S3 storage through pyarrow.fs, with atomic writes and checksums.

Every job reads and writes through these helpers, so any `output`/`data` field may be a local
path or an `s3://bucket/prefix` URI. S3 uses the standard AWS credential chain; S3-compatible
stores (MinIO, moto, Ceph) are reached with `AWS_ENDPOINT_URL` (the AWS SDKs' own variable).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs = {"endpoint_override": rest or scheme, "scheme": scheme if rest else "https"}
        kwargs["force_virtual_addressing"] = False
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # Explicit keys travel with the pickled filesystem, so Ray actors started before these
        # variables were set (Ray Train's controller, long-lived workers) sign requests too.
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


NO_LINKS = "RAYLM_NO_LINKS"


def local_path(path: str | os.PathLike) -> str:
    """The absolute, link-free form of a local path.

    A job the control API runs has RAYLM_NO_LINKS=1 in its environment (and its Ray workers'): it
    receives its paths fully resolved, and everything under them is a tenant's storage, where a
    symbolic link could lead anywhere the cluster's user can read (another tenant's data, a
    process's environment with the cluster's token). There a path that passes through a link is
    refused instead of followed. Run by hand, a job follows links as usual.
    """
    plain = os.path.abspath(os.path.expanduser(path))
    real = os.path.realpath(plain)
    if real != plain and os.environ.get(NO_LINKS) == "1":
        raise PermissionError(f"{path}: passes through a symbolic link; links in a tenant's storage are not followed")
    return real


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), local_path(uri)


def absolute(uri: str | os.PathLike) -> str:
    """Local paths made absolute (Ray workers run in other directories); URIs unchanged."""
    return str(uri) if is_s3(uri) else local_path(uri)


def join(uri: str | os.PathLike, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(uri, *parts))


def exists(uri: str | os.PathLike) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str | os.PathLike) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write a whole file so that readers see the old content or the new, never a torn one."""
    if is_s3(uri):
        fs, path = resolve(uri)
        with fs.open_output_stream(path) as f:  # one PUT: S3 objects appear whole
            f.write(data)
        return
    path = Path(local_path(uri))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; finished files follow the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str | os.PathLike, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str | os.PathLike) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str | os.PathLike, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def list_files(uri: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Files under a directory/prefix, as URIs of the same kind as `uri`, sorted."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)


def relative_files(uri: str | os.PathLike) -> list[str]:
    """Files under a directory/prefix as '/'-separated paths relative to it, sorted."""
    fs, root = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    fs, p = resolve(path)
    h = hashlib.sha256()
    with fs.open_input_stream(p) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def copy_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a directory tree between any two of local disk and S3."""
    sfs, spath = resolve(src)
    dfs, dpath = resolve(dst)
    dfs.create_dir(dpath, recursive=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs, use_threads=True)


def stage_local(uri: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> Path:
    """A local directory with the content of `uri`: the path itself, or an S3 prefix copied once.

    The copy lands under a name derived from the URI, written to a temporary name and renamed, so
    concurrent stagers on one node never see half a copy.
    """
    if not is_s3(uri):
        return Path(local_path(uri))
    root = Path(cache_root or os.environ.get("RAYLM_STAGE_DIR", Path(tempfile.gettempdir()) / "raylm-stage"))
    dest = root / hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    if dest.is_dir():
        return dest
    tmp = root / f".{dest.name}.{uuid.uuid4().hex}"
    copy_dir(uri, tmp)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process staged it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return dest
