"""OpenVLA's train-time image augmentation: its random parameters, one set per frame, drawn from the run
seed, the stream (a data-parallel rank's shard) and the frame's position in it (a counter-based hash, so
any frame's parameters can be recomputed, e.g. after a resume), in the order image_ops applies them:

    random resized crop  scale 0.9, ratio 1.0 (side sqrt(0.9)), back to the input size: offsets y, x
    brightness           delta uniform in [-0.2, 0.2]
    contrast             factor uniform in [0.8, 1.2]
    saturation           factor uniform in [0.8, 1.2]
    hue                  delta uniform in [-0.05, 0.05]
"""

from __future__ import annotations

import math

import numpy as np

from vla_train.data.image_ops import CROP_AREA, NUM_AUG_PARAMS
from vla_train.data.tf_setup import tf

BRIGHTNESS = 0.2
CONTRAST = (0.8, 1.2)
SATURATION = (0.8, 1.2)
HUE = 0.05

_SIDE = math.sqrt(CROP_AREA)
LOW = np.array([0.0, 0.0, -BRIGHTNESS, CONTRAST[0], SATURATION[0], -HUE])
HIGH = np.array([1.0 - _SIDE, 1.0 - _SIDE, BRIGHTNESS, CONTRAST[1], SATURATION[1], HUE])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def augment_params(seed: int, frame_index: np.ndarray, stream: int = 0) -> np.ndarray:
    """float32 [B, NUM_AUG_PARAMS]: each frame's parameters, uniform in their ranges, from (seed, stream,
    index). `stream` tells apart streams that count their frames from 0 each (the shards of the ranks of
    a job: frame k of every rank would otherwise get the same crop); stream 0 keeps the keys of a single
    stream."""
    index = np.asarray(frame_index, np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.full(index.shape, seed, np.int64).astype(np.uint64))
        if stream:
            key = _splitmix64(key ^ _splitmix64(np.full(index.shape, stream, np.uint64)))
        key = _splitmix64(key ^ index)[:, None] + np.arange(NUM_AUG_PARAMS, dtype=np.uint64)[None]
        bits = _splitmix64(key) >> np.uint64(11)  # 53 random bits
    unit = bits.astype(np.float64) / float(1 << 53)
    return (LOW + unit * (HIGH - LOW)).astype(np.float32)


def tf_reference(image, size: int, params=None):
    """OpenVLA's resize (lanczos3, antialiased, rounded to uint8) and, with `params` (as augment_params
    gives them), its augmentation, as the TensorFlow ops it is defined by: the reference image_ops is
    tested against (tests/test_image_ops.py) and benchmarked against (scripts/bench_data.py)."""
    x = tf.image.resize(image, [size, size], method="lanczos3", antialias=True)
    x = tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)
    if params is None:
        return x
    p = tf.cast(params, tf.float32)
    x = tf.image.convert_image_dtype(x, tf.float32)
    box = tf.stack([p[0], p[1], p[0] + _SIDE, p[1] + _SIDE])[None]
    x = tf.clip_by_value(tf.image.crop_and_resize(x[None], box, [0], [size, size])[0], 0, 1)
    x = tf.clip_by_value(tf.image.adjust_brightness(x, p[2]), 0, 1)
    x = tf.clip_by_value(tf.image.adjust_contrast(x, p[3]), 0, 1)
    x = tf.clip_by_value(tf.image.adjust_saturation(x, p[4]), 0, 1)
    x = tf.clip_by_value(tf.image.adjust_hue(x, p[5]), 0, 1)
    return tf.image.convert_image_dtype(x, tf.uint8, saturate=True)
