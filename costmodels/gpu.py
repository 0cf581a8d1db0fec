"""The GPU description (``plans.gpu.GPU``: the plan contract holds it, so a plan compiled for an
inline GPU carries its figures); re-exported here for the cost model."""

from plans.gpu import GPU, Positive

__all__ = ["GPU", "Positive"]
