"""vla-convert lerobot SRC DST: a local LeRobot v3.0 dataset folder -> an RLDS dataset written by our tfds
builder, plus the registry entry that makes it trainable (episodes.write_rlds, as `vla-convert raw`).

The layout is read from the dataset's own meta/info.json (codebase_version "v3.0", else refused with the
version found and what to do): the `data_path` / `video_path` templates, `fps` and `features` (shapes,
dtypes, the video codec); meta/tasks.parquet (task_index -> text); meta/episodes/**.parquet (per
episode: its data file, per camera its video file and from/to timestamps, its length).

Which features become what (ConvertLerobotConfig): primary camera (default the first
`observation.images.*` feature whose key does not contain "wrist"), wrist camera (default a camera key containing "wrist"), state (default
`observation.state` when present), action (`action`); each step's instruction is its task_index's text.
Cameras stored as `video` are decoded with PyAV; those stored as `image` (PNG/JPEG bytes in the parquet)
with Pillow.

Frames are located by timestamp as LeRobot does: a row's frame is at the episode's from_timestamp (of
that camera's file) + the row's `timestamp`, and the decoded frame whose presentation time is nearest is
taken, if it is within tolerance_s (LeRobot's 1e-4 s); otherwise the conversion fails naming the episode,
camera and timestamp. Each MP4 file is decoded forward once; the decoder seeks (to the keyframe before an
episode) only to skip the episodes of the other split or when episodes are stored out of order.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vla_train.config import ConvertLerobotConfig
from vla_train.data.convert.episodes import (
    Episode,
    action_encoding,
    folder_bytes,
    registry_entry,
    val_keys,
    write_rlds,
)
from vla_train.data.errors import DatasetError

CODEBASE_VERSION = "v3.0"
CAMERA_PREFIX = "observation.images."
SEEK_AHEAD_S = 2.0  # decode forward over a gap shorter than this; seek over a longer one


def read_info(src: Path) -> dict:
    """meta/info.json of a v3.0 dataset; any other version (or a v2.x layout) is refused."""
    path = src / "meta" / "info.json"
    if not path.is_file():
        raise DatasetError(f"{src}: not a LeRobot dataset folder (no meta/info.json)")
    info = json.loads(path.read_text())
    version = str(info.get("codebase_version", "unknown"))
    if version != CODEBASE_VERSION:
        fix = "vla-convert lerobot reads v3.0 datasets only"
        if version.startswith("v2") or list((src / "meta").glob("*.jsonl")):
            fix += (
                "; convert it to v3.0 with LeRobot's own script first: "
                "python -m lerobot.scripts.convert_dataset_v21_to_v30 --repo-id=<id> (or re-download the "
                "dataset's v3.0 revision)"
            )
        raise DatasetError(f"{src}: LeRobot codebase_version '{version}' is not supported; {fix}")
    missing = [k for k in ("fps", "features", "data_path") if k not in info]
    if missing:
        raise DatasetError(f"{src}/meta/info.json: missing {missing}")
    return info


def _table(path: Path, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=columns)


def read_tasks(src: Path) -> dict[int, str]:
    table = _table(src / "meta" / "tasks.parquet")
    if not {"task", "task_index"} <= set(table.column_names):
        raise DatasetError(
            f"{src}/meta/tasks.parquet: needs columns 'task' and 'task_index', has {table.column_names}"
        )
    return dict(zip(table["task_index"].to_pylist(), table["task"].to_pylist()))


def read_episodes_meta(src: Path) -> list[dict]:
    """One dict per episode (episode_index order), the `stats/` columns left out."""
    import pyarrow as pa

    files = sorted((src / "meta" / "episodes").rglob("*.parquet"))
    if not files:
        raise DatasetError(f"{src}: no meta/episodes/chunk-*/file-*.parquet")
    import pyarrow.parquet as pq

    tables = []
    for f in files:
        names = pq.read_schema(f).names
        tables.append(_table(f, [n for n in names if not n.startswith("stats/")]))
    rows = pa.concat_tables(tables, promote_options="default").to_pylist()
    return sorted(rows, key=lambda r: r["episode_index"])


@dataclass(frozen=True)
class Mapping:
    """Which LeRobot feature becomes which of our keys (image, wrist_image, state, action)."""

    keys: dict[str, str]  # our key -> LeRobot feature key

    @property
    def cameras(self) -> dict[str, str]:
        return {k: v for k, v in self.keys.items() if k in ("image", "wrist_image")}


def _camera_key(name: str, cameras: list[str]) -> str:
    return name if name in cameras or name.startswith(CAMERA_PREFIX) else CAMERA_PREFIX + name


def resolve_mapping(cfg: ConvertLerobotConfig, features: dict) -> Mapping:
    """The configured (or default) feature of each of our keys; a missing one is an error naming it and
    the features the dataset has."""
    cameras = [
        k for k, v in features.items() if k.startswith(CAMERA_PREFIX) and v.get("dtype") in ("video", "image")
    ]
    numeric = [k for k, v in features.items() if v.get("dtype") not in ("video", "image", "string")]
    problems, keys = [], {}

    def want(our: str, field: str, feature: str, available: list[str]) -> None:
        if feature in available:
            keys[our] = feature
        else:
            problems.append(f"--{field}: no feature '{feature}' in the dataset; it has {available}")

    if not cameras:
        problems.append(f"the dataset has no camera ({CAMERA_PREFIX}* feature of dtype video or image)")
    elif cfg.primary_camera == "auto":  # the first camera that is not a wrist camera, if there is one
        keys["image"] = next((c for c in cameras if "wrist" not in c[len(CAMERA_PREFIX) :]), cameras[0])
    else:
        want("image", "primary_camera", _camera_key(cfg.primary_camera, cameras), cameras)
    if cfg.wrist_camera == "auto":
        wrist = [c for c in cameras if "wrist" in c[len(CAMERA_PREFIX) :] and c != keys.get("image")]
        if wrist:
            keys["wrist_image"] = wrist[0]
    elif cfg.wrist_camera != "none":
        want("wrist_image", "wrist_camera", _camera_key(cfg.wrist_camera, cameras), cameras)
    if cfg.state_key == "auto":
        if "observation.state" in features:
            keys["state"] = "observation.state"
    elif cfg.state_key != "none":
        want("state", "state_key", cfg.state_key, numeric)
    want("action", "action_key", cfg.action_key, numeric)
    for our in ("state", "action"):
        if our in keys and len(features[keys[our]].get("shape", [])) != 1:
            problems.append(
                f"feature '{keys[our]}' ({our}) must be a vector, has shape {features[keys[our]]['shape']}"
            )
    if problems:
        raise DatasetError("cannot map the LeRobot features:\n  " + "\n  ".join(problems))
    return Mapping(keys)


def _frame_shape(key: str, feature: dict) -> tuple[int, int, int]:
    names, shape = feature.get("names") or ["height", "width", "channels"], feature["shape"]
    if len(shape) != 3 or len(names) != 3:
        raise DatasetError(f"camera '{key}': shape {shape} is not [height, width, channels]")
    dims = dict(zip(names, shape))
    if dims.get("channels") != 3:
        raise DatasetError(f"camera '{key}': {dims.get('channels')} channels; only RGB (3) is read")
    return int(dims["height"]), int(dims["width"]), 3


class VideoFrames:
    """The frames of one camera's MP4 files, decoded forward (PyAV), looked up by presentation time."""

    def __init__(self, key: str, tolerance_s: float):
        self.key, self.tolerance_s = key, tolerance_s
        self.path: Path | None = None
        self.container = None
        self.current = self.next = (
            None  # (time, frame): the last decoded at or before the query, the one after
        )

    def _open(self, path: Path, first: float, seek: bool = True) -> None:
        import av

        self.close()
        self.path, self.container = path, av.open(str(path))
        stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"
        self.time_base = stream.time_base
        seek = seek and first > SEEK_AHEAD_S
        if seek:  # to the keyframe at or before the episode's first frame
            self.container.seek(int(first / self.time_base), stream=stream, backward=True, any_frame=False)
        self.frames = self.container.decode(stream)
        self.current, self.next = None, self._decode()
        if seek and (self.next is None or self.next[0] > first):  # the seek overshot: decode from the start
            self._open(path, first, seek=False)

    def _decode(self):
        frame = next(self.frames, None)
        if frame is None:
            return None
        return float(frame.pts * self.time_base) if frame.pts is not None else float(frame.time), frame

    def get(self, path: Path, times: np.ndarray, episode: int) -> np.ndarray:
        """uint8 [T, H, W, 3]: for each time (s, ascending) the frame nearest to it within tolerance_s."""
        tol, first = self.tolerance_s, float(times[0])
        went_back = self.current is not None and first < self.current[0] - tol
        far_ahead = self.next is not None and first > self.next[0] + SEEK_AHEAD_S
        if self.container is None or path != self.path or went_back or far_ahead:
            self._open(path, first)
        out = []
        for q in times:
            while self.next is not None and self.next[0] <= q:
                self.current, self.next = self.next, self._decode()
            near = [c for c in (self.current, self.next) if c is not None]
            best = min(near, key=lambda c: abs(c[0] - q)) if near else None
            if best is None or not abs(best[0] - q) < tol:
                found = "no frames" if best is None else f"the nearest frame is at {best[0]:.6f}s"
                raise DatasetError(
                    f"episode {episode}, camera '{self.key}': no frame within {tol:g}s of timestamp {q:.6f}s "
                    f"in {path} ({found}); the episode's from_timestamp or the rows' timestamps do not match "
                    "the video (LeRobot would fail on this frame too)"
                )
            out.append(best[1].to_ndarray(format="rgb24"))
        return np.stack(out)

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.container, self.path, self.current, self.next = None, None, None, None


def _image_bytes(src: Path, cell: dict | None, where: str) -> np.ndarray:
    """An `image` feature's cell ({bytes, path}: PNG/JPEG bytes, or a file under SRC) -> uint8 [H, W, 3]."""
    from PIL import Image

    if cell and cell.get("bytes"):
        data = io.BytesIO(cell["bytes"])
    elif cell and cell.get("path") and (src / cell["path"]).is_file():
        data = src / cell["path"]
    else:
        raise DatasetError(f"{where}: the image has neither bytes nor a file under {src}")
    with Image.open(data) as im:
        return np.asarray(im.convert("RGB"))


def _vectors(column, dtype=np.float32) -> np.ndarray:
    """A fixed-size (or variable) list column -> [N, D] numpy, values as stored."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(n, -1).astype(dtype, copy=False)


class LerobotEpisodes:
    """Loads the episodes of a v3.0 dataset one by one, as our Episode arrays."""

    def __init__(self, src: Path, info: dict, mapping: Mapping, tasks: dict[int, str], tolerance_s: float):
        self.src, self.info, self.mapping, self.tasks = src, info, mapping, tasks
        self.meta = {row["episode_index"]: row for row in read_episodes_meta(src)}
        features = info["features"]
        self.video = {k: f for k, f in mapping.cameras.items() if features[f]["dtype"] == "video"}
        self.readers = {k: VideoFrames(f, tolerance_s) for k, f in self.video.items()}
        self.shapes = {k: _frame_shape(f, features[f]) for k, f in mapping.cameras.items()}
        for k in ("state", "action"):
            if k in mapping.keys:
                self.shapes[k] = (int(features[mapping.keys[k]]["shape"][0]),)
        self._data_path, self._data = None, None

    def check(self) -> None:
        """Every data and video file an episode names exists (before anything is written)."""
        if self.video and not self.info.get("video_path"):
            raise DatasetError(f"{self.src}/meta/info.json: video features but no video_path template")
        missing = set()
        for row in self.meta.values():
            paths = [self._data_file(row)] + [self._video_file(row, f) for f in self.video.values()]
            missing |= {str(p) for p in paths if not p.is_file()}
        if missing:
            raise DatasetError(
                f"{self.src}: {len(missing)} file(s) named by meta/episodes are missing: {sorted(missing)[:10]}"
            )

    def _data_file(self, row: dict) -> Path:
        return self.src / self.info["data_path"].format(
            chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]
        )

    def _video_file(self, row: dict, feature: str) -> Path:
        prefix = f"videos/{feature}/"
        if prefix + "chunk_index" not in row:
            raise DatasetError(
                f"{self.src}: meta/episodes has no '{prefix}chunk_index' for video feature '{feature}' "
                f"(episode {row['episode_index']})"
            )
        return self.src / self.info["video_path"].format(
            video_key=feature, chunk_index=row[prefix + "chunk_index"], file_index=row[prefix + "file_index"]
        )

    def _rows(self, row: dict):
        path = self._data_file(row)
        if path != self._data_path:
            columns = ["episode_index", "timestamp", "task_index", "frame_index"]
            columns += [self.mapping.keys[k] for k in ("state", "action") if k in self.mapping.keys]
            columns += [f for k, f in self.mapping.cameras.items() if k not in self.video]
            self._data_path, self._data = path, _table(path, columns)
        import pyarrow.compute as pc

        table = self._data.filter(pc.equal(self._data["episode_index"], row["episode_index"]))
        return table.sort_by("frame_index")

    def key(self, index: int) -> str:
        return f"episode_{index:06d}"

    def load(self, key: str) -> Episode:
        index = int(key.rsplit("_", 1)[1])
        row = self.meta[index]
        table = self._rows(row)
        where = f"{self.src}: episode {index}"
        if table.num_rows != row["length"]:
            raise DatasetError(
                f"{where}: {table.num_rows} rows in {self._data_path}, meta/episodes says {row['length']}"
            )
        arrays = {}
        for our in ("state", "action"):
            if our in self.mapping.keys:
                arrays[our] = _vectors(table[self.mapping.keys[our]])
        timestamps = table["timestamp"].to_numpy().astype(np.float64)
        for our, feature in self.mapping.cameras.items():
            if our in self.video:
                start = float(row[f"videos/{feature}/from_timestamp"])
                frames = self.readers[our].get(self._video_file(row, feature), start + timestamps, index)
            else:
                cells = table[feature].to_pylist()
                frames = np.stack([_image_bytes(self.src, c, f"{where}, camera '{feature}'") for c in cells])
            if frames.shape[1:] != self.shapes[our]:
                raise DatasetError(
                    f"{where}, camera '{feature}': frames are {list(frames.shape[1:])}, info.json says {list(self.shapes[our])}"
                )
            arrays[our] = frames
        unknown = sorted(set(table["task_index"].to_pylist()) - set(self.tasks))
        if unknown:
            raise DatasetError(f"{where}: task_index {unknown} not in meta/tasks.parquet")
        instructions = [self.tasks[t] for t in table["task_index"].to_pylist()]
        return Episode(self.src / key, arrays, instructions, float(self.info["fps"]))

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def convert_lerobot(cfg: ConvertLerobotConfig) -> dict:
    """Read the LeRobot v3.0 dataset cfg.src and write it as an RLDS dataset plus registry entry to cfg.dst."""
    src, dst = Path(cfg.src), Path(cfg.dst)
    name = cfg.name or dst.name
    info = read_info(src)
    mapping = resolve_mapping(cfg, info["features"])
    episodes = LerobotEpisodes(src, info, mapping, read_tasks(src), cfg.tolerance_s)
    episodes.check()
    keys = [episodes.key(i) for i in sorted(episodes.meta)]
    val = val_keys(keys, cfg.val_fraction, cfg.seed)
    splits = {"train": [k for k in keys if k not in val], "val": [k for k in keys if k in val]}
    shapes = episodes.shapes
    encoding = action_encoding(cfg.action_encoding, shapes["action"][0])
    notes = f"Converted by vla-convert lerobot from {src} ({', '.join(f'{k}: {v}' for k, v in mapping.keys.items())})."
    entry = registry_entry(shapes, encoding, cfg.state_encoding, float(info["fps"]), notes)
    try:
        written = write_rlds(dst, name, "lerobot", shapes, splits, episodes.load, cfg.image_format, entry)
    finally:
        episodes.close()
    source_mb = folder_bytes(src) / 2**20
    frames = int(sum(row["length"] for row in episodes.meta.values()))
    return {
        **written,
        "source_mb": round(source_mb, 3),
        "episodes": {"train": len(splits["train"]), "val": len(splits["val"])},
        "frames": frames,
        "mapping": mapping.keys,
        "converted_frames_per_s": round(frames / max(written["seconds"], 1e-9), 1),
    }
