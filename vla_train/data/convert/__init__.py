"""Converters between other robot data layouts and RLDS datasets written by our own tfds builders
(`vla-convert`): raw per-episode folders (raw.py) and LeRobot v3.0 datasets (lerobot.py) -> RLDS through
the shared writer (episodes.py); a registered RLDS dataset -> LeRobot v3.0 (to_lerobot.py)."""
