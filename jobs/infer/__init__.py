"""Inference: batch generation, evaluation and OpenAI-compatible serving of a checkpoint."""
