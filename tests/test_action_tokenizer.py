"""ActionTokenizer against values computed by hand from the reference (vocab 32000, 256 bins)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_train.models.action_tokenizer import ActionTokenizer

EDGES = np.linspace(-1, 1, 256)
STEP = 2 / 255  # distance between edges


@pytest.fixture
def tok():
    return ActionTokenizer(32000)


def test_edges_and_centres(tok):
    assert tok.bins[0] == -1 and tok.bins[-1] == 1 and len(tok.bin_centers) == 255
    assert tok.bin_centers[0] == pytest.approx(-1 + STEP / 2)
    assert tok.bin_centers[254] == pytest.approx(1 - STEP / 2)


@pytest.mark.parametrize(
    "value, token",
    [
        (-1.0, 31999),  # digitize(-1) = 1
        (1.0, 31744),  # digitize(1) = 256: the largest value gets the smallest id
        (0.0, 31872),  # 0 lies between edges 127 and 128 -> 128
        (5.0, 31744),  # clipped to 1
        (-7.0, 31999),  # clipped to -1
        (EDGES[10], 31989),  # exactly on edge 10 -> digitize 11 (right-open bins)
        (EDGES[10] - 1e-9, 31990),  # just below edge 10 -> 10
        (-1 + STEP / 2, 31999),  # centre of the first bin
    ],
)
def test_encode_hand_computed(tok, value, token):
    assert tok.encode(np.array([value]))[0] == token


@pytest.mark.parametrize(
    "token, value",
    [
        (31999, -1 + STEP / 2),  # index 0
        (31744, 1 - STEP / 2),  # index 255 clipped to 254
        (31745, 1 - STEP / 2),  # index 254
        (31872, EDGES[127] + STEP / 2),  # index 127
        (30000, 1 - STEP / 2),  # not an action token: index clipped to 254
    ],
)
def test_decode_hand_computed(tok, token, value):
    assert tok.decode(np.array([token]))[0] == pytest.approx(value, abs=1e-6)


def test_round_trip_error_is_at_most_one_bin(tok):
    x = np.random.default_rng(0).uniform(-1, 1, size=(100, 7))
    assert np.abs(tok.decode(tok.encode(x)) - x).max() <= STEP + 1e-9
    assert tok.encode(x).shape == (100, 7)


def test_action_token_mask_numpy_and_torch(tok):
    assert tok.action_token_begin_idx == 31743
    ids = np.array([31743, 31744, 31999, 2, -100])
    assert tok.is_action_token(ids).tolist() == [False, True, True, False, False]
    assert tok.is_action_token(torch.tensor(ids)).tolist() == [False, True, True, False, False]


def test_vocab_must_exceed_bins():
    with pytest.raises(ValueError, match="vocab_size"):
        ActionTokenizer(100)
