"""Config of the export job. Plain pydantic: importable without torch or Ray."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from jobs.config import JobConfig


class ExportConfig(JobConfig):
    """Export a pretraining checkpoint as a Hugging Face model directory (Llama or GPT-2 layout)."""

    kind: Literal["export"] = "export"
    run: str | None = None
    """Pretraining run directory (local or s3://); its newest complete checkpoint is exported."""
    checkpoint: str | None = None
    """A specific checkpoint directory to export instead of a run's newest."""
    output: str
    """Directory (local or s3://) that receives the Hugging Face model."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Precision of the exported weights (checkpoints are fp32; bf16 halves the size)."""
    overwrite: bool = False
    """Replace an existing export at `output` (otherwise a non-empty `output` is an error)."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.run is None) == (self.checkpoint is None):
            raise ValueError("set exactly one of run (newest checkpoint of a run) and checkpoint (a specific one)")
        return self
