"""Trace a model (HF config, meta device) into a networkx op graph grouped into blocks.

``graph.hf_config`` resolves presets and config files (pure JSON, no torch);
``graph.opgraph`` is the graph's data model; ``graph.trace`` builds it with torch.export.
"""
