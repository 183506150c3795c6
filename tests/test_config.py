"""Config parsing and validation: presets parse, and every bad input fails fast naming the field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from vla_test_utils import REPO, run_cli
from vla_train.config import ConfigError, TrainConfig
from vla_train.config_cli import parse_config, to_yaml

PRESETS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
# the world sizes each preset is launched at (the global batch must split into ranks x micro-batches)
WORLD_SIZES = {"finetune_full_fsdp.yaml": 8, "finetune_lora.yaml": 8, "pretrain_oxe.yaml": 64}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_validates_through_every_section(preset, tmp_path, monkeypatch):
    """Each preset, given its data (empty dataset directories: validation only looks for them) and an
    output directory, passes every section's validation and the launch checks at its world size."""
    from vla_train.data.registry import load_registry

    path = str(REPO / "configs" / preset)
    raw = parse_config(TrainConfig, ["--config_path", path], validate=False)
    registry = load_registry(raw.data.registry_files)
    names = (
        [d for d, _ in registry.mixture(raw.data.mixture)] if raw.data.mixture else [raw.data.dataset_name]
    )
    for name in names:
        (tmp_path / "data" / name).mkdir(parents=True)
    monkeypatch.setenv("WORLD_SIZE", str(WORLD_SIZES.get(preset, 1)))
    args = ["--config_path", path, "--data.data_root_dir", str(tmp_path / "data")]
    cfg = parse_config(TrainConfig, [*args, "--logging.output_dir", str(tmp_path / "runs")])  # validates
    assert cfg.data.validate() == [] and cfg.distributed.validate() == [] and cfg.logging.validate() == []


def test_recipes_name_their_model_preset_instead_of_copying_it():
    """Each model shape is written once (configs/model_<name>.yaml); recipes name it, and what they name
    is what they get."""
    from vla_train.config_cli import model_presets

    assert model_presets() == ["minivla", "openvla_7b", "small", "tiny"]
    recipes = [p for p in PRESETS if not p.startswith("model_")]
    for recipe in recipes:
        assert "llm_hidden_size" not in (REPO / "configs" / recipe).read_text(), recipe
    seven_b = parse_config(TrainConfig, ["--config_path", "configs/model_openvla_7b.yaml"], validate=False)
    for recipe in (
        "finetune_lora.yaml",
        "finetune_qlora_24gb.yaml",
        "finetune_full_fsdp.yaml",
        "pretrain_oxe.yaml",
    ):
        cfg = parse_config(TrainConfig, ["--config_path", f"configs/{recipe}"], validate=False)
        assert cfg.model.preset == "openvla_7b"
        assert dataclasses.replace(cfg.model, preset="") == seven_b.model, recipe


def test_a_model_preset_composes_with_a_recipe_and_the_command_line(tmp_path):
    """--model.preset swaps the recipe's preset; model keys set by the recipe or the CLI override the
    preset's; a preset may be a YAML file; an unknown one names the presets there are."""
    tiny = parse_config(TrainConfig, ["--config_path", "configs/model_tiny.yaml"], validate=False).model
    lora = ["--config_path", "configs/finetune_lora.yaml"]
    swapped = parse_config(TrainConfig, [*lora, "--model.preset", "tiny"], validate=False)
    assert dataclasses.replace(swapped.model, preset="") == tiny and swapped.lora.rank == 32
    one_key = parse_config(
        TrainConfig, [*lora, "--model.preset=tiny", "--model.image_size", "32"], validate=False
    )
    assert one_key.model.image_size == 32 and one_key.model.llm_hidden_size == tiny.llm_hidden_size
    demo = parse_config(TrainConfig, ["--config_path", "configs/demo.yaml"], validate=False)
    assert demo.model.preset == "tiny" and (demo.model.image_size, demo.model.patch_size) == (48, 16)
    assert demo.model.llm_num_layers == tiny.llm_num_layers
    (tmp_path / "mine.yaml").write_text("model:\n  llm_num_layers: 1\n")
    (tmp_path / "recipe.yaml").write_text("model:\n  preset: mine.yaml\n  llm_hidden_size: 32\n")
    mine = parse_config(TrainConfig, ["--config_path", str(tmp_path / "recipe.yaml")], validate=False)
    assert (mine.model.llm_num_layers, mine.model.llm_hidden_size) == (1, 32)
    # the run's config.yaml (every field written out) parses back to the same config
    (tmp_path / "dumped.yaml").write_text(to_yaml(one_key))
    assert (
        parse_config(TrainConfig, ["--config_path", str(tmp_path / "dumped.yaml")], validate=False) == one_key
    )
    with pytest.raises(
        ConfigError, match=r"model.preset: unknown preset 'huge'; use one of minivla, openvla_7b, small, tiny"
    ):
        parse_config(TrainConfig, [*lora, "--model.preset", "huge"], validate=False)


def test_validation_has_no_side_effects(tmp_path):
    """Validating creates no directory and leaves the process-wide registry as it was."""
    from vla_train.data.registry import default_registry

    (tmp_path / "data").mkdir()
    registry = tmp_path / "mine.yaml"
    registry.write_text(
        "datasets:\n  my_robot:\n    image_obs_keys: {primary: image, secondary: null, wrist: null}\n"
        "    state_obs_keys: [state]\n    state_encoding: POS_EULER\n    action_encoding: EEF_POS\n"
        "    standardize_fn: identity\n"
    )
    (tmp_path / "data" / "my_robot").mkdir()
    before = default_registry()
    args = ["--data.data_root_dir", str(tmp_path / "data"), "--data.dataset_name", "my_robot"]
    args += ["--data.registry_files", f"[{registry}]", "--logging.output_dir", str(tmp_path / "new" / "runs")]
    cfg = parse_config(TrainConfig, args)
    assert cfg.data.dataset_name == "my_robot"
    assert not (tmp_path / "new").exists()
    assert default_registry() is before and "my_robot" not in default_registry().datasets
    with_synthetic = ["--data.build_synthetic", "true", "--data.data_root_dir", str(tmp_path / "later")]
    parse_config(TrainConfig, [*with_synthetic, "--logging.output_dir", str(tmp_path / "runs")])
    assert not (tmp_path / "later").exists() and not (tmp_path / "runs").exists()


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
        "import sys; from vla_train.config import TrainConfig; from vla_train.config_cli import parse_config; "
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
