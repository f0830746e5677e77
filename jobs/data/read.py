"""Reading raw corpora: files -> document rows, inside Ray Data tasks.

Formats (chosen by extension after stripping `.gz`/`.zst`, or forced by `format`):
plain text, Markdown, JSONL/JSON (a configurable text field), Parquet, HTML, WARC (response
records). Every file is streamed through pyarrow's filesystem (local or S3) and decompressed as
a stream, so a file is never read whole unless its format needs it (a JSON array, Parquet).

Every input record becomes exactly one row: a document (`reason == ""`) or a reject with a named
reason, its source file and offset (byte offset in the decompressed stream; the row number for
Parquet). Nothing that was read disappears without a count.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cluster import storage

EXT_FORMATS = {
    ".txt": "text", ".text": "text",
    ".md": "markdown", ".markdown": "markdown",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".html": "html", ".htm": "html", ".xhtml": "html",
    ".warc": "warc",
}
PREVIEW_CHARS = 500
# Rows are flushed to Ray Data in batches of about this size, so that reading a large file never
# holds more than one batch of documents in the task.
BATCH_BYTES = 16 << 20
BATCH_DOCS = 2048


def compression(path: str) -> str | None:
    p = path.lower()
    return "gzip" if p.endswith(".gz") else "zstd" if p.endswith(".zst") else None


def file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    p = path.lower()
    for suffix in (".gz", ".zst"):
        if p.endswith(suffix):
            p = p[: -len(suffix)]
    if p.endswith(".warc"):  # fastwarc decompresses .warc.gz itself
        return "warc"
    return EXT_FORMATS.get(Path(p).suffix, "text")


class Truncated(Exception):
    """A compressed stream ended before its end marker (or its data was corrupt)."""

    def __init__(self, offset: int, detail: str):
        super().__init__(detail)
        self.offset = offset


def iter_chunks(uri: str) -> Iterator[bytes]:
    """Decompressed chunks of a local file or S3 object. A gzip or zstd stream that ends before
    its end marker raises EOFError after its last complete chunk."""
    fs, path = storage.resolve(uri)
    comp = compression(uri)
    with fs.open_input_stream(path, compression=None) as raw:  # pyarrow would guess by extension
        if comp == "gzip":
            yield from _gzip_chunks(raw)
        elif comp == "zstd":
            yield from _zstd_chunks(raw)
        else:
            while chunk := raw.read(1 << 20):
                yield chunk


def _gzip_chunks(raw) -> Iterator[bytes]:
    # zlib directly rather than gzip.GzipFile, which raises on a cut stream without handing out
    # the data it decompressed from the same read; members are concatenated as gzip allows.
    yield from _members(raw, lambda: zlib.decompressobj(wbits=31), zlib.error, "gzip")


def _zstd_chunks(raw) -> Iterator[bytes]:
    # zstandard's stream_reader answers a cut frame with a short read, not an error: decompress
    # frame by frame and check that the last one was complete.
    import zstandard

    yield from _members(raw, zstandard.ZstdDecompressor().decompressobj, zstandard.ZstdError, "zstd")


def _members(raw, decompressor, error: type[Exception], codec: str) -> Iterator[bytes]:
    """Decompress concatenated members (gzip) or frames (zstd) as they arrive; a corrupt stream,
    or one cut inside its last member, raises EOFError after what came before it was yielded."""
    obj, inside = decompressor(), False
    while chunk := raw.read(1 << 16):
        while chunk:
            try:
                out = obj.decompress(chunk)
            except error as e:
                raise EOFError(f"{codec}: {e}") from e
            inside = True
            if out:
                yield out
            if obj.eof:
                chunk, obj, inside = obj.unused_data, decompressor(), False
            else:
                chunk = b""
    if inside:
        raise EOFError(f"{codec} stream ended inside its last {'member' if codec == 'gzip' else 'frame'}")


def read_all(uri: str, limit: int) -> tuple[bytes, Exception | None]:
    """Up to `limit` + 1 decompressed bytes, and the error that stopped the stream early, if any."""
    out = bytearray()
    try:
        for chunk in iter_chunks(uri):
            out += chunk
            if len(out) > limit:
                break
    except (EOFError, OSError, ValueError) as e:  # gzip raises BadGzipFile (OSError) on garbage
        return bytes(out), e
    return bytes(out), None


def iter_lines(uri: str) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of a possibly compressed text stream; a truncated stream raises
    Truncated after the last complete line."""
    offset = 0
    pieces: list[bytes] = []  # of the current line; split only new chunks, never the joined line
    try:
        for chunk in iter_chunks(uri):
            parts = chunk.split(b"\n")
            if len(parts) == 1:
                pieces.append(chunk)
                continue
            pieces.append(parts[0])
            for line in (b"".join(pieces), *parts[1:-1]):
                yield offset, line
                offset += len(line) + 1
            pieces = [parts[-1]]
    except (EOFError, OSError, ValueError) as e:
        raise Truncated(offset, f"{type(e).__name__}: {e}") from e
    if last := b"".join(pieces):
        yield offset, last


def decode_bytes(data: bytes, max_replacement_fraction: float) -> tuple[str | None, str]:
    """(text, "") or (None, reason). UTF-8 first; else the detected encoding (resiliparse)."""
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError:
        pass
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    text = bytes_to_str(data, detect_encoding(data), errors="replace", fallback_encodings=("utf-8", "cp1252"))
    bad = text.count("\ufffd")
    if bad > max_replacement_fraction * max(len(text), 1):
        return None, "undecodable"
    return text, ""


class Rows:
    """Column buffers of document rows, flushed as Ray Data batches."""

    COLUMNS = ("text", "source", "offset", "html", "reason", "preview", "raw_bytes")

    def __init__(self):
        self.cols: dict[str, list] = {c: [] for c in self.COLUMNS}
        self.bytes = 0

    def doc(self, text: str, source: str, offset: int, raw_bytes: int, html: bool = False) -> None:
        self._add(text, source, offset, html, "", "", raw_bytes)

    def reject(self, reason: str, source: str, offset: int, preview: str | bytes, raw_bytes: int) -> None:
        if isinstance(preview, bytes):
            preview = preview[: PREVIEW_CHARS * 4].decode("utf-8", errors="replace")
        self._add("", source, offset, False, reason, preview[:PREVIEW_CHARS], raw_bytes)

    def _add(self, text, source, offset, html, reason, preview, raw_bytes):
        for c, v in zip(self.COLUMNS, (text, source, offset, html, reason, preview, raw_bytes)):
            self.cols[c].append(v)
        self.bytes += len(text)

    def full(self) -> bool:
        return self.bytes >= BATCH_BYTES or len(self.cols["text"]) >= BATCH_DOCS

    def flush(self, seconds: float) -> dict:
        n = len(self.cols["text"])
        batch = {
            "text": np.array(self.cols["text"], dtype=object),
            "source": np.array(self.cols["source"], dtype=object),
            "offset": np.array(self.cols["offset"], dtype=np.int64),
            "html": np.array(self.cols["html"], dtype=bool),
            "reason": np.array(self.cols["reason"], dtype=object),
            "preview": np.array(self.cols["preview"], dtype=object),
            "raw_bytes": np.array(self.cols["raw_bytes"], dtype=np.int64),
            # the batch's read time, spread over its rows, so that stage CPU time can be summed
            "t_read": np.full(n, seconds / max(n, 1)),
        }
        self.__init__()
        return batch


# ----------------------------------------------------------------------------- per format


# ----------------------------------------------------------------------------- Markdown

_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_EMPHASIS = re.compile(r"(\*\*|__|\*|_)(\S(?:.*?\S)?)\1")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")


def markdown_to_text(md: str) -> str:
    """Strip Markdown markup, keeping the words: headings, emphasis, links, hard breaks."""
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        if m := _HEADING.match(line):
            line = m.group(2)
        elif m := _SPEAKER.match(line):
            line = m.group(1) + ":"  # a speaker's name on its own line, as in a play script
        line = _LINK.sub(r"\1", line)
        line = _EMPHASIS.sub(r"\2", line)
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def split_markdown(md: str, level: int) -> list[str]:
    """Split at headings of exactly `level`; text before the first one joins the first part."""
    parts = re.split(rf"(?m)^(?={'#' * level}\s)", md)
    if len(parts) > 1 and not parts[0].lstrip().startswith("#" * level + " "):
        parts = [parts[0] + parts[1], *parts[2:]]
    return [p for p in parts if p.strip()]


def read_text_like(uri: str, fmt: str, rows: Rows, opts: dict) -> None:
    limit = opts["max_document_bytes"]
    data, err = read_all(uri, limit)
    if len(data) > limit:
        rows.reject("too_large", uri, 0, data[:PREVIEW_CHARS], len(data))
        return
    if err is not None:
        rows.reject("truncated", uri, len(data), data[:PREVIEW_CHARS], len(data))
        return
    text, reason = decode_bytes(data, opts["max_replacement_fraction"])
    if text is None:
        rows.reject(reason, uri, 0, data[:PREVIEW_CHARS], len(data))
        return
    if fmt == "markdown":
        level = opts["markdown_split_level"]
        parts = split_markdown(text, level) if level else [text]
        offset = 0
        for part in parts:
            start = text.find(part, offset)
            offset = start + len(part)
            byte_offset = len(text[:start].encode("utf-8", errors="surrogatepass"))
            n = len(part.encode("utf-8", errors="surrogatepass"))
            rows.doc(markdown_to_text(part), uri, byte_offset, n)
    else:
        rows.doc(text, uri, 0, len(data), html=(fmt == "html"))


def read_jsonl(uri: str, rows: Rows, opts: dict) -> Iterator[None]:
    field, limit = opts["text_field"], opts["max_document_bytes"]
    first = True
    try:
        for offset, line in iter_lines(uri):
            if first:
                first = False
                if line.lstrip().startswith(b"["):  # a JSON array, not JSON Lines
                    yield from read_json_array(uri, rows, opts)
                    return
            if not line.strip():
                continue
            if len(line) > limit:
                rows.reject("too_large", uri, offset, line[:PREVIEW_CHARS], len(line))
                continue
            text, reason = decode_bytes(line, opts["max_replacement_fraction"])
            if text is None:
                rows.reject(reason, uri, offset, line, len(line))
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                rows.reject("bad_json", uri, offset, f"{e}: {text}", len(line))
                continue
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                rows.reject("no_text_field", uri, offset, text, len(line))
                continue
            rows.doc(value, uri, offset, len(line))
            if rows.full():
                yield
    except Truncated as e:
        rows.reject("truncated", uri, e.offset, str(e), 0)


def read_json_array(uri: str, rows: Rows, opts: dict) -> Iterator[None]:
    data, err = read_all(uri, opts["max_document_bytes"])
    if err is not None or len(data) > opts["max_document_bytes"]:
        rows.reject("truncated" if err is not None else "too_large", uri, 0, data[:PREVIEW_CHARS], len(data))
        return
    try:
        records = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        rows.reject("bad_json", uri, 0, f"{e}", len(data))
        return
    for i, record in enumerate(records):
        value = record.get(opts["text_field"]) if isinstance(record, dict) else None
        if isinstance(value, str):
            rows.doc(value, uri, i, len(value.encode("utf-8", errors="surrogatepass")))
        else:
            rows.reject("no_text_field", uri, i, json.dumps(record)[:PREVIEW_CHARS], 0)
        if rows.full():
            yield


def read_parquet(uri: str, rows: Rows, opts: dict) -> Iterator[None]:
    import pyarrow.parquet as pq

    field = opts["text_field"]
    fs, path = storage.resolve(uri)
    row = 0
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            if field not in pf.schema_arrow.names:
                rows.reject("no_text_field", uri, 0, f"columns: {pf.schema_arrow.names}", 0)
                return
            for batch in pf.iter_batches(columns=[field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    if isinstance(value, bytes):
                        value, reason = decode_bytes(value, opts["max_replacement_fraction"])
                    if isinstance(value, str):
                        rows.doc(value, uri, row, len(value.encode("utf-8", errors="surrogatepass")))
                    else:
                        rows.reject("no_text_field", uri, row, repr(value), 0)
                    row += 1
                if rows.full():
                    yield
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a corrupt or cut file
        rows.reject("bad_parquet", uri, row, f"{type(e).__name__}: {e}", 0)


def read_warc(uri: str, rows: Rows, opts: dict) -> Iterator[None]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    fs, path = storage.resolve(uri)
    offset = 0
    try:
        with fs.open_input_file(path) as raw:  # fastwarc calls tell(): a seekable file
            # fastwarc detects and decompresses gzip members itself
            for record in ArchiveIterator(raw, record_types=WarcRecordType.response, parse_http=True):
                offset = record.stream_pos
                ctype = (record.http_content_type or "").lower()
                body = record.reader.read()
                target = record.headers.get("WARC-Target-URI", "")
                if "html" not in ctype and "text/plain" not in ctype:
                    rows.reject("not_text", uri, offset, f"{ctype or 'no content type'} {target}", len(body))
                elif len(body) > opts["max_document_bytes"]:
                    rows.reject("too_large", uri, offset, target, len(body))
                else:
                    text, reason = decode_html_bytes(body, record.http_charset, opts)
                    if text is None:
                        rows.reject(reason, uri, offset, body, len(body))
                    else:
                        rows.doc(text, uri, offset, len(body), html="html" in ctype)
                if rows.full():
                    yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a cut or corrupt archive (fastwarc may panic): keep what was read, count the rest
        rows.reject("truncated", uri, offset, f"{type(e).__name__}: {e}", 0)


def decode_html_bytes(body: bytes, charset: str | None, opts: dict) -> tuple[str | None, str]:
    if charset:
        try:
            return body.decode(charset), ""
        except (LookupError, UnicodeDecodeError):
            pass
    return decode_bytes(body, opts["max_replacement_fraction"])


# ----------------------------------------------------------------------------- the Ray Data UDF

STREAM_READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "warc": read_warc}


def read_units(batch: dict, fmt: str, opts: dict) -> Iterator[dict]:
    """Ray Data generator UDF: a batch of read units (lists of files) -> batches of document rows."""
    rows = Rows()
    t0 = time.process_time()
    for paths in batch["paths"]:
        for uri in paths:
            f = file_format(uri, fmt)
            if f in STREAM_READERS:
                for _ in STREAM_READERS[f](uri, rows, opts):
                    yield rows.flush(time.process_time() - t0)
                    t0 = time.process_time()
            else:
                read_text_like(uri, f, rows, opts)
            if rows.full():
                yield rows.flush(time.process_time() - t0)
                t0 = time.process_time()
    if rows.cols["text"]:
        yield rows.flush(time.process_time() - t0)


def plan_units(files: list[tuple[str, int]], target_bytes: int = 64 << 20) -> list[list[str]]:
    """Group (file, size) into read units of about `target_bytes`: one Ray task per unit, so that
    many small HTML pages share a task and a large file gets one of its own."""
    units, cur, size = [], [], 0
    for path, n in files:
        if cur and size + n > target_bytes:
            units.append(cur)
            cur, size = [], 0
        cur.append(path)
        size += n
    if cur:
        units.append(cur)
    return units

