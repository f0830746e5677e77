"""Reading tenant storage from the API process: every route that lists or serves a file goes through here.

A tenant controls what is in its prefixes, symbolic links included, and can change it at any time.
So a local file is served only if its real path (every link resolved) lies inside the directory the
route is about (the job's output, the job's log directory) *and* inside one of the allowed roots
(the tenant's prefixes, the service's artifact root). The file is opened without following a final
link (O_NOFOLLOW) and without blocking on a FIFO (O_NONBLOCK), must be a regular file, and the
opened descriptor is checked once more (/proc/self/fd), so a link swapped in between the check and
the open is caught. Listings never descend through a link, and list a linked file only if it passes
the same check. S3 has no links; its keys only need to stay under the prefix.

Errors say what is wrong with the request, never where a path leads.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from cluster import storage

CHUNK = 1 << 16
MAX_PATH_CHARS = 4096
MAX_COMPONENT_BYTES = 255


class NotAllowed(Exception):
    """The file does not exist, is not a regular file, or leads outside where it may be read."""


def under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root.endswith("/") else root + "/")


def check_rel(rel: str) -> list[str]:
    """The components of a relative path named in a request, or NotAllowed."""
    if not rel or len(rel) > MAX_PATH_CHARS:
        raise NotAllowed("empty or too long")
    if any(ord(c) < 32 or ord(c) == 127 for c in rel) or "\\" in rel:
        raise NotAllowed("control characters and backslashes are not allowed")
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise NotAllowed("absolute paths, and '', '.' or '..' components, are not allowed")
    if any(len(p.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES for p in parts):
        raise NotAllowed(f"a component longer than {MAX_COMPONENT_BYTES} bytes")
    return parts


def _local_root_ok(root: str, allowed: list[str]) -> bool:
    """The root as recorded must still be its own real path (no link swapped in above or at it) and
    lie inside an allowed root."""
    norm = os.path.normpath(root)
    return os.path.realpath(norm) == norm and any(under(norm, a) for a in allowed)


@dataclass
class Opened:
    """An open file: its size, positional reads, chunked iteration; close when done."""

    size: int
    _read_at: object
    _close: object

    def read_at(self, offset: int, n: int) -> bytes:
        return self._read_at(offset, n)

    def close(self) -> None:
        self._close()

    def chunks(self, start: int = 0) -> Iterator[bytes]:
        """The file from `start`, CHUNK bytes at a time; closes the file at the end."""
        try:
            pos = start
            while pos < self.size:
                block = self.read_at(pos, min(CHUNK, self.size - pos))
                if not block:
                    break
                pos += len(block)
                yield block
        finally:
            self.close()

    def head(self, max_bytes: int) -> bytes:
        try:
            return self.read_at(0, min(self.size, max_bytes))
        finally:
            self.close()

    def tail_start(self, lines: int, max_bytes: int = 64 << 20) -> int:
        """Offset where the last `lines` lines begin (looking back at most max_bytes)."""
        pos, seen, floor = self.size, 0, max(0, self.size - max_bytes)
        # a final newline ends the last line; it does not start another
        end = self.size - 1 if self.size and self.read_at(self.size - 1, 1) == b"\n" else self.size
        pos = end
        while pos > floor:
            n = min(CHUNK, pos - floor)
            block = self.read_at(pos - n, n)
            for i in range(len(block) - 1, -1, -1):
                if block[i] == 0x0A:
                    seen += 1
                    if seen == lines:
                        return pos - n + i + 1
            pos -= n
        return floor


def open_file(root: str, rel: str, allowed: list[str]) -> Opened:
    """Open `root/rel` for reading if it is a regular file inside `root` and inside one of `allowed`."""
    parts = check_rel(rel)
    if storage.is_s3(root):
        return _open_s3(root, parts, allowed)
    if not _local_root_ok(root, allowed):
        raise NotAllowed("outside the allowed storage")
    root = os.path.normpath(root)
    real = os.path.realpath(os.path.join(root, *parts))
    if not (under(real, root) and any(under(real, a) for a in allowed)):
        raise NotAllowed("outside the allowed storage")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise NotAllowed("no such file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAllowed("not a regular file")
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # no /proc: the opened file must be the one that was checked
            ok = os.stat(real, follow_symlinks=False)
            where = real if (ok.st_dev, ok.st_ino) == (st.st_dev, st.st_ino) else ""
        if not (under(where, root) and any(under(where, a) for a in allowed)):
            raise NotAllowed("outside the allowed storage")
    except BaseException:
        os.close(fd)
        raise
    return Opened(st.st_size, lambda off, n: os.pread(fd, n, off), lambda: os.close(fd))


def _open_s3(root: str, parts: list[str], allowed: list[str]) -> Opened:
    import pyarrow.fs as pafs

    root = root.rstrip("/")
    if not any(under(root, a) for a in allowed if storage.is_s3(a)):
        raise NotAllowed("outside the allowed storage")
    fs, path = storage.resolve(storage.join(root, *parts))
    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise NotAllowed("no such file")
        f = fs.open_input_file(path)
    except OSError:
        raise NotAllowed("no such file") from None
    return Opened(info.size, lambda off, n: f.read_at(n, off), f.close)


def read_bytes(root: str, rel: str, allowed: list[str], max_bytes: int) -> bytes:
    """A small file (a manifest, a state file) whole; NotAllowed if it is larger than max_bytes."""
    f = open_file(root, rel, allowed)
    if f.size > max_bytes:
        f.close()
        raise NotAllowed(f"larger than {max_bytes} bytes")
    return f.head(max_bytes)


def read_tail(root: str, rel: str, allowed: list[str], max_bytes: int) -> bytes:
    """The last max_bytes of a file (e.g. of a metrics log that grows with the run)."""
    f = open_file(root, rel, allowed)
    try:
        start = max(0, f.size - max_bytes)
        return f.read_at(start, f.size - start)
    finally:
        f.close()


def list_files(root: str, allowed: list[str], limit: int) -> tuple[list[tuple[str, int | None]], bool]:
    """((relative path, size) of the files under `root`, sorted; truncated) with at most `limit` files.

    Local: never descends through a link; a linked file is listed only if it resolves inside
    `root` and `allowed`, and dangling links, FIFOs and sockets are left out."""
    if storage.is_s3(root):
        return _list_s3(root, allowed, limit)
    if not _local_root_ok(root, allowed):
        return [], False
    root = os.path.normpath(root)
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        try:  # the output may be a single file (generate's samples.jsonl)
            f = open_file(os.path.dirname(root), os.path.basename(root), allowed)
        except NotAllowed:
            return [], False
        f.close()
        return [(os.path.basename(root), f.size)], False
    out: list[tuple[str, int | None]] = []
    budget = max(limit * 50, 10_000)  # directory entries looked at, files or not
    stack: list[tuple[int, str]] = [(root_fd, "")]
    try:
        while stack and len(out) <= limit and budget > 0:
            fd, rel = stack.pop()
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        budget -= 1
                        if budget <= 0 or len(out) > limit:
                            break
                        r = rel + e.name
                        if e.is_symlink():
                            real = os.path.realpath(os.path.join(root, r))
                            if under(real, root) and any(under(real, a) for a in allowed):
                                try:
                                    st = os.stat(real)
                                except OSError:
                                    continue  # dangling
                                if stat.S_ISREG(st.st_mode):
                                    out.append((r, st.st_size))
                        elif e.is_dir(follow_symlinks=False):
                            try:
                                sub = os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                              dir_fd=fd)
                            except OSError:
                                continue  # swapped for a link since scandir saw it, or unreadable
                            stack.append((sub, r + "/"))
                        elif e.is_file(follow_symlinks=False):
                            out.append((r, e.stat(follow_symlinks=False).st_size))
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
    out.sort()
    return out[:limit], len(out) > limit or budget <= 0


def _list_s3(root: str, allowed: list[str], limit: int) -> tuple[list[tuple[str, int | None]], bool]:
    import pyarrow.fs as pafs

    root = root.rstrip("/")
    if not any(under(root, a) for a in allowed if storage.is_s3(a)):
        return [], False
    fs, path = storage.resolve(root)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(root.rsplit("/", 1)[-1], info.size)], False
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted((i.path[len(path) + 1:], i.size) for i in infos if i.type == pafs.FileType.File)
    return files[:limit], len(files) > limit
