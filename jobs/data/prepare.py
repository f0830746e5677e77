"""Prepare: raw corpus -> clean documents -> dedup -> BPE tokenizer -> packed token shards.

Stages (docs/data.md): read (jobs.data.read) -> clean (jobs.data.clean) -> exact and
MinHash-LSH dedup (jobs.data.dedup) -> tokenizer -> tokenize and pack (jobs.data.shards). Every
step is a Ray Data operator, so the same code runs on a laptop and on a cluster: the driver holds
only the file list, a bounded tokenizer sample, the near-duplicate edge list and per-shard
metadata. Output (local directory or s3://):

    tokenizer.json
    train-00000.npy ...   uint16/uint32 arrays of shape (sequences, seq_len + 1)
    val-00000.npy ...
    rejects/rejects-00000.jsonl ...   every dropped record: reason, source file, offset, preview
    report.json           documents in/out per stage and reason, bytes, tokens, throughput
    manifest.json         written last: its presence means the output is complete
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import xxhash

from cluster import storage
from cluster.ray_utils import storage_env
from jobs.data.clean import clean_batch
from jobs.data.config import PrepareConfig
from jobs.data.dedup import apply_dedup, find_near_duplicates
from jobs.data.inputs import default_corpus, expand_inputs_sized, input_fingerprints
from jobs.data.shards import MANIFEST, MANIFEST_FORMAT, pack_shard, tokenize, unigram_loss
from jobs.data.totals import totals
from model.tokenizer import EOT, load_tokenizer, tokenizer_sha256, train_tokenizer


# ----------------------------------------------------------------------------- reading

def read_documents(cfg: PrepareConfig, files: list[tuple[str, int]], cpus: int):
    """Ray Dataset of every input record: documents and rejects (jobs.read), cleaned (jobs.clean)."""
    import ray.data

    from jobs.data.read import plan_units, read_units

    total = sum(n for _, n in files)
    # enough read units to keep every CPU busy, few enough that a unit is not mostly task overhead
    target = max(1 << 20, min(64 << 20, total // max(1, 4 * cpus)))
    units = plan_units(files, target)
    opts = {"text_field": cfg.text_field, "max_document_bytes": cfg.max_document_bytes,
            "max_replacement_fraction": cfg.max_replacement_fraction,
            "markdown_split_level": cfg.markdown_split_level}
    ds = ray.data.from_items([{"paths": u} for u in units], override_num_blocks=len(units))
    return (ds.map_batches(read_units, batch_size=1, batch_format="numpy", fn_kwargs={"fmt": cfg.format, "opts": opts},
                           **storage_remote_args())
            .map_batches(clean_batch, batch_format="numpy", fn_kwargs={"cfg": cfg.clean.model_dump()}))


# ----------------------------------------------------------------------------- hashing and split

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


# ----------------------------------------------------------------------------- the job

def storage_remote_args() -> dict:
    """Ray remote args that hand the driver's AWS settings (endpoint, region, credentials) to the
    tasks that touch storage, for workers started without them; empty when none are set or the
    job's runtime env already gives them to every worker (cluster.ray_utils.init_ray does).

    A task-level runtime env is avoided where it can be: it sends its tasks to a worker pool of
    their own, whose fresh processes each pay seconds of imports, and keeps Ray Data from fusing
    them with the next stage."""
    import ray

    job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    env = {k: v for k, v in storage_env().items() if job_env.get(k) != v}
    return {"runtime_env": {"env_vars": env}} if env else {}


READ_REASONS = ("too_large", "truncated", "undecodable", "bad_json", "no_text_field", "bad_parquet", "not_text")
REJECT_COLUMNS = ("source", "offset", "reason", "preview", "duplicate_of")


def select(batch: dict, keep: str, columns: tuple[str, ...] | None = None) -> dict:
    """Ray Data UDF: the rows that are documents (`keep="docs"`) or rejects (`keep="rejects"`)."""
    mask = (batch["reason"] == "") if keep == "docs" else (batch["reason"] != "")
    cols = columns or tuple(batch)
    out = {c: batch[c][mask] for c in cols if c in batch}
    if "duplicate_of" in cols and "duplicate_of" not in batch:
        out["duplicate_of"] = np.zeros(int(mask.sum()), dtype=np.uint64)
    return out


def write_rejects(group: dict, output: str) -> dict:
    """Ray Data map_groups UDF: the rejects of one partition -> rejects/rejects-NNNNN.jsonl,
    sorted, so that re-runs write identical files."""
    part = int(group["part"][0])
    order = sorted(range(len(group["reason"])), key=lambda i: (group["source"][i], int(group["offset"][i]), group["reason"][i]))
    lines = []
    for i in order:
        rec = {"source": group["source"][i], "offset": int(group["offset"][i]), "reason": group["reason"][i],
               "preview": group["preview"][i]}
        if int(group["duplicate_of"][i]):
            rec["duplicate_of"] = f"{int(group['duplicate_of'][i]):016x}"
        lines.append(json.dumps(rec, ensure_ascii=False))
    name = f"rejects/rejects-{part:05d}.jsonl"
    storage.write_bytes(storage.join(output, name), ("\n".join(lines) + "\n").encode("utf-8", errors="surrogatepass"))
    return {"file": [name], "records": [len(lines)]}


def reason_counts(sums: dict[str, dict]) -> dict[str, dict]:
    """{reason: {documents, raw_bytes}} from `totals(ds, ("raw_bytes", ...), by="reason")`; "" is the
    kept documents."""
    return {r: {"documents": int(v["rows"]), "raw_bytes": int(v["raw_bytes"])} for r, v in sums.items()}


def num_partitions(total_bytes: int, cpus: int) -> int:
    """Hash partitions of a shuffle: ~128 MB each (a partition must fit one worker's memory), and
    at least one per CPU once there is a MB per CPU to share: the documents are tokenized in the
    partitions of the dedup shuffle, at about a second of CPU per MB."""
    return max(1, math.ceil(total_bytes / (128 << 20)), min(cpus, total_bytes // (1 << 20)))


def clear_output(cfg: PrepareConfig) -> None:
    """Make an earlier, possibly interrupted, run's output invisible before writing anything."""
    storage.makedirs(cfg.output)
    manifest_uri = storage.join(cfg.output, MANIFEST)
    if storage.exists(manifest_uri):  # a rewrite in progress must not look complete
        storage.write_bytes(manifest_uri + ".old", storage.read_bytes(manifest_uri))
        fs, path = storage.resolve(manifest_uri)
        fs.delete_file(path)
    fs, root = storage.resolve(cfg.output)
    for f in storage.list_files(cfg.output):
        rel = f[len("s3://"):] if storage.is_s3(f) else f
        name = Path(rel).name
        # temporaries of a killed write, and rejects files (their number varies with the data)
        if (name.startswith(".") and name.endswith(".tmp")) or "/rejects/" in rel[len(root):] + "/":
            fs.delete_file(rel)


@contextlib.contextmanager
def task_shuffles():
    """Ray Data shuffles (groupby) of the datasets created inside: sort-based tasks in the job's
    own worker pool.

    Ray Data's default hash shuffle (SHUFFLE_V2) runs its map and its reduce tasks in two worker
    pools of their own (told apart by runtime-env variables), and Ray keeps only about one idle
    worker per CPU. So every shuffle started fresh worker processes, each importing Ray Data and
    this module again (~3.5 s of CPU), and evicted the workers the next stage needed: 22 worker
    processes instead of 10 for the Python docs on 2 cores, and most of the wall time beyond the
    per-document work (docs/benchmarks.md). The pull-based sort shuffle moves blocks^2 small
    objects, which is cheap at the hundreds of blocks of this pipeline's inputs per machine.
    """
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    before = ctx.shuffle_strategy
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.shuffle_strategy = before


def prepare(cfg: PrepareConfig) -> dict:
    import ray

    from cluster.ray_utils import init_ray

    t0 = time.time()
    sized = expand_inputs_sized(cfg.inputs) if cfg.inputs else [(f, Path(f).stat().st_size) for f in default_corpus()]
    files = [f for f, _ in sized]
    init_ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    clear_output(cfg)
    stages: dict[str, dict] = {}
    timer = time.time()

    def lap(name: str, **extra) -> None:
        nonlocal timer
        now = time.time()
        stages[name] = {"seconds": round(now - timer, 3), **extra}
        timer = now

    # read + clean
    train_shards, val_shards = cfg.num_shards, max(1, cfg.num_shards // 8)
    split_args = {"seed": cfg.seed, "val_fraction": cfg.val_fraction,
                  "train_shards": train_shards, "val_shards": val_shards}
    records = read_documents(cfg, sized, cpus).map_batches(assign, fn_kwargs=split_args).materialize()
    sums = totals(records, ("raw_bytes", "n_bytes", "t_read", "t_clean"), by="reason")
    by_reason = reason_counts(sums)
    lap("read+clean", cpu_seconds_read=round(sum(v["t_read"] for v in sums.values()), 3),
        cpu_seconds_clean=round(sum(v["t_clean"] for v in sums.values()), 3))
    docs = records.map_batches(select, fn_kwargs={"keep": "docs"}, batch_format="numpy")
    if "" not in by_reason:
        dropped = {k: v["documents"] for k, v in by_reason.items() if k}
        raise ValueError(f"inputs: no document survived reading and cleaning {len(files)} file(s); dropped by reason: {dropped}")
    parts = num_partitions(int(sums[""]["n_bytes"]), cpus)

    # dedup
    fuzzy = None
    if cfg.dedup.fuzzy:
        fuzzy = find_near_duplicates(docs, cfg.dedup, parts)
        print("fuzzy dedup: " + json.dumps({k: fuzzy.stats[k] for k in (
            "bands", "rows", "false_positive_area", "false_negative_area", "candidate_probability")}))
        lap("fuzzy: signatures+lsh+components", **fuzzy.stats)
    dedup_rejects = None
    if cfg.dedup.exact or cfg.dedup.fuzzy:
        deduped = apply_dedup(docs, fuzzy, cfg.dedup.exact, parts).materialize()
        dup_reasons = reason_counts(totals(deduped, ("raw_bytes",), by="reason"))
        by_reason.update({k: v for k, v in dup_reasons.items() if k})
        docs = deduped.map_batches(select, fn_kwargs={"keep": "docs", "columns": ("text", "raw_bytes")},
                                   batch_format="numpy").map_batches(assign, fn_kwargs=split_args).materialize()
        dedup_rejects = deduped.map_batches(select, fn_kwargs={"keep": "rejects", "columns": REJECT_COLUMNS},
                                            batch_format="numpy")
        lap("dedup apply")
    else:
        docs = docs.materialize()
    kept = totals(docs, ("n_bytes",)).get("", {"rows": 0, "n_bytes": 0})
    n_docs, total_bytes = int(kept["rows"]), int(kept["n_bytes"])
    if n_docs == 0:
        raise ValueError(f"inputs: no document left after dedup of {len(files)} file(s)")

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
    lap("tokenizer")

    shards = (
        docs.map_batches(tokenize, fn_kwargs={"tokenizer_json": tok_json, "dtype": dtype})
        .groupby(["split", "shard"], num_partitions=min(cpus, train_shards + val_shards))
        .map_groups(pack_shard, batch_format="numpy", fn_kwargs={
            "output": cfg.output, "seq_len": cfg.seq_len, "dtype": dtype, "vocab_size": vocab},
            **storage_remote_args())
        .take_all()
    )
    shards.sort(key=lambda s: (s["split"], s["shard"]))
    lap("tokenize+pack")

    # rejects: every dropped record, with its source file and offset
    rejects = records.map_batches(select, fn_kwargs={"keep": "rejects", "columns": REJECT_COLUMNS}, batch_format="numpy")
    if dedup_rejects is not None:
        rejects = rejects.union(dedup_rejects)
    reject_parts = max(1, parts)
    if not any(k for k in by_reason):  # nothing rejected: empty blocks carry no `part` column to group on
        rejects = None
    written = [] if rejects is None else rejects.map_batches(
        lambda b: {**b, "part": np.array([xxhash.xxh64_intdigest(s.encode("utf-8", "surrogatepass")) % reject_parts
                                          for s in b["source"]], dtype=np.int64)}, batch_format="numpy"
    ).groupby("part", num_partitions=reject_parts).map_groups(
        write_rejects, batch_format="numpy", fn_kwargs={"output": cfg.output}, **storage_remote_args()).take_all()
    reject_files = sorted((r["file"], int(r["records"])) for r in written)
    lap("rejects")

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
    report = build_report(cfg, by_reason, stages, splits, cpus, time.time() - t0, reject_files)
    storage.write_json(storage.join(cfg.output, "report.json"), report)
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
        "rejects": [{"file": f, "records": n} for f, n in reject_files],
        "stats": {"documents": n_docs, "bytes": total_bytes, "seconds": round(time.time() - t0, 2)},
        "unigram_val_loss": unigram_loss(counts["train"], counts["val"]),
    }
    storage.write_json(storage.join(cfg.output, MANIFEST), manifest)  # last: the output is complete
    print_report(report, manifest, cfg.output)
    return manifest


# ----------------------------------------------------------------------------- report

STAGE_OF = {**{r: "read" for r in READ_REASONS}, "exact_duplicate": "exact dedup", "near_duplicate": "fuzzy dedup"}
STAGES = ("read", "clean", "exact dedup", "fuzzy dedup")


def build_report(cfg, by_reason: dict, stages: dict, splits: dict, cpus: int, seconds: float,
                 reject_files: list) -> dict:
    """Documents in and out per stage and per reason; bytes, tokens and throughput."""
    dropped = {s: {} for s in STAGES}
    for reason, v in sorted(by_reason.items()):
        if reason:
            dropped[STAGE_OF.get(reason, "clean")][reason] = v
    # dedup rejects are documents the clean stage kept (reason ""): count each record once
    first_pass = [v for r, v in by_reason.items() if STAGE_OF.get(r) not in ("exact dedup", "fuzzy dedup")]
    total_in = sum(v["documents"] for v in first_pass)
    raw_in = sum(v["raw_bytes"] for v in first_pass)
    table, n = [], total_in
    for s in STAGES:
        out = n - sum(v["documents"] for v in dropped[s].values())
        table.append({"stage": s, "documents_in": n, "documents_out": out,
                      "dropped": {r: v["documents"] for r, v in dropped[s].items()}})
        n = out
    tokens = sum(sp["tokens"] for sp in splits.values())
    for name, st in stages.items():
        st["raw_mb_per_s"] = round(raw_in / 1e6 / st["seconds"], 3) if st["seconds"] else None
    return {
        "config_sha256": cfg.sha256(), "cpus": cpus, "seconds": round(seconds, 2),
        "input": {"documents": total_in, "raw_bytes": raw_in},
        "output": {"documents": n, "tokens": tokens,
                   "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"]},
        "funnel": table, "timings": stages,
        "end_to_end": {"raw_mb_per_s": round(raw_in / 1e6 / seconds, 3),
                       "raw_mb_per_s_per_cpu": round(raw_in / 1e6 / seconds / cpus, 3),
                       "documents_per_s": round(total_in / seconds, 1)},
        "rejects": [{"file": f, "records": k} for f, k in reject_files],
    }


def print_report(report: dict, manifest: dict, output: str) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"prepare -> {output}: documents per stage")
    for col in ("stage", "in", "out", "dropped by reason"):
        t.add_column(col, justify="right" if col in ("in", "out") else "left")
    for row in report["funnel"]:
        t.add_row(row["stage"], str(row["documents_in"]), str(row["documents_out"]),
                  ", ".join(f"{k} {v}" for k, v in row["dropped"].items()))
    con.print(t)
    t = Table(title="stage timings (wall; MB/s of raw input)")
    for col in ("stage", "seconds", "MB/s"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for name, st in report["timings"].items():
        t.add_row(name, f"{st['seconds']:.2f}", f"{st['raw_mb_per_s'] or 0:.2f}")
    con.print(t)
    t = Table(title="shards")
    for col in ("split", "documents", "sequences", "tokens", "shards"):
        t.add_column(col, justify="right")
    for split, s in manifest["splits"].items():
        t.add_row(split, str(s["documents"]), str(s["sequences"]), str(s["tokens"]), str(len(s["shards"])))
    con.print(t)
    e = report["end_to_end"]
    print(f"{report['input']['documents']} records, {report['input']['raw_bytes'] / 1e6:.1f} MB in "
          f"{report['seconds']} s on {report['cpus']} CPUs ({e['raw_mb_per_s_per_cpu']:.2f} MB/s per CPU); "
          f"{report['output']['documents']} documents, {report['output']['tokens']} tokens; "
          f"vocab {manifest['vocab_size']}; unigram val loss {manifest['unigram_val_loss']:.3f}")
