"""Post-training: SFT, DPO, reward models and reinforcement learning on top of a pretrained checkpoint."""
