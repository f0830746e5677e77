"""Packed token shards: the manifest that jobs.prepare writes last, the shard writer, and the
deterministic reader that training and evaluation use.

    manifest.json   format, seq_len, dtype, vocab_size, tokenizer and its sha256, splits with
                    each shard's file, sha256, sequences, tokens, documents
    train-00000.npy uint16/uint32 arrays of shape (sequences, seq_len + 1)
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from cluster import storage
from model.tokenizer import EOT, load_tokenizer

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "raylm.shards/1"


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def load_manifest(data: str) -> dict:
    uri = storage.join(data, MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(f"data: no {MANIFEST} under {data!r} (run jobs.prepare first, or it did not finish)")
    m = storage.read_json(uri)
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"data: {uri} has format {m.get('format') if isinstance(m, dict) else None!r}, "
                         f"expected {MANIFEST_FORMAT!r}")
    # Shard and tokenizer names are plain file names beside the manifest: a manifest must not make
    # a job read files elsewhere (another tenant's shards, say).
    names = [m.get("tokenizer")] + [s.get("file") for sp in m.get("splits", {}).values() for s in sp.get("shards", [])]
    for name in names:
        if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
            raise ValueError(f"data: {uri} names the file {str(name)[:80]!r}, which is not a file beside it")
    return m


# ----------------------------------------------------------------------------- writing

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


def unigram_loss(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """Cross-entropy (nats/token) of val under a smoothed unigram model fit on train: the
    loss of a model that has learned token frequencies and nothing else."""
    p = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
    total = val_counts.sum()
    return float(-(val_counts * np.log(p)).sum() / total) if total else float("nan")


# ----------------------------------------------------------------------------- reading

class ShardLoader:
    """Deterministic batches from memory-mapped shards.

    The global batch of step s is rows perm_e[(s*G + j) % n] for j < G, where perm_e is the
    permutation of epoch e = (s*G + j) // n seeded by (seed, e). It depends only on (seed, step),
    never on the worker count; worker r of W reads only its contiguous G/W slice.
    """

    def __init__(self, data_dir: str | Path, manifest: dict, split: str, seed: int):
        shards = manifest["splits"][split]["shards"]
        self.arrays = [np.load(storage.local_path(Path(data_dir) / s["file"]), mmap_mode="r")
                       for s in shards if s["sequences"]]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.n = int(self.offsets[-1])
        if self.n == 0:
            raise ValueError(f"data: the {split!r} split has no sequences (more data, or a smaller seq_len)")
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def _row(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.arrays[s][i - self.offsets[s]]

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1]

    def rows(self, start: int, count: int, shuffle: bool = True) -> "torch.Tensor":
        import torch  # here, not at the top: prepare's Ray Data workers import this module too

        out = []
        for g in range(start, start + count):
            epoch, pos = divmod(g, self.n)
            out.append(self._row(int(self._order(epoch)[pos]) if shuffle else pos))
        return torch.from_numpy(np.stack(out).astype(np.int64))

    def micro_batch(self, step: int, global_batch: int, rank: int, world: int, micro: int, micro_size: int):
        start = step * global_batch + rank * (global_batch // world) + micro * micro_size
        rows = self.rows(start, micro_size)
        return rows[:, :-1], rows[:, 1:]  # inputs, targets: (B, T)
