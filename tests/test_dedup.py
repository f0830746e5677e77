"""Dedup: datasketch-equal signatures, LSH parameters, components, and exact + fuzzy dedup on Ray
Data against a brute-force exact-Jaccard reference on a corpus with planted near-duplicates."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash

from jobs.data.dedup import (DedupConfig, MinHasher, apply_dedup, connected_components, find_near_duplicates,
                        lsh_params, lsh_report, shingle_hash, shingle_hashes, shingles)
from jobs.data.prepare import doc_hash

THRESHOLD = 0.8


def test_signature_equals_datasketch_update_batch():
    rng = random.Random(0)
    hasher = MinHasher(128, seed=1)
    for n_words in (1, 3, 5, 50, 5000):  # shorter than the n-gram, a few chunks of shingles
        text = " ".join(rng.choice(["alpha", "Beta", "gamma", "δέλτα", "epsilon", "x1"]) for _ in range(n_words))
        ref = MinHash(num_perm=128, seed=1, hashfunc=shingle_hash)
        ref.update_batch(shingles(text, 5))
        ours = hasher.signature(shingle_hashes(text, 5))
        assert np.array_equal(ours, ref.hashvalues), n_words
        lean = LeanMinHash(seed=1, hashvalues=ours, scheme="affine32")
        assert lean.jaccard(LeanMinHash(ref)) == 1.0
    assert [shingle_hash(s) for s in shingles("a b c d e f", 5)] == shingle_hashes("a b c d e f", 5).tolist()


def test_lsh_params_minimise_area_and_are_reported():
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128
    rep = lsh_report(0.8, 128)
    print("LSH for threshold 0.8, 128 permutations:", rep)
    assert (rep["bands"], rep["rows"]) == (b, r)
    # the S-curve crosses near the threshold: few candidates well below it, most well above
    assert rep["candidate_probability"]["0.70"] < 0.15 < 0.85 < rep["candidate_probability"]["0.90"]


def test_connected_components_roots_are_component_minima():
    src = np.array([5, 7, 9, 20, 21, 7], dtype=np.uint64)
    dst = np.array([7, 9, 3, 22, 20, 11], dtype=np.uint64)
    nodes, roots = connected_components(src, dst)
    got = dict(zip(nodes.tolist(), roots.tolist()))
    assert got == {3: 3, 5: 3, 7: 3, 9: 3, 11: 3, 20: 20, 21: 20, 22: 20}
    # a long chain needs many propagation rounds
    chain = np.arange(1000, dtype=np.uint64)
    nodes, roots = connected_components(chain[1:], chain[:-1])
    assert set(roots.tolist()) == {0}


def variant(base: list[str], similarity: float, rng: random.Random, vocab: list[str]) -> list[str]:
    """A copy of `base` whose 5-gram shingle set has about the given Jaccard similarity to base's:
    replacing a span of m words changes m + 4 of the N shingles, so J = (N - d) / (N + d)."""
    n_sh = len(base) - 4
    d = round(n_sh * (1 - similarity) / (1 + similarity))
    m = max(1, d - 4)
    start = rng.randrange(0, len(base) - m)
    return base[:start] + [rng.choice(vocab) + "q" for _ in range(m)] + base[start + m:]


def planted_corpus(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(30000)]
    texts = []
    for c in range(90):
        base = [rng.choice(vocab) for _ in range(rng.randrange(150, 300))]
        texts.append(base)
        kind = c % 6
        if kind in (0, 1, 2):  # near-duplicates above the threshold: clusters of 2..4
            for _ in range(1 + c % 3):
                texts.append(variant(base, rng.choice([0.86, 0.9, 0.95]), rng, vocab))
        elif kind == 3:  # hard negatives well below the threshold
            texts.append(variant(base, rng.choice([0.5, 0.6, 0.7]), rng, vocab))
        elif kind == 4:  # an exact copy
            texts.append(list(base))
    docs = []
    for i, w in enumerate(texts):
        text = " ".join(w) + "\n"
        docs.append({"text": text, "source": f"gen-{i // 50}.txt", "offset": i, "hash": doc_hash(text, 0),
                     "raw_bytes": len(text)})
    return docs


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def run_dedup(ray, docs, blocks: int, partitions: int, cfg: DedupConfig):
    ds = ray.data.from_items(docs, override_num_blocks=blocks)
    fuzzy = find_near_duplicates(ds, cfg, partitions)
    out = apply_dedup(ds, fuzzy, cfg.exact, partitions).take_all()
    return fuzzy, {(r["source"], int(r["offset"])): r["reason"] for r in out}


def test_dedup_against_bruteforce_jaccard(ray_local):
    docs = planted_corpus()
    cfg = DedupConfig(threshold=THRESHOLD)
    fuzzy, result = run_dedup(ray_local, docs, blocks=4, partitions=2, cfg=cfg)
    assert len(result) == len(docs)  # every document comes back, kept or rejected

    # exact: every copy but one of each identical text is rejected as exact_duplicate
    by_text: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_text.setdefault(d["text"], []).append(i)
    for ids in by_text.values():
        reasons = [result[(docs[i]["source"], i)] for i in ids]
        assert reasons.count("exact_duplicate") == len(ids) - 1

    # fuzzy, against brute force over all pairs of distinct texts
    uniq = [ids[0] for ids in by_text.values()]
    sets = {i: set(shingles(docs[i]["text"], 5)) for i in uniq}
    sim = {(i, j): jaccard(sets[i], sets[j]) for i, j in itertools.combinations(uniq, 2)}
    strong = {i for (a, b), s in sim.items() if s >= THRESHOLD + 0.05 for i in (a, b)}
    plausible = {i for (a, b), s in sim.items() if s >= THRESHOLD - 0.05 for i in (a, b)}
    assert len(strong) > 100 and any(0.45 < s < 0.75 for s in sim.values())  # the planted structure is there

    in_component = set()
    hash_to_doc = {docs[i]["hash"]: i for i in uniq}
    for h in np.concatenate([fuzzy.losers, fuzzy.roots]).tolist():
        in_component.add(hash_to_doc[h])
    recall = len(in_component & strong) / len(strong)
    precision = len(in_component & plausible) / max(1, len(in_component))
    print(f"fuzzy dedup at threshold {THRESHOLD}: recall {recall:.3f} (documents with a partner at "
          f"J >= {THRESHOLD + 0.05:.2f}), precision {precision:.3f} (flagged documents with a partner at "
          f"J >= {THRESHOLD - 0.05:.2f}); {fuzzy.stats['edges']} edges, {len(in_component)} documents in components")
    assert recall >= 0.95 and precision >= 0.95

    # one document kept per component: exactly the components' count of near_duplicate rejects
    near = [k for k, v in result.items() if v == "near_duplicate"]
    assert len(near) == len(fuzzy.losers)
    kept_hashes = {docs[off]["hash"] for (src, off), v in result.items() if v == ""}
    assert set(fuzzy.roots.tolist()) <= kept_hashes and not set(fuzzy.losers.tolist()) & kept_hashes

    # independent of blocks and partitions
    _, again = run_dedup(ray_local, docs, blocks=1, partitions=1, cfg=cfg)
    _, again2 = run_dedup(ray_local, list(reversed(docs)), blocks=7, partitions=3, cfg=cfg)
    assert again == result == again2


def test_verification_cuts_false_positives(ray_local):
    docs = planted_corpus(seed=1)[:120]
    loose = DedupConfig(threshold=THRESHOLD, verify=False)
    strict = DedupConfig(threshold=THRESHOLD, verify=True)
    ds = ray_local.data.from_items(docs, override_num_blocks=2)
    a = find_near_duplicates(ds, loose, 1)
    b = find_near_duplicates(ds, strict, 1)
    assert b.stats["edges"] <= a.stats["edges"]
    assert set(b.losers.tolist()) <= set(a.losers.tolist()) | set(a.roots.tolist())


def test_config_rejects_bad_threshold():
    with pytest.raises(ValueError):
        DedupConfig(threshold=1.5)
