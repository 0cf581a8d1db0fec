"""Attention inputs for type hints: ``AttnMeta`` (and ``rms_norm``) are defined with the decoder's
module tree in ``executors.model``; ``executors.attention`` names them through this module."""

from executors.model import AttnMeta, rms_norm

__all__ = ["AttnMeta", "rms_norm"]
