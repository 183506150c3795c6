"""A small LeRobot v3.0 dataset written the way LeRobot writes one (../shared/reference/lerobot_v3.md),
with pyarrow and PyAV only: for the tests of `vla-convert lerobot`.

Each camera's episodes are encoded one file per episode (libsvtav1, yuv420p, g=2, crf 30: LeRobot's
encoder defaults) and then concatenated into one MP4 per camera by stream copy, with each episode's
from/to timestamps the running sum of the episode files' durations, as LeRobot's recorder does. All
episodes are packed into one data parquet file (rows in episode order, global `index`), one
meta/episodes file, meta/tasks.parquet and meta/stats.json. A camera may instead be stored as `image`
(PNG bytes in the parquet, as HuggingFaceVLA/libero does).

Frames are smooth moving gradients (what a codec is made for), so the decoded frames are close to the
written ones; `write_lerobot_dataset` returns the written frames, actions and instructions per episode.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

TASKS = ["put the bowl on the plate", "open the top drawer"]
CAMERAS = {"observation.images.front": (32, 48), "observation.images.wrist_cam": (24, 32)}
FPS = 10


def frames_for(episode: int, steps: int, height: int, width: int) -> np.ndarray:
    """uint8 [steps, H, W, 3]: a gradient that drifts with the step, its colours set by the episode."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for t in range(steps):
        r = 128 + 100 * np.sin((x + 2 * t) / 9.0 + episode)
        g = 128 + 100 * np.cos((y - t) / 7.0)
        b = np.full_like(x, 40.0 * (episode % 5) + 30)
        out.append(np.stack([r, g, b], axis=-1))
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def _encode(path: Path, frames: np.ndarray) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libsvtav1", rate=FPS, options={"g": "2", "crf": "30", "preset": "12"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def _concatenate(parts: list[Path], path: Path) -> list[tuple[float, float]]:
    """Stream-copy the episode files into one file; returns each part's (from, to) timestamps."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    spans, offset = [], 0
    with av.open(str(path), "w") as out:
        target = None
        for part in parts:
            with av.open(str(part)) as inp:
                source = inp.streams.video[0]
                if target is None:
                    target = out.add_stream_from_template(source, opaque=True)
                for packet in inp.demux(source):
                    if packet.dts is None:  # the demuxer's flush packet
                        continue
                    packet.pts += offset
                    packet.dts += offset
                    packet.stream = target
                    out.mux(packet)
                start = float(offset * source.time_base)
                offset += source.duration
                spans.append((start, float(offset * source.time_base)))
    return spans


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def _stats(values: np.ndarray) -> dict:
    values = values.reshape(len(values), -1).astype(np.float64)
    return {
        "min": values.min(0).tolist(),
        "max": values.max(0).tolist(),
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "count": [len(values)],
        "q01": np.quantile(values, 0.01, axis=0).tolist(),
        "q99": np.quantile(values, 0.99, axis=0).tolist(),
    }


def write_lerobot_dataset(
    root: Path,
    lengths=(6, 8, 5, 7, 9, 6),
    image_cameras: tuple[str, ...] = (),
    version: str = "v3.0",
    seed: int = 0,
) -> dict:
    """Write the dataset to `root`; cameras named in image_cameras are stored as `image` (PNG bytes)
    instead of `video`. Returns {episode_index: {"frames": {camera: [T, H, W, 3]}, "action", "state",
    "task"}} of what was written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its configuration otherwise
    rng = np.random.default_rng(seed)
    written, columns, episode_rows = {}, {}, []
    index = 0
    for e, T in enumerate(lengths):
        task = e % 2
        written[e] = {
            "frames": {cam: frames_for(e + i, T, *hw) for i, (cam, hw) in enumerate(CAMERAS.items())},
            "state": rng.normal(size=(T, 8)).astype(np.float32),
            "action": np.concatenate([rng.uniform(-1, 1, (T, 6)), rng.integers(0, 2, (T, 1))], axis=1).astype(
                np.float32
            ),
            "task": TASKS[task],
        }
        rows = {
            "observation.state": written[e]["state"],
            "action": written[e]["action"],
            "timestamp": (np.arange(T) / FPS).astype(np.float32),
            "frame_index": np.arange(T, dtype=np.int64),
            "episode_index": np.full(T, e, np.int64),
            "index": np.arange(index, index + T, dtype=np.int64),
            "task_index": np.full(T, task, np.int64),
        }
        for cam in image_cameras:
            rows[cam] = [{"bytes": _png(f), "path": None} for f in written[e]["frames"][cam]]
        for k, v in rows.items():
            columns.setdefault(k, []).extend(list(v))
        episode_rows.append(
            {
                "episode_index": e,
                "tasks": [TASKS[task]],
                "length": T,
                "data/chunk_index": 0,
                "data/file_index": 0,
                "dataset_from_index": index,
                "dataset_to_index": index + T,
                "meta/episodes/chunk_index": 0,
                "meta/episodes/file_index": 0,
                "stats/action/mean": written[e]["action"].mean(0).tolist(),
            }
        )
        index += T

    video_cameras = [c for c in CAMERAS if c not in image_cameras]
    with tempfile.TemporaryDirectory() as tmp:
        for cam in video_cameras:
            parts = []
            for e in written:
                parts.append(Path(tmp) / f"{cam}_{e}.mp4")
                _encode(parts[-1], written[e]["frames"][cam])
            path = root / "videos" / cam / "chunk-000" / "file-000.mp4"
            for row, (start, end) in zip(episode_rows, _concatenate(parts, path)):
                row.update(
                    {
                        f"videos/{cam}/chunk_index": 0,
                        f"videos/{cam}/file_index": 0,
                        f"videos/{cam}/from_timestamp": start,
                        f"videos/{cam}/to_timestamp": end,
                    }
                )

    def vectors(values: np.ndarray):  # [N, D] -> a fixed-size list column, as LeRobot's Sequence(length=D)
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), values.shape[1])

    data = {}
    for k, v in columns.items():
        if k in ("observation.state", "action"):
            data[k] = vectors(np.stack(v))
        elif k in image_cameras:
            data[k] = pa.array(v, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        else:
            data[k] = pa.array(np.asarray(v))
    (root / "data" / "chunk-000").mkdir(parents=True)
    pq.write_table(pa.table(data), root / "data" / "chunk-000" / "file-000.parquet")
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(episode_rows), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    )
    pq.write_table(
        pa.table({"task_index": pa.array([0, 1], pa.int64()), "task": TASKS}), root / "meta" / "tasks.parquet"
    )

    features = {}
    for cam, (h, w) in CAMERAS.items():
        features[cam] = {"dtype": "image" if cam in image_cameras else "video", "shape": [h, w, 3]}
        features[cam]["names"] = ["height", "width", "channels"]
        if cam not in image_cameras:
            features[cam]["info"] = {
                "video.height": h, "video.width": w, "video.codec": "av1", "video.pix_fmt": "yuv420p",
                "video.is_depth_map": False, "video.fps": FPS, "video.channels": 3, "has_audio": False,
            }  # fmt: skip
    features["observation.state"] = {"dtype": "float32", "shape": [8], "names": [f"s{i}" for i in range(8)]}
    features["action"] = {"dtype": "float32", "shape": [7], "names": None}
    for k in ("timestamp",):
        features[k] = {"dtype": "float32", "shape": [1], "names": None}
    for k in ("frame_index", "episode_index", "index", "task_index"):
        features[k] = {"dtype": "int64", "shape": [1], "names": None}
    info = {
        "codebase_version": version,
        "robot_type": "synthetic_arm",
        "total_episodes": len(lengths),
        "total_frames": index,
        "total_tasks": len(TASKS),
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": FPS,
        "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        if video_cameras
        else None,
        "features": features,
    }
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    stats = {k: _stats(np.concatenate([written[e][k] for e in written])) for k in ("action", "state")}
    stats["observation.state"] = stats.pop("state")
    (root / "meta" / "stats.json").write_text(json.dumps(stats, indent=2))
    return written
