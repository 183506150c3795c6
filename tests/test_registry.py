"""The dataset registry: built-in YAML content, validation messages, user files, standardize_fn resolution."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vla_train.data import registry as reg
from vla_train.data.registry import (
    RegistryError,
    UnknownNameError,
    get_dataset_spec,
    get_mixture,
    load_registry,
    resolve_standardize_fn,
)

OPENVLA_MIXTURES = [
    "bridge",
    "bridge_rt_1",
    "rtx",
    "rtx_franka",
    "oxe_magic_soup",
    "oxe_magic_soup_plus",
    "oxe_magic_soup_plus_minus",
    "tdroid_carrot_in_bowl",
    "tdroid_pour_corn_in_pot",
    "tdroid_flip_pot_upright",
    "tdroid_move_object_onto_plate",
    "tdroid_knock_object_over",
    "tdroid_cover_object_with_towel",
    "droid_wipe",
    "libero_spatial_no_noops",
    "libero_object_no_noops",
    "libero_goal_no_noops",
    "libero_10_no_noops",
    "libero_mix",
]

GOOD_ENTRY = """\
    image_obs_keys: {primary: cam, secondary: null, wrist: null}
    state_obs_keys: [state]
    state_encoding: POS_EULER
    action_encoding: EEF_POS
    standardize_fn: passthrough
"""


@pytest.fixture
def user_yaml(tmp_path):
    def write(text: str, name: str = "user.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def clean_default():
    reg.reset_default_registry()
    yield
    reg.reset_default_registry()


def test_builtin_registry_has_the_oxe_datasets_and_every_openvla_mixture():
    r = load_registry()
    assert len(r.datasets) >= 60
    assert set(OPENVLA_MIXTURES) <= set(r.mixtures)
    for name in ("fractal20220817_data", "kuka", "bridge_orig", "droid", "libero_90_no_noops", "bc_z"):
        assert name in r.datasets


def test_every_mixture_names_registered_datasets_with_positive_weights():
    r = load_registry()
    for mixture, pairs in r.mixtures.items():
        assert pairs, mixture
        for dataset, weight in pairs:
            assert dataset in r.datasets, (mixture, dataset)
            assert weight > 0, (mixture, dataset)


def test_openvla_facts_spot_checks():
    fractal = get_dataset_spec("fractal20220817_data")
    assert fractal.image_obs_keys == {"primary": "image", "secondary": None, "wrist": None}
    assert fractal.state_obs_keys == ("base_pose_tool_reached", "gripper_closed")
    assert (fractal.state_encoding, fractal.action_encoding, fractal.action_dim) == ("POS_QUAT", "EEF_POS", 7)
    assert fractal.standardize_fn == "rt1" and fractal.control_frequency == 3

    bridge = get_dataset_spec("bridge_orig")
    assert bridge.image_obs_keys["primary"] == "image_0" and bridge.image_obs_keys["secondary"] == "image_1"
    assert bridge.state_obs_keys == ("EEF_state", None, "gripper_state")
    assert get_dataset_spec("bridge_dataset").standardize_fn == "bridge_orig"

    droid = get_dataset_spec("droid")
    assert droid.image_obs_keys == {
        "primary": "exterior_image_1_left",
        "secondary": "exterior_image_2_left",
        "wrist": "wrist_image_left",
    }
    taco = get_dataset_spec("taco_play")
    assert taco.depth_obs_keys == {"primary": "depth_static", "secondary": None, "wrist": "depth_gripper"}
    assert get_dataset_spec("roboset").action_dim == 8  # joint positions + gripper
    assert get_dataset_spec("libero_spatial_no_noops").state_obs_keys == ("EEF_state", "gripper_state")
    assert get_mixture("bridge") == [("bridge_orig", 1.0)]
    soup = dict(get_mixture("oxe_magic_soup_plus"))
    assert soup["droid"] == 0.06 and soup["fractal20220817_data"] == pytest.approx(0.54087122203)
    assert "droid" not in dict(get_mixture("oxe_magic_soup_plus_minus"))


def test_repeated_dataset_in_a_mixture_keeps_its_first_weight():
    pairs = get_mixture("rtx_franka")
    names = [d for d, _ in pairs]
    assert len(names) == len(set(names)) == 24
    assert dict(pairs)["taco_play"] == 2.0 and dict(pairs)["berkeley_cable_routing"] == 3.0


def test_a_dataset_name_is_a_mixture_of_itself():
    assert get_mixture("cmu_stretch") == [("cmu_stretch", 1.0)]


@pytest.mark.parametrize(
    "call, name, expected",
    [
        (get_dataset_spec, "fractal2022", "fractal20220817_data"),
        (get_dataset_spec, "bridge_v2", "bridge_orig"),
        (get_mixture, "libero_spatial", "libero_spatial_no_noops"),
        (get_mixture, "oxe_magic_soup_pls", "oxe_magic_soup_plus"),
    ],
)
def test_unknown_names_list_close_matches(call, name, expected):
    with pytest.raises(UnknownNameError) as err:
        call(name)
    message = str(err.value)
    assert f"'{name}'" in message and expected in message


@pytest.mark.parametrize(
    "text, fragments",
    [
        (
            "datasets:\n  robo_a:\n" + GOOD_ENTRY.replace("image_obs_keys", "image_keys"),
            ["dataset 'robo_a'", "unknown field 'image_keys'", "did you mean 'image_obs_keys'"],
        ),
        (
            "datasets:\n  robo_a:\n" + GOOD_ENTRY.replace("POS_EULER", "EULER"),
            ["dataset 'robo_a'", "'state_encoding'", "'EULER'", "POS_QUAT"],
        ),
        (
            "datasets:\n  robo_a:\n" + GOOD_ENTRY.replace("wrist: null", "third: cam2"),
            ["dataset 'robo_a'", "'image_obs_keys'", "third"],
        ),
        (
            "datasets:\n  robo_a:\n" + GOOD_ENTRY.replace("    standardize_fn: passthrough\n", ""),
            ["dataset 'robo_a'", "missing required field 'standardize_fn'"],
        ),
        (
            "datasets:\n  robo_a:\n" + GOOD_ENTRY.replace("passthrough", "my module.fn"),
            ["dataset 'robo_a'", "'standardize_fn'", "package.module:function"],
        ),
        (
            "datasets:\n  robo_a:\n" + GOOD_ENTRY + "    control_frequency: -5\n",
            ["dataset 'robo_a'", "'control_frequency'"],
        ),
        ("datasets:\n  robo_a:\n" + GOOD_ENTRY + "    version: 1.0\n", ["dataset 'robo_a'", "'version'"]),
        ("datasets:\n  robo_a:\n" + GOOD_ENTRY + "    action_dim: 0\n", ["dataset 'robo_a'", "'action_dim'"]),
        (
            "datasets:\n  robo_a:\n" + GOOD_ENTRY.replace("[state]", "state"),
            ["dataset 'robo_a'", "'state_obs_keys'"],
        ),
        (
            "mixtures:\n  my_mix:\n    - [bridge_orgi, 1.0]\n",
            ["mixture 'my_mix'", "'bridge_orgi'", "bridge_orig"],
        ),
        ("mixtures:\n  my_mix:\n    - [bridge_orig, -1]\n", ["mixture 'my_mix'", "bridge_orig", "positive"]),
        ("mixtures:\n  my_mix: []\n", ["mixture 'my_mix'", "non-empty"]),
        ("dataset:\n  robo_a: {}\n", ["unknown top-level key", "dataset"]),
        ("datasets:\n  robo_a: [unclosed\n", ["not valid YAML"]),
        (
            "datasets:\n  kuka:\n" + GOOD_ENTRY,
            ["dataset 'kuka'", "already defined", "datasets.yaml", "override: true"],
        ),
    ],
)
def test_bad_registry_files_name_file_entry_and_field(user_yaml, text, fragments):
    path = user_yaml(text)
    with pytest.raises(RegistryError) as err:
        load_registry([path])
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_every_problem_of_a_file_is_reported_at_once(user_yaml):
    bad = GOOD_ENTRY.replace("POS_EULER", "EULER").replace("EEF_POS", "EEF")
    path = user_yaml("datasets:\n  robo_a:\n" + bad + "  robo_b:\n" + GOOD_ENTRY.replace("[state]", "7"))
    with pytest.raises(RegistryError) as err:
        load_registry([path])
    message = str(err.value)
    assert "'state_encoding'" in message and "'action_encoding'" in message and "robo_b" in message


def test_user_file_adds_datasets_and_mixtures(user_yaml, clean_default):
    path = user_yaml(
        """\
        datasets:
          my_robot:
            image_obs_keys: {primary: front, wrist: hand}
            state_obs_keys: [joints, null]
            state_encoding: JOINT
            action_encoding: EEF_POS
            standardize_fn: libero
            control_frequency: 15
        mixtures:
          my_mix:
            my_robot: 2.0
            bridge_orig: 1.0
        """
    )
    r = load_registry([path])
    spec = r.dataset("my_robot")
    assert spec.image_obs_keys == {"primary": "front", "secondary": None, "wrist": "hand"}
    assert spec.depth_obs_keys == {"primary": None, "secondary": None, "wrist": None}
    assert spec.state_obs_keys == ("joints", None) and spec.action_dim == 7
    assert spec.source == str(path)
    assert r.mixture("my_mix") == [("my_robot", 2.0), ("bridge_orig", 1.0)]
    assert "kuka" in r.datasets  # the built-in entries stay

    # the process-wide default picks the file up too, and re-adding it is harmless
    with pytest.raises(UnknownNameError):
        get_dataset_spec("my_robot")
    reg.add_registry_files([path])
    reg.add_registry_files([path])
    assert get_dataset_spec("my_robot").control_frequency == 15
    assert get_mixture("my_mix")[0] == ("my_robot", 2.0)


def test_override_replaces_a_builtin_dataset(user_yaml):
    path = user_yaml("datasets:\n  kuka:\n" + GOOD_ENTRY + "    override: true\n")
    assert load_registry([path]).dataset("kuka").standardize_fn == "passthrough"


def test_a_failed_user_file_leaves_the_default_registry_unchanged(user_yaml, clean_default):
    before = reg.default_registry()
    with pytest.raises(RegistryError):
        reg.add_registry_files([user_yaml("datasets:\n  robo_a: {}\n")])
    assert reg.default_registry() is before


def test_import_path_standardize_fn(user_yaml, tmp_path, monkeypatch):
    (tmp_path / "my_std_pkg").mkdir()
    (tmp_path / "my_std_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_std_pkg" / "robot.py").write_text(
        textwrap.dedent(
            """\
            import tensorflow as tf

            def standardize(steps):
                return {
                    "observation": dict(steps["observation"]),
                    "action": tf.cast(steps["action"][:, :7], tf.float32),
                    "language_instruction": steps["task"],
                }
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = user_yaml(
        "datasets:\n  robo_a:\n" + GOOD_ENTRY.replace("passthrough", "my_std_pkg.robot:standardize")
    )
    spec = load_registry([path]).dataset("robo_a")
    fn = resolve_standardize_fn(spec.standardize_fn)

    import tensorflow as tf

    from vla_train.data.standardize import make_standardizer

    steps = {
        "observation": {"cam": tf.constant([b"a", b"b"]), "state": tf.ones([2, 3])},
        "action": tf.ones([2, 9], tf.float64),
        "task": tf.constant([b"go", b"go"]),
    }
    assert fn(steps)["action"].shape == (2, 7)
    out = make_standardizer(spec)(steps)
    assert set(out["observation"]) == {"cam", "state"} and out["action"].dtype == tf.float32


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("rt2", "rt1"),
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("vla_train.data.standardize:no_such_fn", "has no function 'no_such_fn'"),
    ],
)
def test_resolve_standardize_fn_errors(name, fragment):
    with pytest.raises(UnknownNameError) as err:
        resolve_standardize_fn(name)
    assert fragment in str(err.value)


def test_every_registered_standardize_fn_resolves():
    from vla_train.data.standardize import STANDARDIZE_FNS

    names = {spec.standardize_fn for spec in load_registry().datasets.values()}
    for name in names:
        assert callable(resolve_standardize_fn(name))
    assert resolve_standardize_fn("vla_train.data.standardize:libero") is STANDARDIZE_FNS["libero"]


def test_the_registry_loads_without_importing_tensorflow():
    code = (
        "import sys\n"
        "from vla_train.data.registry import default_registry\n"
        "default_registry()\n"
        "assert 'tensorflow' not in sys.modules, 'registry pulled in TensorFlow'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_missing_registry_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(reg.REGISTRY_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(RegistryError, match=reg.REGISTRY_DIR_ENV):
        load_registry()
