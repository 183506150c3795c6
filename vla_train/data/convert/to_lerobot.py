"""vla-convert rlds-to-lerobot NAME DST: a registered RLDS dataset -> a LeRobot v3.0 dataset folder, so the
data can move to LeRobot-based tools.

The dataset is found as the trainer finds it (data.data_root_dir, data.registry_files) and read through its
registered standardization, as the pipeline reads it before normalization: the cameras the registry names
(primary, secondary, wrist) become `observation.images.<role>`, the proprio vector `observation.state`
(when the registry names state keys), the standardized action `action` (float32, bit for bit), each
step's instruction its `task_index`. Written (../shared/reference/lerobot_v3.md has the format):

    meta/info.json          codebase_version v3.0, fps, features (shapes, dtypes, names, video info),
                            path templates, the splits (train, then val: episode ranges)
    meta/tasks.parquet      task_index -> task (the task is the pandas index, as LeRobot writes it)
    meta/episodes/chunk-000/file-000.parquet   per episode: length, tasks, data and video file indices,
                            from/to timestamps
    meta/stats.json         mean/std/min/max/q01/q99/count per numeric feature; per channel (/255, from
                            sampled frames) per camera
    data/chunk-000/file-000.parquet            one row per frame, all episodes
    videos/observation.images.<role>/chunk-000/file-000.mp4   all episodes of a camera, back to back

Video: libx264 (h264) when the PyAV build has it (PyPI's does), else mpeg4; yuv420p, keyframe every `gop`
frames, constant rate factor `crf` (18 by default). The frames are lossy: yuv420p halves the chroma
resolution and the encoder quantizes (README states the measured error). Frame k of a camera's file has
presentation time k / fps, so each episode's from_timestamp is its first frame's index / fps.
"""

from __future__ import annotations

import json
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from vla_train.config import RldsToLerobotConfig
from vla_train.data.convert.episodes import folder_bytes
from vla_train.data.errors import DatasetError
from vla_train.data.normalize import summarize

CODEC_NAMES = {"libx264": "h264", "mpeg4": "mpeg4", "libsvtav1": "av1"}  # encoder -> info.json video.codec
ACTION_NAMES = {"EEF_POS": ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]}
MAX_SAMPLED_FRAMES = 2000  # frames per camera the image statistics are computed from
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"


def _encoder(choice: str) -> str:
    import av

    available = set(av.codecs_available)
    if choice == "auto":
        choice = "libx264" if "libx264" in available else "mpeg4"
    if choice not in available:
        raise DatasetError(f"--codec {choice}: this PyAV build has no such encoder; use auto")
    return choice


def _fps(cfg: RldsToLerobotConfig, spec) -> int:
    if cfg.fps:
        return cfg.fps
    freq = spec.control_frequency
    if not freq or abs(freq - round(freq)) > 1e-6:
        raise DatasetError(
            f"dataset '{spec.name}': the registry gives no whole-number control_frequency ({freq}); pass --fps"
        )
    return int(round(freq))


def _stats(values: np.ndarray) -> dict:
    values = values.reshape(len(values), -1)
    return {**summarize(values), "count": [len(values)]}


class VideoWriter:
    """One camera's MP4: every episode's frames appended, frame k at time k / fps."""

    def __init__(self, path: Path, encoder: str, fps: int, cfg: RldsToLerobotConfig, height: int, width: int):
        import av

        if height % 2 or width % 2:
            raise DatasetError(
                f"{path.parent.parent.name}: frames of {height}x{width}; yuv420p needs even sizes"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        options = {"g": str(cfg.gop)}
        options.update({"qscale": "2"} if encoder == "mpeg4" else {"crf": str(cfg.crf)})
        if encoder == "libsvtav1":
            options["preset"] = "12"
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(encoder, rate=fps, options=options)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.time_base, self.count, self.path = Fraction(1, fps), 0, path

    def add(self, frames: np.ndarray) -> int:
        """Append frames [T, H, W, 3]; returns the index of the first."""
        import av

        first = self.count
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            frame.pts, frame.time_base = self.count, self.time_base
            self.container.mux(self.stream.encode(frame))
            self.count += 1
        return first

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()


def _tasks_table(tasks: list[str]):
    """meta/tasks.parquet as LeRobot writes it with pandas: column task_index, the task as the index."""
    import pyarrow as pa

    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }  # fmt: skip
    table = pa.table(
        {"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())}
    )
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


class LerobotWriter:
    """Accumulates episodes into the data parquet and the camera MP4s; `finish` writes meta/."""

    def __init__(
        self, dst: Path, fps: int, encoder: str, cfg: RldsToLerobotConfig, cameras: list[str], has_state: bool
    ):
        self.dst, self.fps, self.encoder, self.cfg = dst, fps, encoder, cfg
        self.cameras, self.has_state = cameras, has_state
        self.videos: dict[str, VideoWriter] = {}
        self.data_writer = None
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict] = []
        self.numeric: dict[str, list[np.ndarray]] = {}
        self.samples: dict[str, list[np.ndarray]] = {c: [] for c in cameras}
        self.frame_shapes: dict[str, tuple] = {}
        self.num_frames = 0

    def _video(self, camera: str, frames: np.ndarray) -> VideoWriter:
        if camera not in self.videos:
            key = f"observation.images.{camera}"
            path = self.dst / VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=0)
            self.frame_shapes[camera] = frames.shape[1:]
            self.videos[camera] = VideoWriter(path, self.encoder, self.fps, self.cfg, *frames.shape[1:3])
        if frames.shape[1:] != self.frame_shapes[camera]:
            raise DatasetError(
                f"camera '{camera}': episode {len(self.episodes)} has frames {list(frames.shape[1:])}, the first "
                f"had {list(self.frame_shapes[camera])}; a LeRobot video has one size"
            )
        return self.videos[camera]

    def add(
        self, frames: dict[str, np.ndarray], action: np.ndarray, state: np.ndarray | None, texts: list[str]
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        e, T = len(self.episodes), len(action)
        row = {"episode_index": e, "length": T, "data/chunk_index": 0, "data/file_index": 0}
        for camera in self.cameras:
            first = self._video(camera, frames[camera]).add(frames[camera])
            prefix = f"videos/observation.images.{camera}/"
            row.update({prefix + "chunk_index": 0, prefix + "file_index": 0})
            row[prefix + "from_timestamp"] = first / self.fps
            row[prefix + "to_timestamp"] = (first + T) / self.fps
            stride = max(1, T // 4)  # a few frames of every episode, up to MAX_SAMPLED_FRAMES in all
            if len(self.samples[camera]) < MAX_SAMPLED_FRAMES:
                self.samples[camera].extend(frames[camera][::stride])
        task_index = np.array([self.tasks.setdefault(t, len(self.tasks)) for t in texts], np.int64)
        columns = {"action": action.astype(np.float32, copy=False)}
        if self.has_state:
            columns["observation.state"] = state.astype(np.float32, copy=False)
        columns.update(
            {
                "timestamp": (np.arange(T) / self.fps).astype(np.float32),
                "frame_index": np.arange(T, dtype=np.int64),
                "episode_index": np.full(T, e, np.int64),
                "index": np.arange(self.num_frames, self.num_frames + T, dtype=np.int64),
                "task_index": task_index,
            }
        )
        for k, v in columns.items():
            self.numeric.setdefault(k, []).append(v)
        table = pa.table(
            {
                k: pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
                if v.ndim == 2
                else v
                for k, v in columns.items()
            }
        )
        if self.data_writer is None:
            path = self.dst / DATA_PATH.format(chunk_index=0, file_index=0)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.data_writer = pq.ParquetWriter(path, table.schema, compression="snappy")
        self.data_writer.write_table(table)
        row["tasks"] = sorted(set(texts), key=texts.index)
        row.update({"dataset_from_index": self.num_frames, "dataset_to_index": self.num_frames + T})
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        self.episodes.append(row)
        self.num_frames += T

    def finish(self, splits: dict[str, str], action_encoding: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.episodes:
            raise DatasetError("the dataset has no episodes: nothing to write")
        self.data_writer.close()
        for video in self.videos.values():
            video.close()
        meta = self.dst / "meta"
        (meta / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist(self.episodes), meta / "episodes" / "chunk-000" / "file-000.parquet"
        )
        pq.write_table(_tasks_table(list(self.tasks)), meta / "tasks.parquet")
        stats = {k: _stats(np.concatenate(v)) for k, v in self.numeric.items()}
        for camera, frames in self.samples.items():
            pixels = np.stack(frames).reshape(-1, 3) / 255.0
            stats[f"observation.images.{camera}"] = {
                k: [[[x]] for x in v] for k, v in _stats(pixels).items() if k != "count"
            } | {"count": [len(frames)]}
        (meta / "stats.json").write_text(json.dumps(stats, indent=2))
        (meta / "info.json").write_text(json.dumps(self._info(splits, action_encoding), indent=2))

    def _info(self, splits: dict[str, str], action_encoding: str) -> dict:
        features = {}
        for camera in self.cameras:
            h, w, c = self.frame_shapes[camera]
            features[f"observation.images.{camera}"] = {
                "dtype": "video",
                "shape": [h, w, c],
                "names": ["height", "width", "channels"],
                "info": {
                    "video.height": h, "video.width": w, "video.codec": CODEC_NAMES[self.encoder],
                    "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": self.fps,
                    "video.channels": c, "has_audio": False, "video.g": self.cfg.gop,
                    "video.crf": None if self.encoder == "mpeg4" else self.cfg.crf,
                },
            }  # fmt: skip
        for key in ("observation.state", "action"):
            if key in self.numeric:
                dim = self.numeric[key][0].shape[1]
                names = ACTION_NAMES.get(action_encoding) if key == "action" else None
                names = (
                    names
                    if names and len(names) == dim
                    else [f"{key.split('.')[-1]}_{i}" for i in range(dim)]
                )
                features[key] = {"dtype": "float32", "shape": [dim], "names": names}
        features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
        for key in ("frame_index", "episode_index", "index", "task_index"):
            features[key] = {"dtype": "int64", "shape": [1], "names": None}
        return {
            "codebase_version": "v3.0",
            "robot_type": None,
            "total_episodes": len(self.episodes),
            "total_frames": self.num_frames,
            "total_tasks": len(self.tasks),
            "chunks_size": 1000,
            "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 200,
            "fps": self.fps,
            "splits": splits,
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.cameras else None,
            "features": features,
        }


def _frames(encoded: np.ndarray) -> np.ndarray:
    """Encoded JPEG/PNG frames -> uint8 [T, H, W, 3], decoded as the pipeline decodes them."""
    from vla_train.data.pipeline import decode_frame

    return np.stack([decode_frame(b, may_be_missing=False)[0].numpy() for b in encoded])


def rlds_to_lerobot(cfg: RldsToLerobotConfig) -> dict:
    """Write the registered RLDS dataset cfg.data.dataset_name as a LeRobot v3.0 dataset to cfg.dst."""
    from vla_train.data.mixture import run_datasets
    from vla_train.data.rlds import EpisodeOrder, dataset_spec, open_builder, read_episodes

    start = time.monotonic()
    d = cfg.data
    run_datasets(d)  # registers data.registry_files
    spec = dataset_spec(d.dataset_name)
    builder = open_builder(d.data_root_dir, d.dataset_name)
    fps, encoder = _fps(cfg, spec), _encoder(cfg.codec)
    cameras = [role for role in ("primary", "secondary", "wrist") if spec.image_obs_keys.get(role)]
    has_state = any(k is not None for k in spec.state_obs_keys)
    writer = LerobotWriter(Path(cfg.dst), fps, encoder, cfg, cameras, has_state)
    splits, names = {}, [s for s in ("train", "val") if s in builder.info.splits]
    names += sorted(s for s in builder.info.splits if s not in names)
    for split in names:
        first = len(writer.episodes)
        order = EpisodeOrder(train=False, seed=0)
        for traj in read_episodes(
            builder, split, order, dataset_name=d.dataset_name, cameras=cameras
        ).as_numpy_iterator():
            frames = {c: _frames(traj["observation"][f"image_{c}"]) for c in cameras}
            texts = [t.decode() for t in traj["task"]["language_instruction"]]
            writer.add(frames, traj["action"], traj["observation"]["proprio"], texts)
        splits[split] = f"{first}:{len(writer.episodes)}"
    writer.finish(splits, spec.action_encoding)
    return {
        "dataset": d.dataset_name,
        "path": cfg.dst,
        "episodes": len(writer.episodes),
        "frames": writer.num_frames,
        "tasks": len(writer.tasks),
        "fps": fps,
        "codec": f"{encoder} ({CODEC_NAMES[encoder]}), yuv420p, gop {cfg.gop}"
        + ("" if encoder == "mpeg4" else f", crf {cfg.crf}"),
        "disk_mb": round(folder_bytes(Path(cfg.dst)) / 2**20, 3),
        "seconds": round(time.monotonic() - start, 2),
    }
