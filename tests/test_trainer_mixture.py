"""The trainer and the export on a mixture of datasets, and with action chunking: the StreamSpec carries
every data field, statistics are per dataset (dataset_statistics.json and the model's norm_stats, one
entry per dataset, as OpenVLA's), metrics are reported per dataset, the export samples frames from the
mixture and unnormalizes each prediction with its own dataset's statistics, vla-stats covers a mixture, and
chunked actions are tokenized in full with the steps past an episode's end left out of the loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_model import TINY
from test_trainer import run_in_process, tiny_args

from vla_test_utils import synthetic_copies
from vla_train.data.synthetic import DATASET_NAME
from vla_train.training.logging import read_metrics

SECOND = "syn_tripled"
MIXTURE = "syn_mix"


def tripled_motion(steps):
    """Standardization of the second dataset: the synthetic data with its six motion dimensions tripled,
    so that the two datasets of the mixture have different statistics."""
    import tensorflow as tf

    from vla_train.data.standardize import passthrough

    out = passthrough(steps)
    a = out["action"]
    return {**out, "action": tf.concat([3.0 * a[..., :6], a[..., 6:]], axis=-1)}


@pytest.fixture(scope="module")
def mixture_data(small_synthetic, tmp_path_factory):
    """(data root, registry YAML): the synthetic dataset under its own name and as SECOND (motion tripled
    by its standardization), and the mixture MIXTURE of both at equal weights."""
    from vla_train.data.registry import reset_default_registry

    src, _ = small_synthetic
    root = tmp_path_factory.mktemp("mixdata")
    registry = synthetic_copies(
        src,
        root,
        [DATASET_NAME, SECOND],
        {SECOND: f"{__name__}:tripled_motion"},
        {MIXTURE: [(DATASET_NAME, 1.0), (SECOND, 1.0)]},
    )
    yield root, registry
    reset_default_registry()


def mixture_args(root, registry, out, run_id, *extra):
    return tiny_args(
        root,
        out,
        run_id,
        "--data.mixture",
        MIXTURE,
        "--data.registry_files",
        f"[{registry}]",
        "--training.num_val_frames",
        "16",
        *extra,
    )


@pytest.fixture(scope="module")
def mixture_run(mixture_data, tmp_path_factory):
    """A 3-step LoRA run on the mixture (data root, run dir)."""
    root, registry = mixture_data
    out = tmp_path_factory.mktemp("mixruns")
    run_in_process(mixture_args(root, registry, out, "mix", "--training.max_steps", "3", "--lora.rank", "4"))
    return root, out / "mix"


def test_stream_spec_holds_the_data_config_and_the_resolved_datasets(mixture_data, tmp_path):
    """One data spec: a run's streams hold its DataConfig itself (every field, as configured), the
    datasets resolved once from data.mixture / data.dataset_name, and the run-time fields; the
    train-only transforms are off in the validation stream."""
    from vla_train.config import TrainConfig
    from vla_train.config_cli import parse_config
    from vla_train.data.mixture import run_datasets
    from vla_train.runs import stream_spec

    root, registry = mixture_data
    data = {
        "mixture": MIXTURE,
        "registry_files": f"[{registry}]",
        "balance_weights": "true",
        "subsample_length": "4",
        "ram_budget_gb": "1.5",
        "image_augmentation": "true",
    }
    args = ["--data.data_root_dir", str(root), "--logging.output_dir", str(tmp_path)]
    for k, v in data.items():
        args += [f"--data.{k}", v]
    cfg = parse_config(TrainConfig, args)
    datasets = run_datasets(cfg.data)
    assert datasets == ((DATASET_NAME, 1.0), (SECOND, 1.0))
    train = stream_spec(cfg, datasets, 32, train=True, batch_size=4, seed=3, num_shards=2, shard_index=1)
    assert train.data is cfg.data and train.datasets == datasets
    assert (train.batch_size, train.seed, train.num_shards, train.shard_index) == (4, 3, 2, 1)
    assert train.subsample_length == 4 and train.augment and train.data.ram_budget_gb == 1.5
    val = stream_spec(cfg, datasets, 32, train=False)
    assert val.subsample_length == 0 and not val.augment  # train-only transforms
    assert (val.batch_size, val.seed) == (cfg.training.batch_size, cfg.training.seed)
    single = parse_config(TrainConfig, args[:4])
    assert run_datasets(single.data) == ((DATASET_NAME, 1.0),)


def test_mixture_run_has_per_dataset_statistics_and_metrics(mixture_run):
    from vla_train.data.rlds import get_statistics

    root, run_dir = mixture_run
    stats = json.loads((run_dir / "dataset_statistics.json").read_text())
    assert sorted(stats) == sorted([DATASET_NAME, SECOND])
    for name in (DATASET_NAME, SECOND):
        want = json.loads(json.dumps(get_statistics(str(root), name)))
        assert stats[name] == {**want, "normalization": "bounds_q99"}
    first, second = stats[DATASET_NAME]["action"], stats[SECOND]["action"]
    np.testing.assert_allclose(second["q99"][:6], 3 * np.asarray(first["q99"][:6]), rtol=1e-5)
    base = json.loads((run_dir / "base_model" / "config.json").read_text())
    assert base["norm_stats"] == stats

    metrics = read_metrics(run_dir)
    train_keys = set().union(*(m for m in metrics if "train/loss" in m))
    val = [m for m in metrics if "val/loss" in m][-1]
    for name in (DATASET_NAME, SECOND):
        assert {f"train/{name}/loss", f"train/{name}/action_token_accuracy"} <= train_keys
        assert {f"val/{name}/loss", f"val/{name}/action_l1"} <= set(val)
    assert val["val/num_frames"] == 16 and val["val/action_l1_physical"] > 0


def test_mixture_export_unnormalizes_with_each_frames_dataset(mixture_run, capsys):
    from vla_train.config import ExportConfig
    from vla_train.data.normalize import unnormalize
    from vla_train.export import export_run, load_run_config, sample_frames
    from vla_train.models.policy import VLAPolicy

    _, run_dir = mixture_run
    stats = json.loads((run_dir / "dataset_statistics.json").read_text())
    out = export_run(ExportConfig(run_dir=str(run_dir), predict_samples=4))
    printed = capsys.readouterr().out
    assert printed.count("predicted action:") == 4 and f"[{SECOND}]" in printed
    assert json.loads((out / "config.json").read_text())["norm_stats"] == stats
    assert json.loads((out / "dataset_statistics.json").read_text()) == stats

    frames = sample_frames(load_run_config(run_dir), stats, TINY.image_size, 8)
    names = frames["dataset_name"]
    assert set(names) == {DATASET_NAME, SECOND} and len(names) == 8
    policy = VLAPolicy.from_dir(out)
    images, instructions = frames["image"], frames["instruction"]
    normalized = policy.processor.action_tokenizer.decode(policy.predict_tokens(images, instructions).numpy())
    by_key = {}
    for name in (DATASET_NAME, SECOND):
        by_key[name] = policy.predict_action_batch(images, instructions, unnorm_key=name)
        np.testing.assert_allclose(by_key[name], unnormalize(normalized, stats[name]["action"]), rtol=1e-6)
    assert not np.allclose(by_key[DATASET_NAME], by_key[SECOND])
    per_frame = policy.predict_action_batch(images, instructions, unnorm_key=names)
    for i, name in enumerate(names):
        np.testing.assert_array_equal(per_frame[i], by_key[name][i])
    one = policy.predict_action(images[0], instructions[0], unnorm_key=names[0])
    np.testing.assert_allclose(one, per_frame[0], atol=1e-6)
    with pytest.raises(ValueError, match="unnorm_key"):
        policy.predict_action(images[0], instructions[0])
    with pytest.raises(ValueError, match="one per frame"):
        policy.predict_action_batch(images, instructions, unnorm_key=names[:3])


def test_vla_stats_on_a_mixture(mixture_data, tmp_path, capsys):
    from vla_train.cli import stats_main
    from vla_train.data.rlds import get_statistics

    root, registry = mixture_data
    cache = tmp_path / "stats"
    stats_main(
        [
            "--data.data_root_dir",
            str(root),
            "--data.mixture",
            MIXTURE,
            "--data.registry_files",
            f"[{registry}]",
        ]
        + ["--data.stats_cache_dir", str(cache)]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"mixture '{MIXTURE}': 2 dataset")
    per_dataset = {line.split(":")[0]: line for line in lines[1:]}
    assert sorted(per_dataset) == sorted([DATASET_NAME, SECOND])
    for name, line in per_dataset.items():
        stats = get_statistics(str(root), name, str(cache))  # now from the cache vla-stats wrote
        assert f"{stats['num_transitions']} transitions" in line
        assert f"{stats['num_trajectories']} trajectories" in line
    assert len(list(cache.rglob("*.json"))) == 2


def test_chunked_actions_train_with_padded_steps_out_of_the_loss(mixture_data, tmp_path, capsys):
    """future_action_window_size 2: every frame supervises its 3 x 7 chunk tokens + EOS, except the
    steps past the episode end; training, validation and the export run."""
    from vla_train.config import ExportConfig, TrainConfig
    from vla_train.config_cli import parse_config
    from vla_train.data.mixture import run_datasets
    from vla_train.data.stream import FrameStream
    from vla_train.export import export_run
    from vla_train.models.load import load_model_dir
    from vla_train.models.prompting import IGNORE_INDEX
    from vla_train.runs import model_inputs, stream_spec

    root, _ = mixture_data
    chunk = ["--data.future_action_window_size", "2", "--lora.rank", "4"]
    args = tiny_args(root, tmp_path, "chunk", "--training.max_steps", "2", *chunk)
    result = run_in_process(args)
    assert np.isfinite(result["val/loss"]) and 0 <= result["val/generated_action_token_accuracy"] <= 1

    run_dir = tmp_path / "chunk"
    stats = json.loads((run_dir / "dataset_statistics.json").read_text())
    _, processor = load_model_dir(run_dir / "base_model")
    cfg = parse_config(TrainConfig, args)
    spec = stream_spec(cfg, run_datasets(cfg.data), TINY.image_size, train=True, batch_size=16)
    batch = next(iter(FrameStream(spec, stats)))
    pad = batch["action_pad_mask"]
    assert batch["action"].shape == (16, 3, 7) and (~pad).any()  # 4-step episodes: chunks run past the end
    inputs = model_inputs(processor, batch)
    labels = inputs["labels_BL"]
    tokens = processor.action_tokenizer.encode(batch["action"])
    for b in range(16):
        supervised = labels[b][labels[b] != IGNORE_INDEX].tolist()
        kept = tokens[b][pad[b]].reshape(-1).tolist()
        assert supervised == kept + [processor.tokenizer.eos_token_id]
        # all 3 x 7 tokens are in the input, padded steps included
        row = inputs["input_ids_BL"][b][inputs["attention_mask_BL"][b].bool()].tolist()
        assert row[-22:-1] == tokens[b].reshape(-1).tolist()

    export_run(ExportConfig(run_dir=str(run_dir), predict_samples=1))
    assert "predicted action:" in capsys.readouterr().out
