"""The transformer in plain PyTorch: no Ray, no DeepSpeed."""

from model.gpt import GPT, KVCache, ModelConfig

__all__ = ["GPT", "KVCache", "ModelConfig"]
