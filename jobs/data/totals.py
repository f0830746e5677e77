"""Totals of Ray Dataset columns without a shuffle: partial sums per block, added up on the driver.

A Ray Data aggregate (`ds.sum`, `groupby(...).aggregate`) is a shuffle, with a map and a reduce
stage of its own. For a handful of numbers (records and bytes per reject reason, CPU seconds) each
block's partial sums are enough: the driver receives a few rows per block, never one per record.
"""

from __future__ import annotations

import numpy as np


def partial_sums(batch: dict, columns: tuple[str, ...], by: str | None) -> dict:
    """Ray Data UDF: the batch's row count and column sums, one row per value of `by`."""
    if not batch:  # an empty block without a schema adds nothing
        return {}
    n = len(next(iter(batch.values())))
    keys = np.asarray(batch[by]).astype(str) if by else np.full(n, "")
    values = sorted(set(keys.tolist()))
    masks = [keys == v for v in values]
    out = {"key": np.array(values, dtype=object), "rows": np.array([m.sum() for m in masks], dtype=np.int64)}
    for c in columns:
        col = np.asarray(batch[c])
        out[c] = np.array([col[m].sum() for m in masks], dtype=np.float64 if col.dtype.kind == "f" else np.int64)
    return out


def totals(ds, columns: tuple[str, ...], by: str | None = None) -> dict[str, dict]:
    """{value of `by` ("" without one): {"rows": count, column: sum, ...}} of a Ray Dataset."""
    out: dict[str, dict] = {}
    rows = ds.map_batches(partial_sums, fn_kwargs={"columns": columns, "by": by}, batch_format="numpy").take_all()
    for r in rows:
        t = out.setdefault(str(r["key"]), dict.fromkeys(("rows", *columns), 0))
        for c in ("rows", *columns):
            t[c] += r[c].item() if hasattr(r[c], "item") else r[c]
    return out
