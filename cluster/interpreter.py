"""`python -m cluster.interpreter`: run before a job's entrypoint on the cluster; exits 2 with what
to do when the `python` found on the node's PATH is not an environment that can run raylm's jobs.

Ray runs a job's entrypoint (`python -m jobs.<kind> ...`) with the PATH of the shell that ran
`ray start`. Started as `.venv/bin/ray start` without the virtualenv on PATH, `python` is some
other interpreter, and the job dies on its first import (`No module named 'xxhash'`) with no
hint. This module imports nothing of the job's (it only looks the packages up), so it runs in any
Python 3 and can say so.
"""

from __future__ import annotations

import importlib.util
import sys

# Packages every job imports (the first ones a wrong interpreter would miss).
NEEDED = ("ray", "pydantic", "yaml", "pyarrow", "xxhash", "torch")


def missing() -> list[str]:
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def main() -> int:
    gone = missing()
    if not gone:
        return 0
    print(f"raylm: the `python` on this node's PATH ({sys.executable}) cannot import {', '.join(gone)}, so it "
          "is not the environment raylm and Ray are installed in. Ray runs a job's `python` from the PATH of "
          "the shell that ran `ray start`: start Ray with that environment on PATH, e.g. "
          "`source .venv/bin/activate && ray start ...` (or `PATH=$PWD/.venv/bin:$PATH .venv/bin/ray start ...`), "
          "then submit again.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
