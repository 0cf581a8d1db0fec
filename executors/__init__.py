"""Materialise a plan into torch.distributed workers and run it. Reads only ``plans.schema``."""
