"""jobs.prepare end to end on Ray: every input format, every bad-input case, rejects with source
and offset, byte-identical re-runs, crash safety, clear pre-flight errors, and an S3 round trip
against moto's standalone server on 127.0.0.1 with the real boto3/pyarrow clients."""

from __future__ import annotations

import gzip
import io
import json
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import zstandard

from cluster import storage
from jobs.config import load_config
from jobs.data.inputs import expand_inputs
from jobs.data.prepare import clear_output
from jobs.data.shards import load_manifest
from jobs.prepare import PrepareConfig, run

VOCAB = ["river", "stone", "garden", "window", "little", "morning", "silver", "quiet", "people", "travel",
         "history", "market", "summer", "number", "friend", "letter", "orange", "mountain", "between", "always"]


def prose(seed: int, n_words: int = 40) -> str:
    r = random.Random(seed)
    words = [r.choice(VOCAB) + r.choice(["", "s", "ed", "ing"]) + str(r.randrange(50)) for _ in range(n_words)]
    return " ".join(words[:20]) + ".\n" + " ".join(words[20:]) + ".\n"


def warc_record(uri: str, ctype: str, body: bytes, compress=gzip.compress) -> bytes:
    http = f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: {uri}\r\nWARC-Date: 2026-01-01T00:00:00Z\r\n"
            f"WARC-Record-ID: <urn:uuid:{random.Random(uri).getrandbits(128):032x}>\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http)}\r\n\r\n").encode()
    return compress(head + http + b"\r\n\r\n")  # one gzip member per record, as Common Crawl


def html_page(body: str) -> bytes:
    return (f"<html><head><title>t</title><script>var nav = 1;</script></head><body><nav><a href='/'>Home</a> "
            f"<a href='/a'>About</a></nav><main><article><p>{body}</p></article></main>"
            f"<footer>Copyright footer text</footer></body></html>").encode()


def write_corpus(root: Path) -> dict[str, int]:
    """Inputs in every format with every bad case; returns the expected reject counts by reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(prose(1))
    (root / "latin1.txt").write_bytes(prose(2).replace("river", "rivière").encode("cp1252"))  # not UTF-8
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_text("   \n\t\n")
    lines = [json.dumps({"text": prose(10 + i), "id": i}) for i in range(4)]
    lines.insert(1, '{"text": "unterminated')  # malformed JSON
    lines.insert(3, json.dumps({"body": "no text field"}))
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (root / "docs.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps({"text": prose(20 + i)}) for i in range(3)).encode()))
    (root / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "\n".join(json.dumps({"text": prose(30 + i)}) for i in range(3)).encode()))
    full = gzip.compress("\n".join(json.dumps({"text": prose(1000 + i)}) for i in range(200)).encode())
    (root / "cut.jsonl.gz").write_bytes(full[: len(full) // 2])  # truncated gzip
    fullz = zstandard.ZstdCompressor().compress("\n".join(json.dumps({"text": prose(2000 + i)}) for i in range(200)).encode())
    (root / "cut.jsonl.zst").write_bytes(fullz[: len(fullz) // 2])  # truncated zstd
    pq.write_table(pa.table({"text": [prose(50), prose(51)], "n": [1, 2]}), root / "docs.parquet")
    (root / "page.html").write_bytes(html_page(prose(60).replace("\n", " ")))
    (root / "broken.html").write_bytes(b"<html><body><div><p>" + prose(61).encode() + b"<b><i></div></span>&&<<")
    (root / "crawl.warc.gz").write_bytes(
        warc_record("http://x/1", "text/html; charset=utf-8", html_page(prose(70).replace("\n", " ")))
        + warc_record("http://x/img", "image/png", b"\x89PNG\r\n\x1a\n" + bytes(64))
        + warc_record("http://x/2", "text/html", html_page(prose(71).replace("\n", " "))))
    (root / "crawl.warc.zst").write_bytes(zstandard.ZstdCompressor().compress(  # zstd over a whole archive
        warc_record("http://z/1", "text/html", html_page(prose(72).replace("\n", " ")), compress=bytes)))
    (root / "dup.txt").write_text(prose(1))  # exact duplicate of a.txt
    with open(root / "huge.txt", "wb") as f:  # a single 100 MB document
        f.truncate(100 * 1000 * 1000)
    return {"bad_json": 1, "no_text_field": 1, "truncated": 2, "too_large": 1, "not_text": 1, "empty": 2,
            "exact_duplicate": 1}


def config(inputs, output, **kw) -> PrepareConfig:
    return PrepareConfig(inputs=inputs, output=output, vocab_size=300, seq_len=16, num_shards=2, val_fraction=0.2,
                         clean={"min_words": 10}, **kw)


@pytest.fixture(scope="module")
def bad_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    expected = write_corpus(root / "in")
    cfg = config([str(root / "in")], str(root / "out"))
    manifest = run(cfg)
    return root, cfg, manifest, expected


def read_rejects(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "rejects").glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_every_format_and_bad_input_is_counted(bad_run, capsys):
    root, cfg, manifest, expected = bad_run
    out = Path(cfg.output)
    report = json.loads((out / "report.json").read_text())
    rejects = read_rejects(out)
    by_reason: dict[str, int] = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    for reason, n in expected.items():
        assert by_reason.get(reason) == n, (reason, by_reason)
    # the 100 MB document, the cut streams, the malformed line: named by file and offset
    src = {(Path(r["source"]).name, r["reason"]): r["offset"] for r in rejects}
    assert ("huge.txt", "too_large") in src and ("docs.jsonl", "bad_json") in src
    assert src[("docs.jsonl", "bad_json")] == len(json.dumps({"text": prose(10), "id": 0})) + 1
    assert {("cut.jsonl.gz", "truncated"), ("cut.jsonl.zst", "truncated")} <= set(src)
    assert not [r for r in rejects if Path(r["source"]).name == "crawl.warc.zst"]
    from jobs.data.read import read_units

    read = [b for b in read_units({"paths": [[str(root / "in" / "crawl.warc.zst")]]}, "auto", {
        "text_field": "text", "max_document_bytes": 1 << 20, "max_replacement_fraction": 0.01, "markdown_split_level": None})]
    assert prose(72).split()[0] in read[0]["text"][0]  # the page inside the zstd-compressed archive
    # the records before a truncation are kept; nothing vanished: in = out + every reject
    funnel = report["funnel"]
    assert funnel[0]["documents_in"] == funnel[-1]["documents_out"] + len(rejects)
    assert funnel[-1]["documents_out"] == manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"]
    kept_min = 1 + 1 + 4 + 3 + 3 + 2 + 1 + 1 + 2 + 1 + 1  # txt, latin1, jsonl, gz, zst, parquet, html x2, warc, cut > 0, warc.zst
    assert funnel[-1]["documents_out"] >= kept_min
    assert manifest["splits"]["train"]["sequences"] > 0
    arr = np.load(out / manifest["splits"]["train"]["shards"][0]["file"])
    assert arr.dtype == np.uint16 and arr.shape[1] == cfg.seq_len + 1
    assert oct((out / "tokenizer.json").stat().st_mode & 0o777) != "0o600"
    assert {"config_sha256", "inputs", "tokenizer_sha256", "unigram_val_loss"} <= set(manifest)


def test_rerun_is_byte_identical_and_crash_safe(bad_run):
    root, cfg, manifest, _ = bad_run
    out = Path(cfg.output)
    first = {f.name: f.read_bytes() for f in out.glob("*.npy")}
    first_rejects = {f.name: f.read_bytes() for f in (out / "rejects").glob("*")}
    # simulate a run killed mid-write: a torn temporary, a garbled shard, an orphan rejects file
    (out / ".train-00000.npy.abc123.tmp").write_bytes(b"partial")
    (out / "train-00000.npy").write_bytes(b"garbage")
    (out / "rejects" / "rejects-00099.jsonl").write_text("stale\n")
    again = run(cfg)
    assert {f.name: f.read_bytes() for f in out.glob("*.npy")} == first
    assert {f.name: f.read_bytes() for f in (out / "rejects").glob("*")} == first_rejects
    assert not list(out.glob(".*.tmp"))
    assert again["splits"] == manifest["splits"]
    for sh in again["splits"]["train"]["shards"] + again["splits"]["val"]["shards"]:
        assert storage.sha256_file(out / sh["file"]) == sh["sha256"]


def test_manifest_hidden_while_rewriting(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text('{"format": "raylm.shards/1"}')
    (out / ".val-00000.npy.x.tmp").write_bytes(b"x")
    clear_output(config(["x"], str(out)))
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp"))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_manifest(str(out))


def test_missing_or_empty_inputs_fail_before_any_work(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "zero.txt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"inputs\[0\].*nope"):
        expand_inputs([str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="only empty files"):
        expand_inputs([str(tmp_path / "zero.txt")])
    with pytest.raises(FileNotFoundError):
        run(config([str(tmp_path / "nope")], str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()  # nothing was started
    with pytest.raises(Exception, match="text_field|unknown key"):
        load_config(PrepareConfig, overrides={"output": "x", "text_feild": "body"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_round_trip(ray_local, tmp_path, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                     "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        s3.create_bucket(Bucket="corpus")
        body = gzip.compress("\n".join(json.dumps({"content": prose(500 + i)}) for i in range(30)).encode())
        s3.put_object(Bucket="corpus", Key="raw/part-0.jsonl.gz", Body=body)
        s3.put_object(Bucket="corpus", Key="raw/part-1.jsonl", Body=b'{"content": "x"}\nnot json\n')
        manifest = run(config(["s3://corpus/raw/"], "s3://corpus/prepared", text_field="content"))
        assert load_manifest("s3://corpus/prepared")["splits"] == manifest["splits"]
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="corpus", Prefix="prepared/")["Contents"]}
        assert {"prepared/manifest.json", "prepared/tokenizer.json", "prepared/report.json"} <= keys
        sh = manifest["splits"]["train"]["shards"][0]
        data = s3.get_object(Bucket="corpus", Key=f"prepared/{sh['file']}")["Body"].read()
        assert storage.sha256_bytes(data) == sh["sha256"]
        assert np.load(io.BytesIO(data)).shape == (sh["sequences"], 17)
        rejects = [json.loads(line) for k in keys if "/rejects/" in k
                   for line in s3.get_object(Bucket="corpus", Key=k)["Body"].read().decode().splitlines()]
        assert {(r["source"], r["reason"]) for r in rejects} == {
            ("s3://corpus/raw/part-1.jsonl", "too_few_words"), ("s3://corpus/raw/part-1.jsonl", "bad_json")}
    finally:
        server.stop()
