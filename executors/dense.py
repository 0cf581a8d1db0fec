"""``AttnMeta`` under its older module name (``executors.attention``'s type hints import it from
here); it is defined with the decoder's module tree in ``executors.model``."""

from executors.model import AttnMeta

__all__ = ["AttnMeta"]
