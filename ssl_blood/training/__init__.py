"""Pretraining: config and presets, optimiser and schedules, DDP, the loop, the run folder."""
