"""Training: the DeepSpeed engine, the Ray Train trainer, the pretraining loop, pipeline
parallelism, the memory planner and learning-rate sweeps."""
