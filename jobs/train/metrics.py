"""Training metrics: MFU, memory, the run log (metrics.jsonl + TensorBoard) and the loss plot."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from cluster import storage

# Dense bf16 peak FLOP/s (NVIDIA datasheets, SXM parts, no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def memory_gib(device: torch.device) -> float:
    """Peak memory of this worker: GPU allocations on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class RunLog:
    """Rank 0's metrics: metrics.jsonl and TensorBoard events in the run directory."""

    def __init__(self, output: str, history: list[dict]):
        from tensorboardX import SummaryWriter

        self.output, self.history = output, history
        self.tb_local = Path(output) / "tensorboard" if not storage.is_s3(output) else Path(tempfile.mkdtemp()) / "tb"
        self.tb = SummaryWriter(str(self.tb_local))

    def add(self, rec: dict) -> None:
        self.history.append(rec)
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, rec["step"])

    def flush(self) -> None:
        self.tb.flush()
        storage.write_text(storage.join(self.output, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in self.history))
        if storage.is_s3(self.output):
            storage.copy_dir(self.tb_local, storage.join(self.output, "tensorboard"))


def plot_losses(history: list[dict], unigram: float | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train", lw=1)
    ev = [h for h in history if "val_loss" in h]
    ax.plot([h["step"] for h in ev], [h["val_loss"] for h in ev], "o-", label="val")
    if unigram and math.isfinite(unigram):
        ax.axhline(unigram, ls="--", c="gray", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())
