"""The dataset registry: per-dataset reading specs and named mixtures, loaded from YAML, validated early.

The built-in entries live in `datasets_registry/*.yaml` at the repository root (override the folder with
the environment variable VLA_TRAIN_REGISTRY_DIR). A user adds datasets and mixtures without code edits
by passing extra YAML files in the same format (`load_registry(user_files=...)`, or `add_registry_files`
for the process-wide default). File format (both top-level keys optional):

    datasets:
      <name>:
        image_obs_keys: {primary: <raw key or null>, secondary: ..., wrist: ...}
        depth_obs_keys: {primary: ..., secondary: ..., wrist: ...}     # optional, default all null
        state_obs_keys: [<key or null>, ...]                            # null = one zero column
        state_encoding: NONE | POS_EULER | POS_QUAT | JOINT | JOINT_BIMANUAL   # optional, documentation
        action_encoding: EEF_POS | JOINT_POS | JOINT_POS_BIMANUAL | EEF_R6
        action_dim: <int>            # optional: 7 / 8 / 14 / 10 by action_encoding
        standardize_fn: <name in vla_train.data.standardize> | <package.module:function>
        control_frequency: <Hz>      # optional, documentation
        version: <x.y.z>             # optional, the usual tfds version of the data
        notes: <text>                # optional
        override: true               # optional: required to redefine a dataset from an earlier file
    mixtures:
      <name>: [[<dataset>, <weight>], ...]     # or {<dataset>: <weight>, ...}

This module imports no TensorFlow: `resolve_standardize_fn` imports the standardization module on demand.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

IMAGE_ROLES = ("primary", "secondary", "wrist")
STATE_ENCODINGS = ("NONE", "POS_EULER", "POS_QUAT", "JOINT", "JOINT_BIMANUAL")
ACTION_ENCODINGS = ("EEF_POS", "JOINT_POS", "JOINT_POS_BIMANUAL", "EEF_R6")
DEFAULT_ACTION_DIM = {"EEF_POS": 7, "JOINT_POS": 8, "JOINT_POS_BIMANUAL": 14, "EEF_R6": 10}
DATASET_FIELDS = (
    "image_obs_keys",
    "depth_obs_keys",
    "state_obs_keys",
    "state_encoding",
    "action_encoding",
    "action_dim",
    "standardize_fn",
    "control_frequency",
    "version",
    "notes",
    "override",
)
# state_encoding and control_frequency document the data; neither changes what reaches the model (the
# proprio vector is state_obs_keys concatenated; one frame per step whatever the rate), so both are optional.
REQUIRED_FIELDS = ("image_obs_keys", "state_obs_keys", "action_encoding", "standardize_fn")
REGISTRY_DIR_ENV = "VLA_TRAIN_REGISTRY_DIR"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_FN_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IMPORT_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


class RegistryError(ValueError):
    """A registry file is malformed; the message names the file, the entry and the field."""


class UnknownNameError(KeyError):
    """A dataset, mixture or standardization name is not registered; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset: raw keys, encodings and the standardization to apply."""

    name: str
    image_obs_keys: dict[str, str | None]  # role (primary/secondary/wrist) -> raw observation key
    depth_obs_keys: dict[str, str | None]  # role -> raw observation key
    state_obs_keys: tuple[str | None, ...]  # concatenated into proprio; None = one zero column
    state_encoding: str
    action_encoding: str
    action_dim: int  # width of the standardized action
    standardize_fn: str  # built-in name or package.module:function
    control_frequency: float | None = None  # Hz
    version: str | None = None
    notes: str = ""
    source: str = ""  # the YAML file this entry came from

    @property
    def has_gripper(self) -> bool:
        """Whether the last action dim is a gripper command (1 = open, 0 = closed) after standardization."""
        return self.action_encoding in ("EEF_POS", "JOINT_POS", "EEF_R6")


@dataclass
class Registry:
    """Datasets and mixtures from one or more YAML files (later files add to earlier ones)."""

    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    mixtures: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    mixture_sources: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            raise UnknownNameError(_unknown("dataset", name, self.datasets, self.files))
        return self.datasets[name]

    def mixture(self, name: str) -> list[tuple[str, float]]:
        """(dataset, weight) pairs of a named mixture; a dataset name alone is a mixture of itself.

        A dataset listed twice keeps its first weight (as OpenVLA does for `rtx_franka`).
        """
        if name in self.mixtures:
            seen: dict[str, float] = {}
            for dataset, weight in self.mixtures[name]:
                seen.setdefault(dataset, weight)
            return list(seen.items())
        if name in self.datasets:
            return [(name, 1.0)]
        raise UnknownNameError(
            _unknown("mixture or dataset", name, {**self.mixtures, **self.datasets}, self.files)
        )


def _unknown(kind: str, name: str, known: Iterable[str], files: Sequence[str] | None = None) -> str:
    """'unknown <kind> <name>' with close matches (substring hits first) and, given files, where names live."""
    known = sorted(known)
    lowered = name.lower()
    close = [k for k in known if lowered and lowered in k.lower()]
    close += [k for k in difflib.get_close_matches(name, known, n=6, cutoff=0.5) if k not in close]
    message = f"unknown {kind} '{name}'" + (f"; close matches: {close[:8]}" if close else "")
    if files is not None:
        where = ", ".join(files) if files else "no registry files"
        message += f" (registered in {where}; add it in a user registry YAML file)"
    return message


# ---------------------------------------------------------------------------------------------------------
# Loading and validation


def builtin_registry_dir() -> Path:
    env = os.environ.get(REGISTRY_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "datasets_registry"


def builtin_registry_files() -> list[Path]:
    folder = builtin_registry_dir()
    files = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    if not files:
        raise RegistryError(
            f"no registry files (*.yaml) in {folder}; set {REGISTRY_DIR_ENV} to the datasets_registry folder "
            "of the vla_train checkout"
        )
    return files


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{path}: registry file not found") from None
    except yaml.YAMLError as e:
        raise RegistryError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: the top level must be a mapping with 'datasets' and/or 'mixtures'")
    unknown = sorted(set(data) - {"datasets", "mixtures"})
    if unknown:
        raise RegistryError(f"{path}: unknown top-level key(s) {unknown}; use 'datasets' and/or 'mixtures'")
    return data


def _roles(where: str, value: Any, problems: list[str], required: bool) -> dict[str, str | None]:
    if value is None and not required:
        return dict.fromkeys(IMAGE_ROLES)
    if not isinstance(value, dict):
        problems.append(f"{where}: must be a mapping with keys {list(IMAGE_ROLES)}")
        return dict.fromkeys(IMAGE_ROLES)
    bad = sorted(set(value) - set(IMAGE_ROLES))
    if bad:
        problems.append(f"{where}: unknown role(s) {bad}; allowed {list(IMAGE_ROLES)}")
    roles: dict[str, str | None] = {}
    for role in IMAGE_ROLES:
        key = value.get(role)
        if key is not None and not (isinstance(key, str) and key):
            problems.append(f"{where}.{role}: must be a raw observation key (string) or null, got {key!r}")
            key = None
        roles[role] = key
    return roles


def _parse_dataset(path: Path, name: Any, entry: Any, problems: list[str]) -> DatasetSpec | None:
    where = f"{path}: dataset '{name}'"
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append(f"{where}: the name must be letters, digits, '_', '.' or '-'")
        return None
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be a mapping of fields {list(DATASET_FIELDS)}")
        return None
    before = len(problems)
    for key in sorted(set(entry) - set(DATASET_FIELDS)):
        close = difflib.get_close_matches(str(key), DATASET_FIELDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        problems.append(f"{where}: unknown field '{key}'{hint}; allowed {list(DATASET_FIELDS)}")
    for key in REQUIRED_FIELDS:
        if key not in entry:
            problems.append(f"{where}: missing required field '{key}'")

    # a missing image_obs_keys is already reported above: check the mapping only when present
    images = _roles(
        f"{where}: field 'image_obs_keys'", entry.get("image_obs_keys"), problems, "image_obs_keys" in entry
    )
    depths = _roles(f"{where}: field 'depth_obs_keys'", entry.get("depth_obs_keys"), problems, False)

    state_keys = entry.get("state_obs_keys", [])
    if not isinstance(state_keys, list) or any(k is not None and not isinstance(k, str) for k in state_keys):
        problems.append(f"{where}: field 'state_obs_keys' must be a list of raw keys or null (padding)")
        state_keys = []

    state_encoding = entry.get("state_encoding", "NONE")
    if "state_encoding" in entry and state_encoding not in STATE_ENCODINGS:
        problems.append(
            f"{where}: field 'state_encoding' is {state_encoding!r}; use one of {list(STATE_ENCODINGS)}"
        )
    action_encoding = entry.get("action_encoding")
    if "action_encoding" in entry and action_encoding not in ACTION_ENCODINGS:
        problems.append(
            f"{where}: field 'action_encoding' is {action_encoding!r}; use one of {list(ACTION_ENCODINGS)}"
        )

    action_dim = entry.get("action_dim", DEFAULT_ACTION_DIM.get(str(action_encoding), 0))
    if not isinstance(action_dim, int) or isinstance(action_dim, bool) or action_dim <= 0:
        problems.append(f"{where}: field 'action_dim' must be a positive integer, got {action_dim!r}")

    fn = entry.get("standardize_fn")
    if "standardize_fn" in entry and not (
        isinstance(fn, str) and (_FN_NAME_RE.match(fn) or _IMPORT_PATH_RE.match(fn))
    ):
        problems.append(
            f"{where}: field 'standardize_fn' is {fn!r}; use a built-in name (see "
            "vla_train.data.standardize.STANDARDIZE_FNS) or an import path 'package.module:function'"
        )

    frequency = entry.get("control_frequency")
    if frequency is not None and (
        not isinstance(frequency, int | float) or isinstance(frequency, bool) or frequency <= 0
    ):
        problems.append(f"{where}: field 'control_frequency' must be a positive number (Hz) or null")
    version = entry.get("version")
    if version is not None and not (isinstance(version, str) and _VERSION_RE.match(version)):
        problems.append(f"{where}: field 'version' must be a string like '1.0.0' (quote it in YAML)")
    notes = entry.get("notes", "")
    if not isinstance(notes, str):
        problems.append(f"{where}: field 'notes' must be a string")
    if not isinstance(entry.get("override", False), bool):
        problems.append(f"{where}: field 'override' must be true or false")

    if len(problems) > before:
        return None
    return DatasetSpec(
        name=name,
        image_obs_keys=images,
        depth_obs_keys=depths,
        state_obs_keys=tuple(state_keys),
        state_encoding=state_encoding,
        action_encoding=action_encoding,
        action_dim=action_dim,
        standardize_fn=fn,
        control_frequency=None if frequency is None else float(frequency),
        version=version,
        notes=notes,
        source=str(path),
    )


def _parse_mixture(
    path: Path, name: Any, entries: Any, problems: list[str]
) -> list[tuple[str, float]] | None:
    where = f"{path}: mixture '{name}'"
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append(f"{where}: the name must be letters, digits, '_', '.' or '-'")
        return None
    if isinstance(entries, dict):
        entries = [[k, v] for k, v in entries.items()]
    if not isinstance(entries, list) or not entries:
        problems.append(f"{where}: must be a non-empty list of [dataset, weight] pairs")
        return None
    pairs: list[tuple[str, float]] = []
    for i, item in enumerate(entries):
        if not (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)):
            problems.append(f"{where}: entry {i} must be [dataset, weight], got {item!r}")
            continue
        dataset, weight = item
        if not isinstance(weight, int | float) or isinstance(weight, bool) or not weight > 0:
            problems.append(f"{where}: dataset '{dataset}': weight must be a positive number, got {weight!r}")
            continue
        pairs.append((dataset, float(weight)))
    return pairs


def load_registry(user_files: Sequence[str | Path] = (), *, include_builtin: bool = True) -> Registry:
    """Read the built-in registry files, then each user file in order; raise RegistryError on any problem.

    Every problem of a file is reported at once. Redefining a dataset from an earlier file needs
    `override: true` in the new entry; a mixture name can be defined only once.
    """
    paths = [*(builtin_registry_files() if include_builtin else []), *(Path(p) for p in user_files)]
    registry = Registry()
    mixture_defs: list[tuple[Path, str]] = []
    for path in paths:
        data = _read_yaml(path)
        problems: list[str] = []
        datasets = data.get("datasets") or {}
        mixtures = data.get("mixtures") or {}
        if not isinstance(datasets, dict):
            problems.append(f"{path}: 'datasets' must be a mapping of dataset name -> fields")
            datasets = {}
        if not isinstance(mixtures, dict):
            problems.append(
                f"{path}: 'mixtures' must be a mapping of mixture name -> [[dataset, weight], ...]"
            )
            mixtures = {}
        for name, entry in datasets.items():
            spec = _parse_dataset(path, name, entry, problems)
            if spec is None:
                continue
            if name in registry.datasets and not entry.get("override", False):
                problems.append(
                    f"{path}: dataset '{name}' is already defined in {registry.datasets[name].source}; "
                    "set 'override: true' to replace it"
                )
                continue
            registry.datasets[name] = spec
        for name, entries in mixtures.items():
            pairs = _parse_mixture(path, name, entries, problems)
            if pairs is None:
                continue
            if name in registry.mixtures:
                problems.append(
                    f"{path}: mixture '{name}' is already defined in {registry.mixture_sources[name]}; "
                    "choose another name"
                )
                continue
            registry.mixtures[name] = pairs
            registry.mixture_sources[name] = str(path)
            mixture_defs.append((path, name))
        if problems:
            raise RegistryError("invalid dataset registry:\n  " + "\n  ".join(problems))
        registry.files.append(str(path))

    # Mixtures may name datasets from any file, so they are checked once everything is read.
    problems = []
    for path, name in mixture_defs:
        for dataset, _ in registry.mixtures[name]:
            if dataset not in registry.datasets:
                problems.append(
                    f"{path}: mixture '{name}': {_unknown('dataset', dataset, registry.datasets)}"
                )
    if problems:
        raise RegistryError("invalid dataset registry:\n  " + "\n  ".join(problems))
    return registry


# ---------------------------------------------------------------------------------------------------------
# Process-wide default registry and the module-level API used by the reader

_default: Registry | None = None
_user_files: list[Path] = []


def default_registry() -> Registry:
    """The built-in registry plus the files given to `add_registry_files` (read once, then cached)."""
    global _default
    if _default is None:
        _default = load_registry(_user_files)
    return _default


def add_registry_files(paths: Sequence[str | Path]) -> Registry:
    """Extend the process-wide registry with user YAML files (validated now; the default is unchanged on
    error). Adding the same file again is a no-op."""
    global _default
    new = [Path(p).resolve() for p in paths if Path(p).resolve() not in _user_files]
    if not new:
        return default_registry()
    registry = load_registry([*_user_files, *new])
    _user_files.extend(new)
    _default = registry
    return registry


def reset_default_registry() -> None:
    """Forget user files and the cached registry (tests)."""
    global _default
    _default = None
    _user_files.clear()


def get_dataset_spec(name: str, registry: Registry | None = None) -> DatasetSpec:
    return (registry or default_registry()).dataset(name)


def get_mixture(name: str, registry: Registry | None = None) -> list[tuple[str, float]]:
    return (registry or default_registry()).mixture(name)


def list_datasets(registry: Registry | None = None) -> list[str]:
    return sorted((registry or default_registry()).datasets)


def list_mixtures(registry: Registry | None = None) -> list[str]:
    return sorted((registry or default_registry()).mixtures)


RENAMED_STANDARDIZE_FNS = {"vla_synthetic": "identity"}  # old name -> new name


@functools.cache
def builtin_standardize_names() -> tuple[str, ...]:
    """The names of STANDARDIZE_FNS, read from vla_train/data/standardize.py's source without importing it
    (it imports TensorFlow), so that config validation can name an unknown standardization early."""
    import ast

    tree = ast.parse((Path(__file__).parent / "standardize.py").read_text())
    for node in ast.walk(tree):
        targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
        if any(getattr(t, "id", None) == "STANDARDIZE_FNS" for t in targets) and isinstance(
            node.value, ast.Dict
        ):
            return tuple(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    raise RuntimeError("vla_train/data/standardize.py defines no STANDARDIZE_FNS dict")


def unknown_standardize_problem(spec: DatasetSpec) -> str | None:
    """Why spec's built-in standardize_fn name does not exist (None when it does, or is an import path)."""
    if ":" in spec.standardize_fn or spec.standardize_fn in builtin_standardize_names():
        return None
    where = f" (from {spec.source})" if spec.source else ""
    if spec.standardize_fn in RENAMED_STANDARDIZE_FNS:
        new = RENAMED_STANDARDIZE_FNS[spec.standardize_fn]
        return f"dataset '{spec.name}'{where}: standardize_fn '{spec.standardize_fn}' is now called '{new}'; rename it"
    return (
        f"dataset '{spec.name}'{where}: "
        + _unknown("standardize_fn", spec.standardize_fn, builtin_standardize_names())
        + f"; valid names: {', '.join(sorted(builtin_standardize_names()))}, or an import path 'package.module:function'"
    )


def resolve_standardize_fn(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A built-in standardization by name, or a user function by import path 'package.module:function'."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UnknownNameError(
                f"standardize_fn '{name}': cannot import module '{module_name}' ({e}); is it on PYTHONPATH?"
            ) from None
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn):
            raise UnknownNameError(
                f"standardize_fn '{name}': module '{module_name}' has no function '{attr}'"
            )
        return fn
    from vla_train.data.standardize import STANDARDIZE_FNS

    if name not in STANDARDIZE_FNS:
        message = _unknown("standardize_fn", name, STANDARDIZE_FNS)
        raise UnknownNameError(message + "; or use an import path 'package.module:function'")
    return STANDARDIZE_FNS[name]


__all__ = [
    "ACTION_ENCODINGS",
    "DatasetSpec",
    "Registry",
    "RegistryError",
    "STATE_ENCODINGS",
    "UnknownNameError",
    "add_registry_files",
    "default_registry",
    "get_dataset_spec",
    "get_mixture",
    "list_datasets",
    "list_mixtures",
    "load_registry",
    "reset_default_registry",
    "resolve_standardize_fn",
]
