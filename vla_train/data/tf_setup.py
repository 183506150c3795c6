"""Import TensorFlow (and tensorflow-datasets) CPU-only and quietly: the data pipeline must never take GPU
memory from torch. Data modules import `tf` / `tfds` from here, so this runs before TensorFlow starts."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402, F401

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # already initialized (then it was initialized by us, CPU-only, or has no GPU)
    pass
