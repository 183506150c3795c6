"""image_ops' numba kernels against the TensorFlow ops they stand for (OpenVLA's resize and
augmentation), on textured images of the sizes datasets store."""

import math

import numpy as np
import pytest
import tensorflow as tf

from vla_train.data import (
    image_ops,
    tf_setup,  # noqa: F401  (TensorFlow CPU-only)
)
from vla_train.data.augment import augment_params, tf_reference


def textured(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (12, 12, 3)).astype(np.float32)
    img = tf.image.resize(base[None], [h, w], method="bicubic")[0].numpy() + rng.normal(0, 10, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


SHAPES = [(256, 256), (256, 320), (180, 240), (64, 64), (300, 200)]


@pytest.mark.parametrize("shape", SHAPES)
def test_resize_matches_tf_lanczos3_antialias(shape):
    img = textured(*shape, seed=sum(shape))
    ours = image_ops.resize_uint8(img, 224).astype(int)
    ref = tf_reference(img, 224).numpy().astype(int)
    diff = np.abs(ours - ref)
    assert diff.max() <= 1  # float rounding at .5 boundaries only
    assert (diff > 0).mean() < 1e-3


def test_resize_same_size_is_identity():
    img = textured(224, 224, seed=1)
    assert np.array_equal(image_ops.resize_uint8(img, 224), img)


@pytest.mark.parametrize("shape", SHAPES)
def test_augmentation_matches_tf_ops(shape):
    """The crop is composed with the resize into one resampling (no uint8 rounding in between), so a
    pixel may be one level off; the colour ops are TF's formulas."""
    img = textured(*shape, seed=7 + sum(shape))
    for i in range(4):
        p = augment_params(3, np.array([i]))[0]
        ours = image_ops.resize_augment_uint8(img, 224, p).astype(int)
        ref = tf_reference(img, 224, p).numpy().astype(int)
        diff = np.abs(ours - ref)
        assert diff.mean() < 0.35, (shape, p, diff.mean())
        assert (diff > 1).mean() < 2e-3, (shape, p)
        assert diff.max() <= 8, (shape, p)


def test_augmentation_parameters_cover_openvla_ranges():
    params = augment_params(0, np.arange(400))
    side = math.sqrt(0.9)
    lo = [0, 0, -0.2, 0.8, 0.8, -0.05]
    hi = [1 - side, 1 - side, 0.2, 1.2, 1.2, 0.05]
    assert np.all(params >= np.array(lo) - 1e-6) and np.all(params <= np.array(hi) + 1e-6)
    # spread over the range, not stuck: each parameter reaches both ends' quarters
    span = np.array(hi) - np.array(lo)
    assert np.all(params.min(0) < np.array(lo) + 0.25 * span)
    assert np.all(params.max(0) > np.array(hi) - 0.25 * span)
    # seeded: the same (seed, frame) gives the same parameters, another seed others
    assert np.array_equal(augment_params(0, np.array([5]))[0], params[5])
    assert not np.allclose(augment_params(1, np.arange(400)), params)
    # uncorrelated across parameters and frames
    corr = np.corrcoef(params.T)
    assert np.abs(corr - np.eye(6)).max() < 0.2


def test_each_streams_frames_get_their_own_augmentation():
    """The ranks of a job count their frames from 0 each: frame k of rank 1 must not get rank 0's crop.
    Stream 0 keeps the parameters of a single stream."""
    frames = np.arange(400)
    rank0, rank1 = augment_params(7, frames, stream=0), augment_params(7, frames, stream=1)
    assert np.array_equal(rank0, augment_params(7, frames))
    assert not np.isclose(rank0, rank1).all(axis=1).any()  # no frame shares its parameters
    assert not np.allclose(augment_params(7, frames, stream=2), rank1)
    corr = np.corrcoef(rank0[:, 0], rank1[:, 0])[0, 1]
    assert abs(corr) < 0.2


def test_identity_parameters_leave_colours_unchanged():
    """Neutral jitter (0 brightness, contrast/saturation 1, hue 0) leaves a flat colour as it is (the crop
    geometry is covered by test_augmentation_matches_tf_ops)."""
    img = np.full((256, 256, 3), (40, 120, 200), np.uint8)
    p = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 0.0], np.float32)
    out = image_ops.resize_augment_uint8(img, 224, p).astype(int)
    assert np.abs(out - np.array([40, 120, 200])).max() <= 1
