"""Config parsing and validation: presets parse, and every bad input fails fast naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vla_test_utils import REPO, run_cli
from vla_train.config import ConfigError, TrainConfig, parse_config


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_preset_parses(preset, tmp_path):
    cfg = parse_config(TrainConfig, ["--config_path", str(REPO / "configs" / preset)], validate=False)
    # Presets validate once their data exists; here only the model/lora/training sections must be valid.
    assert cfg.model.validate() == [] and cfg.lora.validate() == [] and cfg.training.validate() == []


def test_cli_overrides_apply(tmp_path):
    cfg = parse_config(
        TrainConfig,
        [
            "--config_path",
            str(REPO / "configs/demo.yaml"),
            "--training.max_steps",
            "20",
            "--logging.output_dir",
            str(tmp_path),
            "--data.data_root_dir",
            str(tmp_path / "d"),
        ],
    )
    assert cfg.training.max_steps == 20 and cfg.data.build_synthetic


def test_parsing_imports_nothing_heavy(tmp_path):
    code = (
        "import sys; from vla_train.config import TrainConfig, parse_config; "
        f"parse_config(TrainConfig, ['--config_path', 'configs/demo.yaml', '--logging.output_dir', r'{tmp_path}', "
        f"'--data.data_root_dir', r'{tmp_path}/d']); "
        "heavy = [m for m in ('torch', 'tensorflow', 'transformers') if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


BASE = ["--config_path", "configs/demo.yaml"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--training.max_stepz", "3"], ["--training.max_stepz", "did you mean --training.max_steps"]),
        (["--training.max_steps", "abc"], ["training.max_steps", "'abc'"]),
        (["--training.max_steps", "-5"], ["training.max_steps", "positive"]),
        (["--training.max_steps", "0"], ["training.max_steps", "positive"]),
        (
            ["--data.build_synthetic", "false", "--data.data_root_dir", "/nonexistent/vla"],
            ["data.data_root_dir", "/nonexistent/vla", "does not exist"],
        ),
        (["--logging.output_dir", "/etc/hostname/runs"], ["logging.output_dir", "not a writable directory"]),
        (["--logging.output_dir", "/proc/vla_runs"], ["logging.output_dir", "not a writable directory"]),
        (["--data.normalization", "minmax"], ["data.normalization", "bounds_q99"]),
        (["--model.image_size", "60"], ["model.image_size", "multiple of model.patch_size"]),
        (["--lora.rank", "0"], ["lora.rank"]),
    ],
)
def test_bad_input_fails_fast_naming_the_field(args, expected, tmp_path):
    overrides = ["--data.data_root_dir", str(tmp_path / "data")] if "--data.data_root_dir" not in args else []
    if "--logging.output_dir" not in args:
        overrides += ["--logging.output_dir", str(tmp_path / "runs")]
    proc = run_cli("train_main", *BASE, *overrides, *args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    for fragment in expected:
        assert fragment in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"training: .*max_stepz.*valid keys here: .*max_steps"):
        parse_config(TrainConfig, ["--config_path", str(bad)])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config_path: file 'nope.yaml' does not exist"):
        parse_config(TrainConfig, ["--config_path", "nope.yaml"])


def test_all_problems_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config(
            TrainConfig,
            [
                "--training.batch_size",
                "0",
                "--lora.dropout",
                "1.5",
                "--logging.output_dir",
                str(tmp_path),
                "--data.data_root_dir",
                str(tmp_path),
            ],
        )
    assert "training.batch_size" in str(e.value) and "lora.dropout" in str(e.value)


def test_missing_dataset_names_what_was_found(tmp_path):
    (tmp_path / "other_ds").mkdir()
    with pytest.raises(ConfigError, match=r"data.dataset_name: no dataset 'vla_synthetic'.*other_ds"):
        parse_config(
            TrainConfig, ["--data.data_root_dir", str(tmp_path), "--logging.output_dir", str(tmp_path)]
        )


def test_export_requires_a_run_dir(tmp_path):
    proc = run_cli("export_main", "--run_dir", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "not a vla-train run directory" in proc.stderr
