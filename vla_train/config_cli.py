"""Parsing configs: `--config_path FILE` (YAML, draccus `!include` allowed) plus dotted CLI overrides into
a config dataclass of config.py, with every problem named by its field path.

A config's `model.preset` (in the file or on the command line) names a model preset: its `model:` block
is the base under the config's own model keys, so each model shape is written once
(configs/model_<name>.yaml) and recipes name it.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any

import draccus
from draccus.cfgparsing import load_config

from vla_train.config import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _field_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """Map every dotted field path of a dataclass tree to its field."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out[path] = f
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_field_paths(hints[f.name], path + "."))
    return out


def _check_cli_keys(cls: type, args: list[str]) -> None:
    known = _field_paths(cls)
    for arg in args:
        if not arg.startswith("--"):
            continue
        key = arg[2:].split("=", 1)[0]
        if key in ("config_path", "help", "h"):
            continue
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key '--{key}'{hint}")


def _cli_value(args: list[str], key: str) -> str | None:
    """The value of the last `--key value` / `--key=value` in args, or None."""
    value = None
    for i, arg in enumerate(args):
        name, eq, rest = arg.partition("=")
        if name == f"--{key}":
            value = rest if eq else (args[i + 1] if i + 1 < len(args) else "")
    return value


def model_presets() -> list[str]:
    """The names of the model presets in configs/ (configs/model_<name>.yaml)."""
    return sorted(p.stem[len("model_") :] for p in CONFIG_DIR.glob("model_*.yaml"))


def model_preset_block(preset: str, relative_to: Path | None = None) -> dict[str, Any]:
    """The `model:` block of a preset: a name from model_presets(), or a YAML file (relative paths are
    taken from `relative_to`, the config file's directory, then the working directory)."""
    if preset.endswith((".yaml", ".yml")):
        candidates = [Path(preset)] if relative_to is None else [relative_to / preset, Path(preset)]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ConfigError(f"model.preset: file '{preset}' does not exist")
    else:
        path = CONFIG_DIR / f"model_{preset}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"model.preset: unknown preset '{preset}'; use one of {', '.join(model_presets())} "
                f"(files {CONFIG_DIR}/model_<name>.yaml) or the path of a YAML file with a model: block"
            )
    with open(path) as f:
        block = (load_config(f, file=path) or {}).get("model")
    if not isinstance(block, dict) or block.get("preset"):
        raise ConfigError(
            f"model.preset: {path} must hold a `model:` mapping of model fields (and name no preset itself)"
        )
    return block


def _with_model_preset(config_path: str | None, args: list[str]) -> dict[str, Any] | None:
    """The config file's contents with its model preset's block under its own model keys, or None when
    no preset is named (the file is then parsed as it is)."""
    file_args: dict[str, Any] = {}
    if config_path:
        with open(config_path) as f:
            file_args = load_config(f, file=config_path) or {}
    model = file_args.get("model") or {}
    preset = _cli_value(args, "model.preset")
    preset = model.get("preset", "") if preset is None else preset
    if not preset:
        return None
    relative_to = Path(config_path).parent if config_path else None
    return {**file_args, "model": {**model_preset_block(preset, relative_to), **model, "preset": preset}}


def _draccus_parse(cls: type, args: list[str]):
    """draccus.parse, with the model preset resolved into the config file first."""
    config_path = _cli_value(args, "config_path")
    merged = _with_model_preset(config_path, args)
    if merged is None:
        return draccus.parse(cls, args=args)
    rest = [a for i, a in enumerate(args) if not _is_config_path_arg(args, i)]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(draccus.cfgparsing.save_config(merged))
        f.flush()
        return draccus.parse(cls, config_path=f.name, args=rest)


def _is_config_path_arg(args: list[str], i: int) -> bool:
    """Whether args[i] is `--config_path`, `--config_path=...` or the value after `--config_path`."""
    if args[i].partition("=")[0] == "--config_path":
        return True
    return i > 0 and args[i - 1] == "--config_path"


def parse_config(cls: type, args: list[str] | None = None, validate: bool = True):
    """Parse `--config_path FILE` plus dotted overrides into `cls` and validate it.

    Every problem becomes a ConfigError naming the field (draccus' own errors are translated).
    """
    args = list(sys.argv[1:] if args is None else args)
    _check_cli_keys(cls, args)
    path = _cli_value(args, "config_path")
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config_path: file '{path}' does not exist")
    try:
        cfg = _draccus_parse(cls, args)
    except draccus.utils.DecodingError as e:
        where = ".".join(str(p) for p in e.key_path) or "<root>"
        msg = str(e.message) if hasattr(e, "message") else str(e)
        if "are not valid for" in msg:
            stem = "" if where == "<root>" else where + "."
            options = [k[len(stem) :] for k in _field_paths(cls) if k.startswith(stem)]
            options = sorted(k for k in options if "." not in k)
            raise ConfigError(f"{where}: {msg}; valid keys here: {', '.join(options)}") from None
        raise ConfigError(f"{where}: {msg}") from None
    if validate:
        cfg.validate()
    return cfg


def to_yaml(cfg: Any) -> str:
    return draccus.dump(cfg)
