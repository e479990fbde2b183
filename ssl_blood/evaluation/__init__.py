"""Evaluation of features: frozen heads (linear probe, kNN, few-shot) and supervised baselines."""
