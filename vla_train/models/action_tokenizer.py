"""OpenVLA's action tokenizer: 256 uniform bins over [-1, 1] mapped onto the last ids of the base vocabulary.

encode: clip to [-1, 1], `digitize` against `linspace(-1, 1, n_bins)` (1..n_bins), id = vocab_size - digitized,
so larger values get smaller ids. decode: index = clip(vocab_size - id - 1, 0, n_bins - 2), value = bin centre.
"""

from __future__ import annotations

import numpy as np


class ActionTokenizer:
    def __init__(self, vocab_size: int, n_bins: int = 256, min_action: float = -1.0, max_action: float = 1.0):
        if vocab_size <= n_bins:
            raise ValueError(
                f"vocab_size {vocab_size} must exceed n_bins {n_bins}: action ids are its last ids"
            )
        self.vocab_size = vocab_size
        self.n_bins = n_bins
        self.min_action, self.max_action = min_action, max_action
        self.bins = np.linspace(min_action, max_action, n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    @property
    def action_token_begin_idx(self) -> int:
        """Every id strictly above this one is an action token (OpenVLA: 31743 for vocab 32000)."""
        return self.vocab_size - (self.n_bins + 1)

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """Normalized actions (any shape) -> token ids of the same shape (int64)."""
        clipped = np.clip(np.asarray(actions, dtype=np.float64), self.min_action, self.max_action)
        return (self.vocab_size - np.digitize(clipped, self.bins)).astype(np.int64)

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids (any shape) -> normalized actions at the bin centres (float32)."""
        index = np.clip(
            self.vocab_size - np.asarray(token_ids, dtype=np.int64) - 1, 0, self.bin_centers.shape[0] - 1
        )
        return self.bin_centers[index].astype(np.float32)

    def is_action_token(self, token_ids):
        """Boolean mask of action tokens; works on numpy arrays and torch tensors alike."""
        return token_ids > self.action_token_begin_idx
