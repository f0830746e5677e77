"""Control API start-up: seconds until `GET /v1/health` answers, and the process's RSS then.

    python bench/api_startup.py [--tree DIR] [--runs 5]

Starts `python -m uvicorn service.main:app` from DIR (default: this checkout; give another
checkout, e.g. a `git worktree` of an older commit, to compare), with a fresh SQLite store and no
Ray cluster to attach to, polls /v1/health, and reads the server's RSS with psutil. Also reports
which heavy modules (torch, deepspeed, ray.train, ray.tune, ray.serve) the API process imported.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

HEAVY = ("torch", "deepspeed", "ray.train", "ray.tune", "ray.serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(tree: Path) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "RAYLM_DATABASE_URL": f"sqlite:///{tmp}/api.db", "RAYLM_ARTIFACTS": f"{tmp}/artifacts",
               "RAYLM_RAY_ADDRESS": "http://127.0.0.1:9", "RAYLM_TOKENS": "tenants: {}",
               "PYTHONPATH": str(tree)}
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.main:app", "--port", str(port),
                                 "--log-level", "warning"], cwd=tree, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    if proc.poll() is not None:
                        raise RuntimeError(f"the API exited with {proc.returncode}") from None
                    time.sleep(0.05)
            seconds = time.perf_counter() - t0
            rss = psutil.Process(proc.pid).memory_info().rss / 2**20
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"seconds": seconds, "rss_mib": rss}


def imported(tree: Path) -> list[str]:
    code = "import json, sys, service.main; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                         capture_output=True, text=True, check=True)
    mods = json.loads(out.stdout.splitlines()[-1])
    return sorted({h for h in HEAVY for m in mods if m == h or m.startswith(h + ".")})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    runs = [one_start(args.tree.resolve()) for _ in range(args.runs)]
    print(json.dumps({
        "tree": str(args.tree), "runs": args.runs,
        "seconds_median": round(statistics.median(r["seconds"] for r in runs), 2),
        "seconds_all": [round(r["seconds"], 2) for r in runs],
        "rss_mib_median": round(statistics.median(r["rss_mib"] for r in runs), 1),
        "heavy_modules": imported(args.tree.resolve()),
    }, indent=2))


if __name__ == "__main__":
    main()
