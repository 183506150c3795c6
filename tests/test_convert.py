"""vla-convert raw (npz and hdf5 episode folders -> RLDS through our tfds builder, then training through the
CLI; every bad-input problem reported at once), PNG frames and JPEGs with trailing bytes, a dataset whose
every frame is bad, instructions on any step, and OpenVLA's float32 normalization."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from vla_test_utils import run_cli

TASKS = ["pick up the red block", "open the drawer"]


def write_episodes(folder: Path, n: int = 6, steps: int = 5, fmt: str = "npz", seed: int = 0, wrist=True):
    """n learnable-enough episodes: two cameras, 8-D state, 7-D actions, two instructions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for e in range(n):
        ep = {
            "image": rng.integers(0, 256, (steps, 24, 32, 3), dtype=np.uint8),
            "state": rng.normal(size=(steps, 8)).astype(np.float32),
            "action": np.concatenate(
                [rng.uniform(-1, 1, (steps, 6)), rng.integers(0, 2, (steps, 1))], axis=1
            ).astype(np.float32),
        }
        if wrist:
            ep["wrist_image"] = rng.integers(0, 256, (steps, 16, 16, 3), dtype=np.uint8)
        text = TASKS[e % 2]
        if fmt == "npz":
            np.savez(folder / f"episode_{e:03d}.npz", instruction=np.array(text), control_frequency=10, **ep)
        else:
            import h5py

            with h5py.File(folder / f"episode_{e:03d}.hdf5", "w") as f:
                for k, v in ep.items():
                    f.create_dataset(k, data=v)
                f.attrs["instruction"] = text
                f.attrs["control_frequency"] = 10.0
    return folder


def read_back(path: Path, split: str) -> list[dict]:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(path))
    return list(tfds.as_numpy(builder.as_dataset(split=split)))


def convert(src: Path, dst: Path, *args: str):
    proc = run_cli("convert_main", "raw", str(src), str(dst), *args, timeout=300)
    return proc


@pytest.mark.parametrize("fmt", ["npz", "hdf5"])
def test_raw_episodes_convert_and_train_through_the_cli(fmt, tmp_path):
    from test_trainer import tiny_args

    src = write_episodes(tmp_path / "episodes", fmt=fmt)
    proc = convert(src, tmp_path / "data", "--name", "my_robot", "--image_format", "png")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.rindex("\n{\n") + 1 :])  # after tfds' own lines
    assert result["episodes"] == {"train": 5, "val": 1} and result["frames"] == 30
    entry = yaml.safe_load((tmp_path / "data" / "registry.yaml").read_text())["datasets"]["my_robot"]
    assert entry["image_obs_keys"] == {"primary": "image", "secondary": None, "wrist": "wrist_image"}
    assert entry["action_encoding"] == "EEF_POS" and entry["control_frequency"] == 10.0

    # PNG frames are lossless: what was converted reads back bit for bit, actions and instructions too
    episodes = {
        Path(e["episode_metadata"]["file_path"].decode()).name: e
        for e in read_back(Path(result["path"]), "train")
    }
    for name, ep in episodes.items():
        original = np.load(src / name) if fmt == "npz" else None
        if original is None:
            import h5py

            with h5py.File(src / name) as f:
                original = {k: f[k][()] for k in f}
        steps = list(ep["steps"])
        assert np.array_equal(np.stack([s["observation"]["image"] for s in steps]), original["image"])
        wrist = np.stack([s["observation"]["wrist_image"] for s in steps])
        assert np.array_equal(wrist, original["wrist_image"])
        assert np.array_equal(np.stack([s["action"] for s in steps]), original["action"])
        assert steps[0]["language_instruction"].decode() in TASKS

    if fmt == "npz":  # vla-data inspect on the converted dataset: its numbers and its pictures
        from PIL import Image

        proc = run_cli(
            "data_main", "inspect", "my_robot", "--data.data_root_dir", str(tmp_path / "data"),
            "--data.registry_files", f"[{result['registry_file']}]", "--out", str(tmp_path / "inspect"),
            timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((tmp_path / "inspect" / "summary.json").read_text())
        assert summary["splits"] == {"train": {"episodes": 5}, "val": {"episodes": 1}}
        assert summary["num_transitions"] == 30 and sorted(summary["instructions"]) == sorted(TASKS)
        assert (
            summary["cameras"] == ["primary", "wrist"] and len(summary["statistics"]["action"]["mean"]) == 7
        )
        for name, min_size in (("contact_sheet.png", (400, 300)), ("actions.png", (400, 500))):
            with Image.open(tmp_path / "inspect" / name) as im:
                pixels = np.asarray(im.convert("L"), np.float32)
                assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], (name, im.size)
                assert pixels.std() > 10, name  # not blank

    args = tiny_args(tmp_path / "data", tmp_path / "runs", "own", "--lora.enabled", "false")
    args += ["--data.dataset_name", "my_robot", "--data.registry_files", f"[{result['registry_file']}]"]
    args += ["--training.max_steps", "3", "--data.cameras", "[primary, wrist]"]
    proc = run_cli("train_main", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "own" / "dataset_statistics.json").is_file()


def test_every_problem_of_every_file_is_reported_at_once(tmp_path):
    src = write_episodes(tmp_path / "episodes", n=2)
    rng = np.random.default_rng(1)
    good = dict(np.load(src / "episode_000.npz"))
    bad = {
        "no_action": {k: v for k, v in good.items() if k != "action"},
        "gray_image": {**good, "image": good["image"][..., 0]},
        "ragged": {**good, "state": good["state"][:3]},
        "nan_action": {
            **good,
            "action": np.where(np.arange(7) == 2, np.nan, good["action"]).astype(np.float32),
        },
        "no_instruction": {k: v for k, v in good.items() if k != "instruction"},
        "wide_action": {**good, "action": rng.normal(size=(5, 8)).astype(np.float32)},
    }
    for name, arrays in bad.items():
        np.savez(src / f"{name}.npz", **arrays)
    (src / "broken.npz").write_bytes(b"not a zip file")
    proc = convert(src, tmp_path / "data")
    assert proc.returncode == 2, proc.stdout
    err = proc.stderr
    expected = {
        "broken.npz": "cannot be read",
        "no_action.npz": "key 'action' is missing",
        "gray_image.npz": "key 'image' must be uint8 [T, H, W, 3]",
        "ragged.npz": "ragged lengths",
        "nan_action.npz": "key 'action' has 5 NaN/inf values (first at step 0)",
        "no_instruction.npz": "key 'instruction' is missing",
        "wide_action.npz": "key 'action' is per-step shape [8], but episode_000.npz has [7]",
    }
    for file, problem in expected.items():
        line = next((ln for ln in err.splitlines() if file in ln), "")
        assert problem in line, (file, problem, err)
    assert f"{len(expected)} problem(s)" in err and not (tmp_path / "data" / "data").exists()


def test_image_file_check_accepts_png_and_trailing_bytes_and_catches_truncation():
    import tensorflow as tf
    from PIL import Image

    from vla_train.data.pipeline import decode_frame, image_file_ok

    frame = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)

    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format=fmt)
        return buf.getvalue()

    jpeg, png = encoded("JPEG"), encoded("PNG")
    files = [
        jpeg,
        jpeg + b"\0camera trailer",
        png,
        png + b"\0\0",
        jpeg[: len(jpeg) // 2],
        png[:-20],
        b"",
        b"GIF89a",
    ]
    ok = image_file_ok(tf.constant(files)).numpy().tolist()
    assert ok == [True, True, True, True, False, False, False, False]
    decoded, _ = decode_frame(tf.constant(png), may_be_missing=False)
    assert np.array_equal(decoded.numpy(), frame)  # PNG is lossless
    same, _ = decode_frame(tf.constant(jpeg), may_be_missing=False)
    assert np.array_equal(same.numpy(), tf.io.decode_jpeg(jpeg, channels=3).numpy())


def test_a_dataset_whose_every_frame_is_bad_fails_instead_of_spinning():
    import tensorflow as tf

    from vla_train.data.pipeline import FrameCheck

    traj = {
        "action": tf.zeros([3, 7]),
        "observation": {"image_primary": tf.constant([b"\xff\xd8 truncated"] * 3)},
        "dataset_name": tf.constant(["robot_x"] * 3),
        "episode_id": tf.constant(["ep0"] * 3),
    }
    check = FrameCheck(["primary"], "skip", episodes_per_pass=4)
    ds = tf.data.Dataset.from_tensors(traj).repeat().map(check).unbatch()
    with pytest.raises(tf.errors.InvalidArgumentError, match="every frame of 4 episodes has a corrupt image"):
        next(iter(ds))
    assert check.counts()["corrupt_image"] >= 9


def test_an_episode_is_labeled_when_any_step_has_an_instruction():
    import tensorflow as tf

    from vla_train.data.transforms import has_instruction

    def traj(texts):
        return {"task": {"language_instruction": tf.constant(texts, tf.string)}}

    assert bool(has_instruction(traj(["", "", "open the drawer"])))
    assert not bool(has_instruction(traj(["", ""])))
    assert not bool(has_instruction(traj(np.array([], dtype=object))))


def test_normalized_actions_equal_openvlas_float32_graph_bit_for_bit():
    """OpenVLA: float64 statistics from JSON, float32 frames, `clip(2 * (x - low) / (high - low + 1e-8) - 1)`
    in a tf graph; a float64 pass cast at the end differs in the last bits on most frames."""
    import tensorflow as tf

    from vla_train.data.normalize import normalize

    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.3, (4000, 7)).astype(np.float32)
    stats = {
        "q01": np.quantile(x, 0.01, axis=0).tolist(),
        "q99": np.quantile(x, 0.99, axis=0).tolist(),
        "min": x.min(0).tolist(),
        "max": x.max(0).tolist(),
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
    }
    mask = [True] * 6 + [False]
    low, high = np.array(stats["q01"]), np.array(stats["q99"])  # float64, as OpenVLA's tree_map(np.array)
    t = tf.constant(x)
    reference = tf.where(mask, tf.clip_by_value(2 * (t - low) / (high - low + 1e-8) - 1, -1, 1), t).numpy()
    ours = normalize(x, stats, "bounds_q99", mask)
    assert ours.dtype == np.float32 and np.array_equal(ours, reference)
    mean, std = np.array(stats["mean"]), np.array(stats["std"])
    normal = tf.where(mask, (t - mean) / (std + 1e-8), t).numpy()
    assert np.array_equal(normalize(x, stats, "normal", mask), normal)


def test_statistics_cache_key_follows_the_mask_and_the_standardization_helpers():
    from vla_train.data.normalize import cache_key
    from vla_train.data.registry import get_dataset_spec
    from vla_train.data.rlds import _sources

    info = {"name": "x", "version": "1.0.0"}
    assert cache_key(info, ["state"], "identity:abc", [True] * 6 + [False]) != cache_key(
        info, ["state"], "identity:abc", [True] * 7
    )
    from vla_train.data.registry import resolve_standardize_fn

    sources = "\n".join(_sources(resolve_standardize_fn(get_dataset_spec("bridge_orig").standardize_fn)))
    assert "def _out(" in sources  # a helper the function calls is part of the fingerprint


def test_a_training_run_refuses_normal_normalization():
    from vla_train.config import ConfigError, TrainConfig
    from vla_train.config_cli import parse_config

    with pytest.raises(ConfigError, match=r"data.normalization: 'normal' \(mean/std\) does not fit"):
        parse_config(TrainConfig, ["--config_path", "configs/demo.yaml", "--data.normalization", "normal"])


def test_an_unknown_standardize_fn_is_a_config_error_listing_the_valid_names(tmp_path):
    from vla_train.config import ConfigError, TrainConfig
    from vla_train.config_cli import parse_config

    registry = tmp_path / "registry.yaml"
    registry.write_text(
        "datasets:\n  my_robot:\n    image_obs_keys: {primary: image, secondary: null, wrist: null}\n"
        "    state_obs_keys: [state]\n    action_encoding: EEF_POS\n    standardize_fn: identiy\n"
    )
    (tmp_path / "data" / "my_robot").mkdir(parents=True)
    args = ["--config_path", "configs/finetune_own_data.yaml", "--data.data_root_dir", str(tmp_path / "data")]
    args += ["--data.registry_files", f"[{registry}]", "--logging.output_dir", str(tmp_path / "runs")]
    with pytest.raises(ConfigError) as e:
        parse_config(TrainConfig, args)
    message = str(e.value)
    assert (
        "data.dataset_name: dataset 'my_robot'" in message and "unknown standardize_fn 'identiy'" in message
    )
    assert "close matches: ['identity']" in message and "bridge_orig" in message  # the valid names


def test_a_wrong_registry_key_fails_before_the_model_is_built(tmp_path):
    """A wrong image key in the entry of a dataset read as stored: the trainer stops while computing the
    statistics (before any model is built), naming the key and the stored ones."""
    from test_trainer import tiny_args

    src = write_episodes(tmp_path / "episodes", n=3, wrist=False)
    proc = convert(src, tmp_path / "data", "--name", "my_robot")
    assert proc.returncode == 0, proc.stderr[-3000:]
    registry = tmp_path / "data" / "registry.yaml"
    registry.write_text(registry.read_text().replace("primary: image", "primary: rgb"))
    args = tiny_args(tmp_path / "data", tmp_path / "runs", "wrong", "--data.dataset_name", "my_robot")
    proc = run_cli("train_main", *args, "--data.registry_files", f"[{registry}]", timeout=300)
    assert proc.returncode == 2
    assert "names observation key(s) ['rgb']" in proc.stderr and "'image'" in proc.stderr, proc.stderr[-2000:]
    assert not list((tmp_path / "runs" / "wrong").glob("base_model/*.safetensors"))
