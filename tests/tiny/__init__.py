"""Tiny HF configs and helpers for the executor tests: plans for a mesh, checkpoints, the oracle."""
