"""The transformer in plain PyTorch: no Ray, no DeepSpeed."""

from model.config import ModelConfig

__all__ = ["GPT", "KVCache", "ModelConfig"]


def __getattr__(name: str):
    # Lazy, so that importing the config (the control API, every data-pipeline Ray worker) does
    # not pay for importing torch (~2.5 s of CPU per fresh process).
    if name in ("GPT", "KVCache"):
        from model import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
