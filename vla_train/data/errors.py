"""Bad-data errors: `DatasetError`, and turning what goes wrong inside a tf.data pipeline into errors that
name the dataset, the episode and the key (or the file), and what to do about it.

Two kinds of failure surface only while a pipeline runs, as TensorFlow errors:

- bad values found by the pipeline's own checks (NaN/inf actions or proprio in `transforms.EpisodeFilter`,
  a corrupt JPEG or PNG in the pipeline's `FrameCheck`, every episode dropped by the filters). With
  `on_bad_data=raise` those checks fail a `tf.debugging.Assert` whose message is built by
  `bad_data_message` (inside the graph); `diagnose_read_error` recognizes the message and returns it as a
  `DatasetError`. With `on_bad_data=skip` the episode or frame is dropped and counted instead.
- a corrupt TFRecord file: TensorFlow raises `tf.errors.DataLossError` ("corrupted record at 7045") without
  naming the file. `diagnose_read_error` re-reads every TFRecord file of the datasets involved (reading a
  record checks its CRCs) and names the corrupt file(s).

Use (around any iteration of a tf.data pipeline over these datasets):

    with read_errors_named(data_root_dir, dataset_names):
        for batch in ds.as_numpy_iterator():
            ...

Structural problems (missing directory, unknown name, missing key, wrong action dimension, empty split)
are found before any data flows and raise `DatasetError` directly (rlds.py).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from vla_train.data.tf_setup import tf


class DatasetError(ValueError):
    """A problem with a dataset on disk; the message names the dataset and what to do."""


# Marks a message built by `bad_data_message`, so that diagnose_read_error can find it inside the text of a
# TensorFlow error (which adds its own prefix, node names and escapes quotes).
_OPEN = "<<vla_train: "
_CLOSE = " :vla_train>>"
_TAGGED = re.compile(re.escape(_OPEN) + r"(.*?)" + re.escape(_CLOSE), re.DOTALL)

SKIP_HINT = "set data.on_bad_data=skip to drop and count such episodes"


def bad_data_message(*parts):
    """A scalar tf.string for `tf.debugging.Assert(ok, [bad_data_message(...)])`: the parts (Python
    strings or scalar tf.string tensors) joined and tagged so `diagnose_read_error` can extract them."""
    return tf.strings.join(
        [_OPEN, *[tf.cast(p, tf.string) if not isinstance(p, str) else p for p in parts], _CLOSE]
    )


def first_string(x, default: str = "?"):
    """The first element of a [T] string tensor as a scalar (`default` for an empty or absent one)."""
    if x is None:
        return tf.constant(default)
    return tf.strings.reduce_join(tf.concat([x[:1], tf.constant([default])], 0)[:1])


def tagged_message(text: str) -> str | None:
    """The message of a failed `bad_data_message` assertion inside a TensorFlow error text, or None."""
    m = _TAGGED.search(text)
    if m is None:
        return None
    return m.group(1).replace("\\'", "'").replace('\\"', '"')


def non_finite_key(action: np.ndarray, proprio: np.ndarray) -> str | None:
    """'action' or 'observation/proprio' when that array holds NaN or inf (action first), else None."""
    if not np.isfinite(action).all():
        return "action"
    if proprio.size and not np.isfinite(proprio).all():
        return "observation/proprio"
    return None


def tfrecord_files(data_root_dir: str | Path, dataset_name: str) -> list[Path]:
    """The TFRecord files of a dataset's newest version directory."""
    from vla_train.data.rlds import version_dir  # rlds imports this module: resolved at call time

    return sorted(p for p in version_dir(data_root_dir, dataset_name).iterdir() if ".tfrecord" in p.name)


def first_unreadable(files: Iterable[Path]) -> tuple[Path, str] | None:
    """(file, TensorFlow's complaint) of the first file whose records cannot all be read (bad CRC,
    truncated), or None."""
    for path in files:
        try:
            for _ in tf.data.TFRecordDataset(str(path), buffer_size=1 << 20):
                pass
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.InvalidArgumentError) as e:
            return path, _short(e.message)
    return None


def _short(message: str) -> str:
    """TensorFlow's own words without its node / op decorations."""
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message)
    message = re.sub(r"\s*\[\[\{\{node [^]]*\]\]", "", message)
    message = re.sub(r"\s*\[Op:[^]]*\].*$", "", message, flags=re.DOTALL)
    return message.strip()


def _is_read_error(exc: BaseException) -> bool:
    if isinstance(exc, tf.errors.DataLossError):
        return True
    text = getattr(exc, "message", str(exc))
    return isinstance(exc, tf.errors.OpError) and any(
        s in text
        for s in (
            "corrupted record",
            "truncated record",
            "Could not parse example",
            "Is this even a TFRecord",
        )
    )


def diagnose_read_error(
    data_root_dir: str | Path, dataset_names: str | Sequence[str], exc: BaseException
) -> DatasetError | None:
    """A DatasetError explaining a TensorFlow error raised while iterating a pipeline over `dataset_names`
    (one name or a mixture's names), or None when the error is not about the data (re-raise it then).

    - a failed bad-data assertion (NaN/inf values, corrupt JPEG, every episode dropped): its message, which
      names the dataset, the episode and the key;
    - a DataLossError (or a record that does not parse): the TFRecord files of the datasets are re-read
      (this reads every record, so it takes as long as a pass over the files) and the corrupt file is named.
    """
    if isinstance(exc, DatasetError):
        return exc
    text = getattr(exc, "message", None) or str(exc)
    tagged = tagged_message(text)
    if tagged is not None:
        return DatasetError(tagged)
    if not _is_read_error(exc):
        return None
    names = [dataset_names] if isinstance(dataset_names, str) else list(dict.fromkeys(dataset_names))
    for name in names:
        try:
            files = tfrecord_files(data_root_dir, name)
        except DatasetError:
            continue
        bad = first_unreadable(files)
        if bad:
            path, why = bad
            return DatasetError(
                f"dataset '{name}': file {path} is corrupt ({why}); re-download the dataset or rebuild it "
                f"(delete {path.parent} and run its tfds builder again)"
            )
    listed = ", ".join(f"'{n}'" for n in names)
    return DatasetError(
        f"dataset {listed}: reading failed ({_short(text)}), but every TFRecord file passes a CRC scan now; "
        "a record may hold bytes that do not parse as the dataset's features: rebuild the dataset"
    )


@contextlib.contextmanager
def read_errors_named(data_root_dir: str | Path, dataset_names: str | Sequence[str]) -> Iterator[None]:
    """Around an iteration over `dataset_names`: a TensorFlow error about the data becomes the DatasetError
    of `diagnose_read_error`; any other error passes unchanged."""
    try:
        yield
    except tf.errors.OpError as e:
        error = diagnose_read_error(data_root_dir, dataset_names, e)
        if error is None:
            raise
        raise error from None


__all__ = [
    "SKIP_HINT",
    "DatasetError",
    "bad_data_message",
    "diagnose_read_error",
    "first_string",
    "first_unreadable",
    "non_finite_key",
    "read_errors_named",
    "tagged_message",
    "tfrecord_files",
]
