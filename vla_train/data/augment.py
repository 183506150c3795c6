"""OpenVLA's train-time image augmentation, as stateless TF ops seeded per frame (reproducible from the
run seed): random resized crop (scale 0.9, ratio 1.0, back to input size), brightness 0.2, contrast
[0.8, 1.2], saturation [0.8, 1.2], hue 0.05, values clipped to [0, 1] after each op."""

from __future__ import annotations

import tensorflow as tf


def augment_image(image_HWC_float01: tf.Tensor, seed_2: tf.Tensor) -> tf.Tensor:
    seeds = tf.random.experimental.stateless_split(seed_2, num=6)
    img = image_HWC_float01
    h = tf.cast(tf.shape(img)[0], tf.float32)
    w = tf.cast(tf.shape(img)[1], tf.float32)
    side = tf.sqrt(0.9)  # area 0.9 with aspect ratio 1.0
    off = tf.random.stateless_uniform([2], seeds[0], 0.0, 1.0 - side)
    box = tf.stack([off[0], off[1], off[0] + side, off[1] + side])[None]
    img = tf.image.crop_and_resize(img[None], box, [0], tf.cast(tf.stack([h, w]), tf.int32))[0]
    img = tf.clip_by_value(img, 0.0, 1.0)
    img = tf.clip_by_value(tf.image.stateless_random_brightness(img, 0.2, seeds[1]), 0.0, 1.0)
    img = tf.clip_by_value(tf.image.stateless_random_contrast(img, 0.8, 1.2, seeds[2]), 0.0, 1.0)
    img = tf.clip_by_value(tf.image.stateless_random_saturation(img, 0.8, 1.2, seeds[3]), 0.0, 1.0)
    img = tf.clip_by_value(tf.image.stateless_random_hue(img, 0.05, seeds[4]), 0.0, 1.0)
    return img
