"""Import TensorFlow CPU-only and quietly: the data pipeline must never take GPU memory from torch."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # already initialized (then it was initialized by us, CPU-only, or has no GPU)
    pass
