"""The network: augmentations, backbones, batched inference, checkpoints."""
