"""The transformer in plain PyTorch: no Ray, no DeepSpeed."""

__all__ = ["GPT", "KVCache", "ModelConfig"]


def __getattr__(name: str):
    # Lazy, so that `model.tokenizer` (imported by every data-pipeline Ray worker) does not pay
    # for importing torch (~2.5 s of CPU per fresh worker process).
    if name in __all__:
        from model import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
