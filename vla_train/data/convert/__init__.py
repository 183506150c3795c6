"""Converters from other robot data layouts to RLDS datasets written by our own tfds builders
(`vla-convert`): raw per-episode folders (raw.py)."""
