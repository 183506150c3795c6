"""LeRobot v3.0 datasets both ways: `vla-convert lerobot` (a dataset written as LeRobot writes one, two
cameras in AV1 MP4s, two tasks, six episodes packed in one parquet and one MP4 per camera) then training
through the CLI, alone and in a mixture with an RLDS dataset; `vla-convert rlds-to-lerobot` and reading it
back (frames within the codec's loss, actions bit for bit, same instructions and lengths); what is
refused: another codebase_version, a mapped key the dataset lacks, a timestamp the video does not have."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from lerobot_synthetic import CAMERAS, FPS, TASKS, write_lerobot_dataset

from vla_test_utils import run_cli

FRONT, WRIST = CAMERAS
AV1_MEAN_ERROR = 6.0  # levels (0..255): the fixture's AV1 at crf 30 on 32x48 frames measures ~3
H264_MEAN_ERROR = 3.0  # levels: rlds-to-lerobot's libx264 at crf 18, yuv420p, on these tiny frames


def convert(src: Path, dst: Path, *args: str) -> dict:
    """vla-convert lerobot in this process (the CLI itself is run by the training test)."""
    from vla_train.config import ConvertLerobotConfig
    from vla_train.config_cli import parse_config
    from vla_train.data.convert.lerobot import convert_lerobot

    return convert_lerobot(parse_config(ConvertLerobotConfig, ["--src", str(src), "--dst", str(dst), *args]))


def episodes_by_index(path: str) -> dict[int, dict]:
    """The converted RLDS episodes of all splits by their LeRobot episode_index (from file_path)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(path)
    out = {}
    for split in builder.info.splits:
        for ep in tfds.as_numpy(builder.as_dataset(split=split)):
            steps = list(ep["steps"])
            index = int(ep["episode_metadata"]["file_path"].decode().rsplit("_", 1)[1])
            out[index] = {
                "image": np.stack([s["observation"]["image"] for s in steps]),
                "wrist_image": np.stack([s["observation"]["wrist_image"] for s in steps]),
                "state": np.stack([s["observation"]["state"] for s in steps]),
                "action": np.stack([s["action"] for s in steps]),
                "instructions": [s["language_instruction"].decode() for s in steps],
            }
    return out


def mean_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def lerobot_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot") / "synthetic_arm"
    return root, write_lerobot_dataset(root)


@pytest.fixture(scope="module")
def converted(lerobot_src, tmp_path_factory):
    """The LeRobot dataset converted (PNG frames, so only AV1's loss remains): (data root, result)."""
    src, _ = lerobot_src
    data = tmp_path_factory.mktemp("converted")
    return data, convert(src, data, "--name", "lr_arm", "--image_format", "png")


def test_conversion_reads_every_frame_by_timestamp_and_keeps_the_actions(lerobot_src, converted):
    src, written = lerobot_src
    data, result = converted
    assert result["episodes"] == {"train": 5, "val": 1} and result["frames"] == 41
    assert result["mapping"] == {
        "image": FRONT,
        "wrist_image": WRIST,
        "state": "observation.state",
        "action": "action",
    }
    entry = yaml.safe_load((data / "registry.yaml").read_text())["datasets"]["lr_arm"]
    assert entry["image_obs_keys"] == {"primary": "image", "secondary": None, "wrist": "wrist_image"}
    assert entry["control_frequency"] == FPS and entry["action_encoding"] == "EEF_POS"
    episodes = episodes_by_index(result["path"])
    assert sorted(episodes) == sorted(written)
    for e, ep in episodes.items():
        want = written[e]
        assert len(ep["action"]) == len(want["action"])
        assert np.array_equal(ep["action"], want["action"]) and np.array_equal(ep["state"], want["state"])
        assert ep["instructions"] == [want["task"]] * len(want["action"])
        for ours, camera in (("image", FRONT), ("wrist_image", WRIST)):
            assert mean_error(ep[ours], want["frames"][camera]) < AV1_MEAN_ERROR, (e, camera)
            # the frame at each step, not a neighbour: the scene drifts by 2 pixels a step
            assert mean_error(ep[ours][1:], want["frames"][camera][:-1]) > 2 * mean_error(
                ep[ours], want["frames"][camera]
            ), (e, camera)
    print(f"converted {result['frames']} frames in {result['seconds']} s: {result['disk_mb']} MB RLDS (PNG) "
          f"from {result['source_mb']} MB LeRobot")  # fmt: skip


def test_image_dtype_cameras_are_read_from_the_parquet(tmp_path):
    written = write_lerobot_dataset(tmp_path / "src", lengths=(4, 3), image_cameras=(WRIST,))
    info = json.loads((tmp_path / "src" / "meta" / "info.json").read_text())
    assert info["features"][WRIST]["dtype"] == "image"
    result = convert(tmp_path / "src", tmp_path / "data", "--image_format", "png", "--val_fraction", "0")
    for e, ep in episodes_by_index(result["path"]).items():
        assert np.array_equal(ep["wrist_image"], written[e]["frames"][WRIST])  # PNG both ways: lossless


@pytest.mark.slow
def test_convert_then_train_through_the_cli(lerobot_src, tmp_path):
    from test_trainer import tiny_args

    src, _ = lerobot_src
    proc = run_cli(
        "convert_main", "lerobot", str(src), str(tmp_path / "data"), "--name", "lr_arm", timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.rindex("\n{\n") + 1 :])  # after tfds' own lines
    assert result["frames"] == 41 and result["disk_mb"] > 0 and result["seconds"] > 0
    args = tiny_args(tmp_path / "data", tmp_path / "runs", "lr", "--lora.enabled", "false")
    args += ["--data.dataset_name", "lr_arm", "--data.registry_files", f"[{result['registry_file']}]"]
    args += ["--training.max_steps", "3", "--data.cameras", "[primary, wrist]"]
    proc = run_cli("train_main", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "runs" / "lr" / "dataset_statistics.json").read_text())
    assert stats["lr_arm"]["num_transitions"] == 41


@pytest.mark.slow
def test_a_mixture_of_the_lerobot_dataset_and_an_rlds_dataset_trains(converted, small_synthetic, tmp_path):
    from test_trainer import tiny_args

    from vla_train.data.synthetic import DATASET_NAME

    data, result = converted
    synthetic_root, _ = small_synthetic
    root = tmp_path / "data"
    root.mkdir()
    (root / "lr_arm").symlink_to(Path(result["path"]).parent)
    (root / DATASET_NAME).symlink_to(synthetic_root / DATASET_NAME)
    registry = yaml.safe_load((data / "registry.yaml").read_text())
    registry["mixtures"] = {"arm_and_synthetic": [["lr_arm", 1.0], [DATASET_NAME, 1.0]]}
    (root / "registry.yaml").write_text(yaml.safe_dump(registry))
    args = tiny_args(root, tmp_path / "runs", "mix", "--lora.enabled", "false", "--training.max_steps", "3")
    args += ["--data.mixture", "arm_and_synthetic", "--data.registry_files", f"[{root / 'registry.yaml'}]"]
    proc = run_cli("train_main", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "runs" / "mix" / "dataset_statistics.json").read_text())
    assert sorted(stats) == sorted(["lr_arm", DATASET_NAME])


def test_rlds_to_lerobot_and_back_keeps_actions_bit_for_bit(converted, tmp_path):
    import pyarrow.parquet as pq

    from vla_train.cli import convert_main

    data, result = converted
    out = tmp_path / "lerobot"
    convert_main(
        ["rlds-to-lerobot", "lr_arm", str(out), "--data.data_root_dir", str(data),
         "--data.registry_files", f"[{result['registry_file']}]"]
    )  # fmt: skip
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == FPS and info["total_episodes"] == 6
    assert (
        info["total_frames"] == 41
        and info["total_tasks"] == 2
        and info["splits"] == {"train": "0:5", "val": "5:6"}
    )
    video = info["features"]["observation.images.primary"]
    assert video["dtype"] == "video" and video["shape"] == [*CAMERAS[FRONT], 3]
    assert video["info"]["video.codec"] == "h264" and video["info"]["video.pix_fmt"] == "yuv420p"
    assert info["features"]["action"]["names"] == ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
    rows = pq.read_table(out / "data" / "chunk-000" / "file-000.parquet")
    assert set(rows.column_names) == {"observation.state", "action", "timestamp", "frame_index",
                                      "episode_index", "index", "task_index"}  # fmt: skip
    assert rows["index"].to_pylist() == list(range(41))
    tasks = pq.read_table(out / "meta" / "tasks.parquet")
    assert sorted(tasks["task"].to_pylist()) == sorted(TASKS)
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]  # as pandas writes it
    stats = json.loads((out / "meta" / "stats.json").read_text())
    assert {"mean", "std", "min", "max", "q01", "q99", "count"} <= set(stats["action"])
    assert np.asarray(stats["observation.images.wrist"]["mean"]).shape == (3, 1, 1)

    # read back: the episodes were written in the order the pipeline reads the RLDS splits
    from vla_train.data.registry import add_registry_files
    from vla_train.data.rlds import EpisodeOrder, open_builder, read_episodes

    add_registry_files([result["registry_file"]])
    builder = open_builder(data, "lr_arm")
    source = [
        traj
        for split in ("train", "val")
        for traj in read_episodes(
            builder,
            split,
            EpisodeOrder(train=False, seed=0),
            dataset_name="lr_arm",
            cameras=("primary", "wrist"),
        ).as_numpy_iterator()
    ]
    back = episodes_by_index(convert(out, tmp_path / "back", "--image_format", "png")["path"])
    assert sorted(back) == list(range(len(source)))
    from vla_train.data.pipeline import decode_frame

    errors = []
    for k, traj in enumerate(source):
        ep = back[k]
        assert np.array_equal(ep["action"], traj["action"])  # bit for bit
        assert np.array_equal(ep["state"], traj["observation"]["proprio"])
        assert ep["instructions"] == [t.decode() for t in traj["task"]["language_instruction"]]
        assert len(ep["action"]) == len(traj["action"])
        for ours, role in (("image", "primary"), ("wrist_image", "wrist")):
            frames = np.stack(
                [
                    decode_frame(b, may_be_missing=False)[0].numpy()
                    for b in traj["observation"][f"image_{role}"]
                ]
            )
            errors.append(mean_error(ep[ours], frames))
            assert errors[-1] < H264_MEAN_ERROR, (k, role, errors[-1])
    print(f"h264 round trip: mean abs error {np.mean(errors):.2f} levels (max per episode {max(errors):.2f})")


def test_another_codebase_version_is_refused_with_what_to_do(tmp_path):
    from vla_train.data.errors import DatasetError

    write_lerobot_dataset(tmp_path / "old", lengths=(3,), version="v2.1")
    with pytest.raises(
        DatasetError, match=r"codebase_version 'v2.1' is not supported.*convert_dataset_v21_to_v30"
    ):
        convert(tmp_path / "old", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_a_missing_mapped_key_names_it_and_the_available_ones(lerobot_src, tmp_path):
    from vla_train.data.errors import DatasetError

    src, _ = lerobot_src
    with pytest.raises(DatasetError) as e:
        convert(src, tmp_path / "data", "--wrist_camera", "gripper", "--action_key", "actions")
    message = str(e.value)
    assert (
        f"--wrist_camera: no feature 'observation.images.gripper' in the dataset; it has ['{FRONT}', '{WRIST}']"
        in message
    )
    assert "--action_key: no feature 'actions'" in message and "'action'" in message
    assert (
        convert(src, tmp_path / "short", "--primary_camera", "wrist_cam", "--wrist_camera", "none")[
            "mapping"
        ]["image"]
        == WRIST
    )  # a camera by the part after observation.images.


def test_a_timestamp_the_video_does_not_have_is_an_error(lerobot_src, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vla_train.data.errors import DatasetError

    src = tmp_path / "src"
    shutil.copytree(lerobot_src[0], src)
    path = src / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(path)
    column = f"videos/{WRIST}/from_timestamp"
    shifted = [t + (0.03 if i == 2 else 0) for i, t in enumerate(table[column].to_pylist())]
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(shifted)), path)
    with pytest.raises(
        DatasetError, match=rf"episode 2, camera '{WRIST}': no frame within 0.0001s of timestamp"
    ):
        convert(src, tmp_path / "data", "--val_fraction", "0")


def test_config_errors_name_the_field(tmp_path):
    from vla_train.config import ConfigError, ConvertLerobotConfig, RldsToLerobotConfig
    from vla_train.config_cli import parse_config

    with pytest.raises(ConfigError, match=r"tolerance_s: must be in \(0, 1\) seconds"):
        parse_config(
            ConvertLerobotConfig, ["--src", str(tmp_path), "--dst", str(tmp_path / "d"), "--tolerance_s", "0"]
        )
    with pytest.raises(ConfigError, match=r"codec: unknown 'vp9'"):
        parse_config(
            RldsToLerobotConfig,
            ["--dst", str(tmp_path / "o"), "--codec", "vp9", "--data.data_root_dir", str(tmp_path)],
        )


def test_the_video_reader_seeks_and_goes_back_to_the_same_frames(lerobot_src, monkeypatch):
    """Episodes asked for out of order (as the val split is): the decoder seeks to the keyframe before
    an episode, or starts over, and gives the frames a sequential decode gives."""
    import av
    import pyarrow.parquet as pq

    from vla_train.data.convert import lerobot

    src, written = lerobot_src
    path = src / "videos" / FRONT / "chunk-000" / "file-000.mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        sequential = {
            round(float(f.pts * stream.time_base), 6): f.to_ndarray(format="rgb24")
            for f in container.decode(stream)
        }
    rows = pq.read_table(src / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    monkeypatch.setattr(lerobot, "SEEK_AHEAD_S", 0.2)  # seek over any gap longer than two frames
    reader = lerobot.VideoFrames(FRONT, 1e-4)
    for e in (4, 1, 5, 0, 3):
        start = rows[e][f"videos/{FRONT}/from_timestamp"]
        times = start + np.arange(len(written[e]["action"])) / FPS
        frames = reader.get(path, times, e)
        assert all(np.array_equal(f, sequential[round(t, 6)]) for f, t in zip(frames, times)), e
    reader.close()


def test_the_default_mapping_does_not_take_a_wrist_camera_listed_first_as_primary():
    from vla_train.config import ConvertLerobotConfig
    from vla_train.data.convert.lerobot import resolve_mapping

    camera = {"dtype": "video", "shape": [8, 8, 3]}
    features = {
        "observation.images.wrist": camera,
        "observation.images.top": camera,
        "action": {"dtype": "float32", "shape": [14]},
    }
    assert resolve_mapping(ConvertLerobotConfig(), features).keys == {
        "image": "observation.images.top",
        "wrist_image": "observation.images.wrist",
        "action": "action",
    }
