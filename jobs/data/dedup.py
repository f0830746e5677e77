"""Deduplication on Ray Data: exact (hash of the normalised text) and fuzzy (MinHash LSH).

Nothing here collects documents or signatures on the driver:

1. Signatures: word n-gram shingles hashed with xxhash and permuted in numpy with datasketch's
   own permutation parameters (scheme `affine32`), equal to `MinHash.update_batch` (tested).
2. LSH: each signature is cut into `b` bands of `r` rows (chosen by datasketch to minimise the
   false-positive plus false-negative area at the threshold); every (band, band hash) is a
   bucket. Rows are hash-partitioned by bucket with a Ray Data groupby; inside a partition the
   members of each bucket become star edges (smallest document hash -> every other member),
   optionally verified by signature Jaccard.
3. Connected components of the candidate edges on the driver, by vectorised min-label
   propagation over the edge list only (about 64 bytes per edge, see docs/data.md).
4. Apply: the documents and one marker row per non-root member of a component are
   hash-partitioned by document hash; each partition keeps, for every hash, the copy with the
   smallest (source, offset) unless the hash is marked, and rejects the rest by reason.

Every choice depends on the document hashes only, so the output does not depend on how Ray
split the data into blocks or partitions.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import xxhash
from jobs.data.config import DedupConfig, lsh_params
from jobs.data.totals import totals

_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1
SIG_DTYPE = np.uint32


# ----------------------------------------------------------------------------- shingles and signatures


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(text: str, n: int) -> list[bytes]:
    """The word n-gram shingles of a text (a text shorter than n words is one shingle)."""
    w = words(text)
    n = min(n, len(w))
    return [" ".join(w[i:i + n]).encode("utf-8", errors="surrogatepass") for i in range(len(w) - n + 1)] if n else []


def shingle_hash(shingle: bytes) -> int:
    """32-bit hash of one shingle: the scalar definition that `shingle_hashes` vectorises."""
    h = 0
    for word in shingle.split(b" "):
        h = (h * int(_MIX) + xxhash.xxh3_64_intdigest(word)) & _MASK64
    return h >> 32


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """`shingle_hash` of every shingle of `text`: one xxhash per word, combined in numpy."""
    w = words(text)
    if not w:
        return np.zeros(0, dtype=np.uint32)
    wh = np.fromiter((xxhash.xxh3_64_intdigest(x.encode("utf-8", errors="surrogatepass")) for x in w),
                     dtype=np.uint64, count=len(w))
    n = min(n, len(w))
    m = len(w) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):  # uint64 arithmetic wraps, as the & _MASK64 in shingle_hash
        h = h * _MIX + wh[k:k + m]
    return (h >> np.uint64(32)).astype(np.uint32)


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer: datasketch's pre-mix of scheme affine32 (`minhash._fmix`),
    written out so that the Ray tasks that compute signatures do not import datasketch, whose
    package imports scipy (~1.3 s of CPU in every fresh worker process)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """Signatures equal to datasketch's `MinHash(num_perm, seed, hashfunc=shingle_hash)`.

    Built where datasketch is imported anyway (the driver) and pickled to the tasks: it carries
    datasketch's permutation parameters as two arrays."""

    CHUNK = 4096  # shingles per step: bounds the (chunk, num_perm) temporary to 2 MB at 128 perms

    def __init__(self, num_perm: int, seed: int):
        from datasketch import MinHash

        proto = MinHash(num_perm=num_perm, seed=seed, scheme="affine32")
        self.a, self.b = (np.asarray(p, dtype=np.uint32) for p in proto.permutations)
        self.num_perm = num_perm

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        hv = fmix32(hashes.astype(np.uint32))
        for s in range(0, len(hv), self.CHUNK):
            part = hv[s:s + self.CHUNK, None] * self.a + self.b
            np.minimum(sig, part.min(axis=0), out=sig)
        return sig

    def signatures(self, texts, ngram: int) -> np.ndarray:
        return np.stack([self.signature(shingle_hashes(t, ngram)) for t in texts]) if len(texts) \
            else np.zeros((0, self.num_perm), dtype=np.uint32)


def lsh_report(threshold: float, num_perm: int) -> dict:
    from datasketch.lsh import _false_negative_probability, _false_positive_probability

    b, r = lsh_params(threshold, num_perm)
    curve = {f"{s:.2f}": round(1 - (1 - s ** r) ** b, 4)
             for s in (threshold - 0.1, threshold - 0.05, threshold, threshold + 0.05, threshold + 0.1) if 0 < s <= 1}
    return {"bands": b, "rows": r, "false_positive_area": round(_false_positive_probability(threshold, b, r), 4),
            "false_negative_area": round(_false_negative_probability(threshold, b, r), 4),
            "candidate_probability": curve}


# ----------------------------------------------------------------------------- LSH on Ray Data

def band_rows(batch: dict, hasher: MinHasher, ngram: int, bands: int, rows: int, partitions: int,
              verify: bool) -> dict:
    """Ray Data UDF: documents -> one row per (document, band) with the band's bucket key."""
    t0 = time.process_time()
    hashes = np.asarray(batch["hash"], dtype=np.uint64)
    # a document without words has the empty signature, equal for all such documents: leave
    # them to exact dedup rather than making them one giant bucket
    has_words = np.array([bool(_WORD.search(t)) for t in batch["text"]], dtype=bool)
    hashes = hashes[has_words]
    texts = [t for t, ok in zip(batch["text"], has_words) if ok]
    sigs = hasher.signatures(texts, ngram)
    n = len(texts)
    band = np.repeat(np.arange(bands, dtype=np.int32)[None, :], n, axis=0).reshape(-1)
    keys = np.fromiter(
        (xxhash.xxh3_64_intdigest(sigs[i, j * rows:(j + 1) * rows].tobytes(), seed=j)
         for i in range(n) for j in range(bands)), dtype=np.uint64, count=n * bands)
    out = {
        "band": band,
        "key": keys,
        "hash": np.repeat(hashes, bands),
        "part": (keys % np.uint64(partitions)).astype(np.int64),
        "t_minhash": np.full(n * bands, (time.process_time() - t0) / max(n * bands, 1)),
    }
    if verify:
        out["sig"] = np.repeat(sigs, bands, axis=0)
    return out


def bucket_edges(group: dict, threshold: float, verify: bool) -> dict:
    """Ray Data map_groups UDF: the band rows of one partition -> deduplicated candidate edges.

    Within each bucket the member with the smallest document hash is the root, and every other
    member gets an edge to it; with `verify`, an edge stays only if the two signatures agree on at
    least `threshold` of their positions.
    """
    band, key, h = (np.asarray(group[c]) for c in ("band", "key", "hash"))
    order = np.lexsort((h, key, band))
    band, key, h = band[order], key[order], h[order]
    new_bucket = np.ones(len(h), dtype=bool)
    new_bucket[1:] = (band[1:] != band[:-1]) | (key[1:] != key[:-1])
    starts = np.flatnonzero(new_bucket)
    root_row = starts[np.cumsum(new_bucket) - 1]
    member = (~new_bucket) & (h != h[root_row])  # copies of the root's text are exact duplicates
    src, dst = h[root_row][member], h[member]
    if verify and len(src):
        sig = np.asarray(group["sig"])[order]
        sim = (sig[root_row[member]] == sig[member]).mean(axis=1)
        keep = sim >= threshold
        src, dst = src[keep], dst[keep]
    if len(src):
        pairs = np.unique(np.stack([src, dst], axis=1), axis=0)
        src, dst = pairs[:, 0], pairs[:, 1]
    return {"src": src.astype(np.uint64), "dst": dst.astype(np.uint64)}


def connected_components(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, root of each node): the root is the smallest node of its component.

    Min-label propagation with pointer jumping, vectorised over the edge list; converges in
    O(log(diameter)) rounds for the star-shaped buckets that LSH produces.
    """
    if not len(src):
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)
    nodes, inv = np.unique(np.concatenate([src, dst]), return_inverse=True)
    ia, ib = inv[:len(src)], inv[len(src):]
    label = np.arange(len(nodes))  # nodes are sorted, so the smallest index is the smallest hash
    while True:
        m = np.minimum(label[ia], label[ib])
        new = label.copy()
        np.minimum.at(new, ia, m)
        np.minimum.at(new, ib, m)
        while True:  # pointer jumping: follow labels to their own labels
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new


@dataclass
class FuzzyResult:
    losers: np.ndarray
    """Document hashes to remove (members of a component other than its root)."""
    roots: np.ndarray
    """The kept document of each loser's component."""
    stats: dict


def find_near_duplicates(docs, cfg: DedupConfig, num_partitions: int) -> FuzzyResult:
    """Near-duplicate document hashes of a Ray Dataset with `text` and `hash` columns."""
    t0 = time.time()
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    band_ds = docs.select_columns(["text", "hash"]).map_batches(band_rows, fn_kwargs={
        "hasher": MinHasher(cfg.num_perm, cfg.seed), "ngram": cfg.ngram, "bands": bands, "rows": rows,
        "partitions": num_partitions, "verify": cfg.verify}, batch_format="numpy").materialize()
    t_sig = time.time()
    cpu_minhash = float(totals(band_ds, ("t_minhash",)).get("", {}).get("t_minhash", 0.0))
    edges = band_ds.groupby("part", num_partitions=num_partitions).map_groups(
        bucket_edges, batch_format="numpy", fn_kwargs={"threshold": cfg.threshold, "verify": cfg.verify})
    src_parts, dst_parts = [], []
    for b in edges.iter_batches(batch_format="numpy", batch_size=1 << 20):
        src_parts.append(b["src"])
        dst_parts.append(b["dst"])
    src = np.concatenate(src_parts) if src_parts else np.zeros(0, dtype=np.uint64)
    dst = np.concatenate(dst_parts) if dst_parts else np.zeros(0, dtype=np.uint64)
    t_lsh = time.time()
    nodes, roots = connected_components(src, dst)
    losers = nodes != roots
    stats = {
        **lsh_report(cfg.threshold, cfg.num_perm),
        "edges": int(len(src)), "components": int(np.sum(~losers)), "documents_in_components": int(len(nodes)),
        "near_duplicates": int(np.sum(losers)), "seconds_signatures": round(t_sig - t0, 3),
        "cpu_seconds_signatures": round(cpu_minhash, 3), "seconds_lsh": round(t_lsh - t_sig, 3),
        "seconds_components": round(time.time() - t_lsh, 3),
    }
    return FuzzyResult(nodes[losers], roots[losers], stats)


# ----------------------------------------------------------------------------- applying the decisions

APPLY_COLUMNS = ("text", "source", "offset", "hash", "raw_bytes", "marker", "root")


def dedup_partition(group: dict, exact: bool) -> dict:
    """Ray Data map_groups UDF: documents and loser markers of one hash partition -> every
    document once, kept (`reason == ""`) or rejected as an exact or near duplicate."""
    marker = np.asarray(group["marker"], dtype=bool)
    h = np.asarray(group["hash"], dtype=np.uint64)
    loser_root = dict(zip(h[marker].tolist(), np.asarray(group["root"])[marker].tolist()))
    idx = np.flatnonzero(~marker)
    src = np.asarray(group["source"], dtype=object)[idx]
    off = np.asarray(group["offset"], dtype=np.int64)[idx]
    hd = h[idx]
    order = sorted(range(len(idx)), key=lambda i: (int(hd[i]), src[i], int(off[i])))
    texts = np.asarray(group["text"], dtype=object)[idx]
    out_text, reasons, previews, roots = [], [], [], []
    prev = None
    for i in order:
        hv = int(hd[i])
        first = hv != prev
        prev = hv
        if hv in loser_root:
            reason, root = "near_duplicate", loser_root[hv]
        elif exact and not first:
            reason, root = "exact_duplicate", hv
        else:
            reason, root = "", 0
        out_text.append("" if reason else texts[i])
        previews.append(texts[i][:500] if reason else "")
        reasons.append(reason)
        roots.append(root)
    sel = idx[np.array(order, dtype=np.int64)] if order else np.zeros(0, dtype=np.int64)
    return {
        "text": np.array(out_text, dtype=object),
        "source": np.asarray(group["source"], dtype=object)[sel],
        "offset": np.asarray(group["offset"], dtype=np.int64)[sel],
        "hash": h[sel],
        "raw_bytes": np.asarray(group["raw_bytes"], dtype=np.int64)[sel],
        "reason": np.array(reasons, dtype=object),
        "preview": np.array(previews, dtype=object),
        "duplicate_of": np.array(roots, dtype=np.uint64),
    }


def apply_dedup(docs, fuzzy: FuzzyResult | None, exact: bool, num_partitions: int):
    """Documents (columns text, source, offset, hash, raw_bytes) -> the same documents, each with
    `reason` "" (kept), "exact_duplicate" or "near_duplicate", and `duplicate_of`."""
    import pyarrow as pa
    import ray.data

    parts = np.uint64(num_partitions)
    body = docs.select_columns(["text", "source", "offset", "hash", "raw_bytes"]).map_batches(
        lambda b: {**b, "hash": np.asarray(b["hash"], dtype=np.uint64), "marker": np.zeros(len(b["hash"]), dtype=bool),
                   "root": np.zeros(len(b["hash"]), dtype=np.uint64),
                   "part": (np.asarray(b["hash"], dtype=np.uint64) % parts).astype(np.int64)},
        batch_format="numpy")
    if fuzzy is not None and len(fuzzy.losers):
        n = len(fuzzy.losers)
        markers = ray.data.from_arrow(pa.table({
            "text": pa.array([""] * n, pa.string()), "source": pa.array([""] * n, pa.string()),
            "offset": pa.array(np.zeros(n, dtype=np.int64)), "hash": pa.array(fuzzy.losers.astype(np.uint64)),
            "raw_bytes": pa.array(np.zeros(n, dtype=np.int64)), "marker": pa.array(np.ones(n, dtype=bool)),
            "root": pa.array(fuzzy.roots.astype(np.uint64)),
            "part": pa.array((fuzzy.losers.astype(np.uint64) % parts).astype(np.int64)),
        }))
        body = body.union(markers)
    return body.groupby("part", num_partitions=num_partitions).map_groups(
        dedup_partition, batch_format="numpy", fn_kwargs={"exact": exact})
