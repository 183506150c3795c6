"""A real tfds builder that writes learnable synthetic RLDS episodes in the Open X-Embodiment layout.

Each episode shows one block on a 3x3 grid over a plain table. The block has six visual
attributes, each one of three: column, row, size, shade, shape (solid, hollow, cross) and colour (red,
green, blue). The instruction says whether to approach the block or back away from it, and how fast
("reach for the block quickly", "slowly move away from the block", ...). Each action dimension reads
one attribute from the image, scaled by the instruction's signed speed m = v * speed:

    v = +1 (approach) or -1 (retreat), speed = 1 (slowly) or 2 (quickly), u(k) = k - 1 for k in {0, 1, 2}
    action = m * [0.025 u(col), 0.025 u(row), 0.02 u(size), 0.05 u(shade), 0.05 u(shape), 0.05 u(colour)],
             gripper = 1 (open) if v > 0 else 0

The attributes are visible only in the image and m only in the instruction, so a policy that ignores
either input cannot score well; the attributes are independent, so one action dimension tells nothing
about the next one's attribute. Steps within an episode jitter the block and the lighting; the proprio
state integrates the actions. Layout: steps/observation/image (JPEG), steps/observation/state (8),
steps/action (7), steps/language_instruction, is_first, is_last, is_terminal, reward, discount; splits
train and val.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vla_train.config import SyntheticDataConfig
from vla_train.data.rlds_steps import step_flag_features, step_flags
from vla_train.data.tf_setup import tf, tfds

DATASET_NAME = "vla_synthetic"
VERSION = "1.0.0"
ACTION_DIM = 7
STATE_DIM = 8

COLORS = ((215, 45, 40), (40, 170, 60), (45, 80, 225))  # red, green, blue
SIZES = (0.15, 0.3, 0.45)  # half-width of the block, as a fraction of a grid cell
SHADES = (0.55, 0.8, 1.0)  # brightness factor of the block colour
APPROACH = ["reach for the block", "move toward the block", "go to the cube"]
RETREAT = ["move away from the block", "back off from the cube", "retreat from the block"]
SLOW = ["slowly {a}", "{a} slowly", "{a} gently"]
FAST = ["quickly {a}", "{a} quickly", "{a} fast"]


class Block(NamedTuple):
    col: int
    row: int
    size: int
    shade: int
    shape: int  # 0 solid, 1 hollow, 2 cross
    color: int  # index into COLORS


def target_action(block: Block, verb: int, speed: int) -> np.ndarray:
    m = float(verb * speed)
    u = np.array([block.col, block.row, block.size, block.shade, block.shape, block.color], np.float64) - 1
    scale = np.array([0.025, 0.025, 0.02, 0.05, 0.05, 0.05])
    return np.concatenate([m * scale * u, [1.0 if verb > 0 else 0.0]]).astype(np.float32)


def _render(rng: np.random.Generator, size: int, b: Block, light: float) -> np.ndarray:
    # A fixed table texture: the block is the only thing that differs between scenes (plus pixel noise
    # and lighting), which keeps the task learnable in minutes by a tiny model on a CPU.
    yy, xx = np.mgrid[0:size, 0:size]
    base = 120 + 12 * np.sin(xx / size * 6.0) * np.cos(yy / size * 5.0)
    img = np.stack([base, base * 0.95, base * 0.9], axis=-1)
    img += rng.normal(0, 3, img.shape)
    cell = size / 3.0
    half = max(2, int(round(cell * SIZES[b.size])))
    cx = int((b.col + 0.5) * cell) + int(rng.integers(-1, 2))
    cy = int((b.row + 0.5) * cell) + int(rng.integers(-1, 2))
    color = np.array(COLORS[b.color], np.float64) * SHADES[b.shade]
    y0, y1, x0, x1 = max(0, cy - half), cy + half, max(0, cx - half), cx + half
    if b.shape == 0:
        img[y0:y1, x0:x1] = color
    elif b.shape == 1:
        border = max(1, half // 2)
        img[y0:y1, x0:x1] = color
        inner = (slice(y0 + border, y1 - border), slice(x0 + border, x1 - border))
        img[inner] = np.stack([base, base * 0.95, base * 0.9], axis=-1)[inner]
    else:
        bar = max(1, half // 3)
        img[cy - bar : cy + bar, x0:x1] = color
        img[y0:y1, cx - bar : cx + bar] = color
    return np.clip(img * light, 0, 255).astype(np.uint8)


def generate_episode(rng: np.random.Generator, cfg: SyntheticDataConfig) -> dict:
    """One episode as numpy arrays (images uint8 HxWx3), in the RLDS step layout."""
    block = Block(*(int(k) for k in rng.integers(0, 3, size=6)))
    verb = 1 if rng.random() < 0.5 else -1
    speed = 1 if rng.random() < 0.5 else 2
    act = (APPROACH if verb > 0 else RETREAT)[int(rng.integers(3))]
    instruction = (SLOW if speed == 1 else FAST)[int(rng.integers(3))].format(a=act)
    action = target_action(block, verb, speed)
    state = np.concatenate([rng.uniform(-0.2, 0.2, 6), [1.0, 0.0]]).astype(np.float32)
    steps = []
    T = cfg.steps_per_episode
    for t in range(T):
        image = _render(rng, cfg.image_size, block, light=float(rng.uniform(0.95, 1.05)))
        steps.append(
            {
                "observation": {"image": image, "state": state.copy()},
                "action": action.copy(),
                "language_instruction": instruction,
                **step_flags(t, T),
            }
        )
        state[:6] += action[:6]
        state[6] = action[6]
    return {"steps": steps, "episode_metadata": {"scene": "block " + "".join(map(str, block))}}


@functools.cache
def _builder_class():
    # tfds registers every builder class by name when it is defined: define it once per process.
    class VlaSynthetic(tfds.core.GeneratorBasedBuilder):
        """Learnable synthetic tabletop episodes (see the module docstring)."""

        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = {str(VERSION): "Initial release."}

        def __init__(self, *, synthetic: SyntheticDataConfig, **kwargs):
            self._synthetic = synthetic
            super().__init__(**kwargs)

        def _info(self):
            s = self._synthetic.image_size
            return self.dataset_info_from_configs(
                description=__doc__,
                features=tfds.features.FeaturesDict(
                    {
                        "steps": tfds.features.Dataset(
                            {
                                "observation": tfds.features.FeaturesDict(
                                    {
                                        "image": tfds.features.Image(
                                            shape=(s, s, 3), dtype=np.uint8, encoding_format="jpeg"
                                        ),
                                        "state": tfds.features.Tensor(shape=(STATE_DIM,), dtype=np.float32),
                                    }
                                ),
                                "action": tfds.features.Tensor(shape=(ACTION_DIM,), dtype=np.float32),
                                "language_instruction": tfds.features.Text(),
                                **step_flag_features(tfds),
                            }
                        ),
                        "episode_metadata": tfds.features.FeaturesDict({"scene": tfds.features.Text()}),
                    }
                ),
                supervised_keys=None,
            )

        def _split_generators(self, dl_manager):
            cfg = self._synthetic
            return {
                "train": self._generate_examples(cfg.num_train_episodes, cfg.seed * 2 + 1),
                "val": self._generate_examples(cfg.num_val_episodes, cfg.seed * 2 + 2),
            }

        def _generate_examples(self, num_episodes: int, seed: int):
            rng = np.random.default_rng(seed)
            for i in range(num_episodes):
                episode = generate_episode(rng, self._synthetic)
                for step in episode["steps"]:
                    step["observation"]["image"] = _jpeg(step["observation"]["image"])
                yield f"episode_{i}", episode

    VlaSynthetic.name = DATASET_NAME
    return VlaSynthetic


def _jpeg(image: np.ndarray) -> bytes:
    # Encoding here (not in tfds) keeps the quality fixed and the bytes identical for a given seed.
    return tf.io.encode_jpeg(image, quality=95).numpy()


def dataset_dir(data_root_dir: str | Path) -> Path:
    return Path(data_root_dir) / DATASET_NAME / VERSION


def build_synthetic_dataset(data_root_dir: str | Path, cfg: SyntheticDataConfig) -> Path:
    """Write the synthetic dataset under data_root_dir (once; an existing complete build is reused)."""
    out = dataset_dir(data_root_dir)
    if (out / "dataset_info.json").is_file():
        return out
    builder = _builder_class()(synthetic=cfg, data_dir=str(data_root_dir))
    files = cfg.num_files or None
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, verify_ssl=False, num_shards=files
        )
    )
    return out


__all__ = ["build_synthetic_dataset", "dataset_dir", "generate_episode", "DATASET_NAME"]
