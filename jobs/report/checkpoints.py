"""Checkpoint verification without torch: the rule of jobs.pretrain.verify_checkpoint.

A checkpoint counts only when train_state.json names its world size, every rank's
MANIFEST.rank<r>.json is there, and every file each manifest lists has the sha256 it records.
jobs.pretrain's copy imports torch with its module, and the control API imports this package, so
the rule lives here too, over a `Tree`: paths a manifest names are looked up among the files under
the report's root (a `../` or absolute name is refused, not followed), and reasons name files
relative to the checkpoint.
"""

from __future__ import annotations

import posixpath

from cluster import storage
from jobs.report.files import ReportError, Tree

TRAIN_STATE = "train_state.json"


def verify(tree: Tree, ckpt: str) -> str | None:
    """None if the checkpoint `ckpt` (a directory relative to the tree's root) is complete and
    intact, else the reason it is not."""
    files = tree.under(ckpt)
    try:
        state = tree.read_json(posixpath.join(ckpt, TRAIN_STATE))
        world = state.get("world_size")
        if not isinstance(world, int) or isinstance(world, bool) or world < 1:
            return f"{TRAIN_STATE}: world_size is {world!r}, not a positive integer"
        for r in range(world):
            name = f"MANIFEST.rank{r}.json"
            if name not in files:
                return f"{name} is missing (an incomplete write by rank {r})"
            listed = tree.read_json(posixpath.join(ckpt, name)).get("files")
            if not isinstance(listed, dict):
                return f"{name}: no `files` mapping"
            for rel, sha in listed.items():
                norm = posixpath.normpath(rel) if isinstance(rel, str) else ""
                if not norm or norm.startswith(("/", "../")) or norm == "..":
                    return f"{name} names a file outside the checkpoint: {rel!r}"
                if norm not in files:
                    return f"{norm} is missing (listed in {name})"
                if storage.sha256_file(tree.file_uri(posixpath.join(ckpt, norm))) != sha:
                    return f"checksum mismatch in {norm}"
    except ReportError as e:
        return str(e).removeprefix(ckpt + "/")
    except OSError as e:
        return f"cannot be read ({type(e).__name__})"
    return None
