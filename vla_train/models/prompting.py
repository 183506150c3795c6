"""OpenVLA's prompt and label masking.

Sequence: BOS, `In: What action should the robot take to {instruction lower-cased}?\nOut: `, the empty
piece if the tokenizer did not already end the prompt with it, `action_dim` action tokens, EOS.
Labels are IGNORE_INDEX everywhere except the last action_dim + 1 positions (action tokens + EOS).
With action chunking a frame carries (F + 1) x action_dim action tokens, step by step, then EOS; the
tokens of chunk steps past the episode end stay in the input but are not learned (EOS still is).
Image patch embeddings are inserted by the model right after BOS, not here.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


def pad_prompts(prompts: list[list[int]], pad_id: int, left: bool = False, device=None):
    """(ids, attention mask) [B, L] of token-id lists of different lengths, padded on the right (or, for
    greedy decoding, on the left, so that every row's next token is at the end)."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), L), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        cols = slice(L - len(p), L) if left else slice(0, len(p))
        ids[b, cols] = torch.tensor(p, device=device)
        mask[b, cols] = 1
    return ids, mask


def prompt_text(instruction: str) -> str:
    return f"In: What action should the robot take to {instruction.lower()}?\nOut: "


class PromptBuilder:
    """Turns (instruction, action token ids) into input ids and labels, caching the prompt ids."""

    def __init__(self, tokenizer, empty_piece_id: int | None):
        self.tokenizer = tokenizer
        # Llama's sentencepiece piece "▁" (29871): present at the end of every training prompt, and
        # appended at inference when the tokenizer did not produce it.
        self.empty_piece_id = empty_piece_id
        self._cache: dict[str, list[int]] = {}

    def prompt_ids(self, instruction: str) -> list[int]:
        ids = self._cache.get(instruction)
        if ids is None:
            ids = list(self.tokenizer(prompt_text(instruction), add_special_tokens=True).input_ids)
            if ids[0] != self.tokenizer.bos_token_id:
                ids = [self.tokenizer.bos_token_id] + ids
            if self.empty_piece_id is not None and ids[-1] != self.empty_piece_id:
                ids.append(self.empty_piece_id)
            if len(self._cache) < 100_000:
                self._cache[instruction] = ids
        return list(ids)

    def training_example(
        self, instruction: str, action_ids: np.ndarray, step_mask: np.ndarray | None = None
    ) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for one frame; labels only on the action tokens and EOS.

        action_ids: [A], or a chunk [F + 1, A]; step_mask [F + 1] (the pipeline's action_pad_mask): False
        for the chunk steps past the episode end, whose tokens get no label.
        """
        ids = np.asarray(action_ids)
        flat = [int(a) for a in ids.reshape(-1)]
        eos = self.tokenizer.eos_token_id
        prompt = self.prompt_ids(instruction)
        action_labels = flat
        if step_mask is not None:
            step_mask = np.asarray(step_mask, bool)
            assert ids.ndim == 2 and step_mask.shape == ids.shape[:1], (ids.shape, step_mask.shape)
            keep = np.repeat(step_mask, ids.shape[-1])
            action_labels = [a if k else IGNORE_INDEX for a, k in zip(flat, keep, strict=True)]
        return prompt + flat + [eos], [IGNORE_INDEX] * len(prompt) + action_labels + [eos]
