"""The checkpoint's layout: file names, per-rank manifests, verification, and finding the newest
complete checkpoint of a run.

A checkpoint is a directory `checkpoint_<step:07d>/` of a run directory (local or s3://):

    model.safetensors          consolidated fp32 weights in model.GPT's key names (lm_head.weight
                               left out when tied); a reward model's body
    value_head.safetensors     a reward model's scalar head (reward checkpoints only)
    critic.safetensors         a PPO run's critic: body and value head (jobs.rl, algorithm ppo)
    train_state.json           step, world size, resolved config, model config, lineage hashes
    tokenizer.json             the tokenizer the model was trained with
    metrics.jsonl              the run's metric history up to this step
    rng-rank<r>.json           each rank's Python, NumPy and torch RNG state (JSON, never a pickle)
    deepspeed/                 DeepSpeed's sharded engine state (optimizer, schedule): resume only
    MANIFEST.rank<r>.json      written last by each rank: the sha256 of every file that rank wrote

A checkpoint counts only when all `world_size` manifests are there and every checksum matches:
a torn upload or a corrupted file makes readers fall back to the previous one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cluster import storage

TRAIN_STATE = "train_state.json"
WEIGHTS = "model.safetensors"
VALUE_HEAD = "value_head.safetensors"
CRITIC = "critic.safetensors"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"
DEEPSPEED = "deepspeed"
DEEPSPEED_TAG = "state"


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.json"


def manifest_file(rank: int) -> str:
    return f"MANIFEST.rank{rank}.json"


def write_rank_manifest(d: Path, rank: int, step: int, world: int) -> None:
    files = {str(f.relative_to(d)): storage.sha256_file(f) for f in sorted(d.rglob("*"))
             if f.is_file() and not f.name.startswith("MANIFEST.")}
    (d / manifest_file(rank)).write_text(json.dumps({"step": step, "world_size": world, "files": files}))


def verify_checkpoint(ckpt: str) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not (naming the file).

    Every file in the directory must be listed by one rank's manifest with its sha256, and every
    listed file must be there with that checksum. Manifest entries are plain relative names:
    a name that climbs out of the checkpoint (`..`, absolute) makes it invalid, and so does a
    symbolic link that leads out of it (raylm never writes links; a tenant's storage may hold
    them).
    """
    try:
        present = set(storage.relative_files(ckpt))
        if TRAIN_STATE not in present:
            return f"{TRAIN_STATE} is missing"
        state = storage.read_json(storage.join(ckpt, TRAIN_STATE))
        world = state.get("world_size") if isinstance(state, dict) else None
        if not isinstance(world, int) or isinstance(world, bool) or world < 1:
            return f"{TRAIN_STATE}: world_size is {world!r}, not a positive integer"
        listed: dict[str, str] = {}
        for r in range(world):
            if manifest_file(r) not in present:
                return f"{manifest_file(r)} is missing (an incomplete write by rank {r})"
            files = storage.read_json(storage.join(ckpt, manifest_file(r))).get("files")
            if not isinstance(files, dict):
                return f"{manifest_file(r)}: no `files` mapping"
            for rel, sha in files.items():
                parts = rel.split("/")
                if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
                    return f"{manifest_file(r)}: file name {rel[:80]!r} is not inside the checkpoint"
                listed[rel] = sha
        if not storage.is_s3(ckpt):
            root = os.path.realpath(ckpt)
            for rel in sorted(present | set(listed)):
                if not os.path.realpath(os.path.join(root, rel)).startswith(root + os.sep):
                    return f"{rel} leads out of the checkpoint (a symbolic link)"
        unlisted = sorted(p for p in present - set(listed) if not p.startswith("MANIFEST."))
        if unlisted:
            return f"{unlisted[0]} is not listed in any rank's manifest"
        for rel, sha in listed.items():
            if rel not in present:
                return f"{rel} is missing"
            if storage.sha256_file(storage.join(ckpt, rel)) != sha:
                return f"checksum mismatch in {rel}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"cannot be read ({type(e).__name__})"  # no exception text: it would name server paths
    return None


def checkpoint_dirs(run_dir: str) -> list[str]:
    """Checkpoint directories of a run, newest first."""
    names = set()
    for f in storage.list_files(run_dir):
        rest = f.split("/checkpoint_", 1)[1] if "/checkpoint_" in f else ""
        if "/" in rest:  # a file inside checkpoint_<step>/, not Ray's checkpoint_manager_snapshot.json
            names.add(rest.split("/")[0])
    return [storage.join(run_dir, f"checkpoint_{n}") for n in sorted(names, reverse=True)]


def latest_checkpoint(run_dir: str) -> str:
    """Newest complete checkpoint of a run (local or s3://), skipping torn or corrupt ones."""
    reasons = []
    for ck in checkpoint_dirs(run_dir):
        why = verify_checkpoint(ck)
        if why is None:
            return ck
        reasons.append(f"{ck}: {why}")
        print(f"skipping checkpoint {ck}: {why}", flush=True)
    raise FileNotFoundError(f"run: no complete checkpoint under {run_dir!r}" + (f" ({'; '.join(reasons)})" if reasons else ""))


def find_resume_checkpoint(run_dir: str) -> str | None:
    """The checkpoint a run directory resumes from: its newest complete one, or None."""
    try:
        return latest_checkpoint(run_dir)
    except FileNotFoundError:
        return None


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def prune_checkpoints(run_dir: str, keep: int) -> list[str]:
    """Delete the checkpoints of a finished run beyond its `keep` newest complete ones; return them.

    Ray Train keeps `num_to_keep` of the checkpoints it registered, but a checkpoint uploaded just
    before a worker died is never registered, so Ray never deletes it. Checkpoints Ray's own
    snapshot still names are left alone: a later run on this directory would refuse to start
    without them.
    """
    snapshot = storage.join(run_dir, RAY_SNAPSHOT)
    named = set()
    if storage.exists(snapshot):
        state = storage.read_json(snapshot)
        named = {r.get("checkpoint_dir_name") for r in state.get("checkpoint_results", [])}
    complete = [ck for ck in checkpoint_dirs(run_dir) if verify_checkpoint(ck) is None][:keep]
    deleted = []
    for ck in checkpoint_dirs(run_dir):
        if ck not in complete and ck.rstrip("/").rsplit("/", 1)[-1] not in named:
            fs, path = storage.resolve(ck)
            fs.delete_dir(path)
            deleted.append(ck)
    return deleted


def remove_torn_checkpoint(run_dir: str, step: int) -> bool:
    """Delete `checkpoint_<step>/` of a run if it is there and does not verify; True if it was.

    Called before a checkpoint of that step is written again: a run that resumed from an earlier
    checkpoint because this one was torn rewrites the step into the same directory name."""
    ck = storage.join(run_dir, checkpoint_name(step))
    if not storage.exists(ck) or verify_checkpoint(ck) is None:
        return False
    fs, path = storage.resolve(ck)
    fs.delete_dir(path)
    return True

