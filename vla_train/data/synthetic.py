"""A real tfds builder that writes learnable synthetic RLDS episodes in the Open X-Embodiment layout.

Each episode shows one tabletop scene: three blocks of distinct colours (three of four) on distinct cells
of a 3x3 grid over a textured background; each block also has a size, a shade and a shape (solid,
hollow, cross), each one of three. The instruction names the target block by colour and a verb that means
approach it or back away from it ("reach for the red block", "move away from the blue cube", ...).
Each action dimension reads a different attribute of the target block, signed by the verb:

    v = +1 (approach) or -1 (retreat); u(k) = k - 1 for an attribute k in {0, 1, 2}
    action = 0.05 v u(col), 0.05 v u(row), 0.04 v u(size), 0.1 v u(shade), 0.1 v u(shape),
             0.1 v u((col + row) mod 3), gripper = 1 (open) if v > 0 else 0

Which block's attributes count comes from the instruction, the attributes themselves only from the image,
so a policy that ignores either input cannot score well, and the attributes are independent, so one
action dimension says little about the next. Steps within an episode jitter the blocks and the lighting;
the proprio state integrates the actions. Layout: steps/observation/image (JPEG), steps/observation/state
(8), steps/action (7), steps/language_instruction, is_first, is_last, is_terminal, reward, discount;
splits train and val.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from vla_train.config import SyntheticDataConfig

DATASET_NAME = "vla_synthetic"
VERSION = "1.0.0"
ACTION_DIM = 7
STATE_DIM = 8

COLORS = {
    "red": (215, 45, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 225),
    "yellow": (230, 205, 40),
}
SIZES = (0.2, 0.3, 0.4)  # half-width of a block, as a fraction of a grid cell
SHADES = (0.55, 0.8, 1.0)  # brightness factor of the block colour
APPROACH = ["reach for the {c} block", "move toward the {c} block", "go to the {c} cube"]
RETREAT = ["move away from the {c} block", "back off from the {c} cube", "retreat from the {c} block"]


class Block(NamedTuple):
    color: str
    col: int
    row: int
    size: int
    shade: int
    shape: int  # 0 solid, 1 hollow, 2 cross


def target_action(block: Block, verb: int) -> np.ndarray:
    v = float(verb)
    return np.array(
        [
            0.05 * v * (block.col - 1),
            0.05 * v * (block.row - 1),
            0.04 * v * (block.size - 1),
            0.1 * v * (block.shade - 1),
            0.1 * v * (block.shape - 1),
            0.1 * v * ((block.col + block.row) % 3 - 1),
            1.0 if verb > 0 else 0.0,
        ],
        dtype=np.float32,
    )


def _render(
    rng: np.random.Generator, size: int, tint: np.ndarray, blocks: list[Block], light: float
) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    base = 110 + 20 * np.sin(xx / size * 6.0 + tint[0] * 3) * np.cos(yy / size * 5.0 + tint[1] * 3)
    img = np.stack([base + 25 * tint[i] for i in range(3)], axis=-1)
    img += rng.normal(0, 5, img.shape)
    cell = size / 3.0
    for b in blocks:
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
            img[y0 + border : y1 - border, x0 + border : x1 - border] = base[
                y0 + border : y1 - border, x0 + border : x1 - border, None
            ]
        else:
            bar = max(1, half // 3)
            img[cy - bar : cy + bar, x0:x1] = color
            img[y0:y1, cx - bar : cx + bar] = color
    return np.clip(img * light, 0, 255).astype(np.uint8)


def generate_episode(rng: np.random.Generator, cfg: SyntheticDataConfig) -> dict:
    """One episode as numpy arrays (images uint8 HxWx3), in the RLDS step layout."""
    colors = list(rng.choice(list(COLORS), size=3, replace=False))
    cells = rng.choice(9, size=3, replace=False)
    attrs = rng.integers(0, 3, size=(3, 3))
    blocks = [
        Block(str(c), int(cell % 3), int(cell // 3), int(a[0]), int(a[1]), int(a[2]))
        for c, cell, a in zip(colors, cells, attrs)
    ]
    target = blocks[int(rng.integers(3))]
    verb = 1 if rng.random() < 0.5 else -1
    template = (APPROACH if verb > 0 else RETREAT)[int(rng.integers(3))]
    instruction = template.format(c=target.color)
    action = target_action(target, verb)
    tint = rng.uniform(-1, 1, size=3)
    state = np.concatenate([rng.uniform(-0.2, 0.2, 6), [1.0, 0.0]]).astype(np.float32)
    steps = []
    T = cfg.steps_per_episode
    for t in range(T):
        image = _render(rng, cfg.image_size, tint, blocks, light=float(rng.uniform(0.95, 1.05)))
        steps.append(
            {
                "observation": {"image": image, "state": state.copy()},
                "action": action.copy(),
                "language_instruction": instruction,
                "is_first": t == 0,
                "is_last": t == T - 1,
                "is_terminal": t == T - 1,
                "reward": float(t == T - 1),
                "discount": 1.0,
            }
        )
        state[:6] += action[:6]
        state[6] = action[6]
    scene = ",".join(f"{b.color}@{b.col}{b.row}/{b.size}{b.shade}{b.shape}" for b in blocks)
    return {"steps": steps, "episode_metadata": {"scene": scene}}


def _builder_class():
    import tensorflow_datasets as tfds

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
                                "is_first": tfds.features.Scalar(dtype=np.bool_),
                                "is_last": tfds.features.Scalar(dtype=np.bool_),
                                "is_terminal": tfds.features.Scalar(dtype=np.bool_),
                                "reward": tfds.features.Scalar(dtype=np.float32),
                                "discount": tfds.features.Scalar(dtype=np.float32),
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
    import tensorflow as tf

    return tf.io.encode_jpeg(image, quality=95).numpy()


def dataset_dir(data_root_dir: str | Path) -> Path:
    return Path(data_root_dir) / DATASET_NAME / VERSION


def build_synthetic_dataset(data_root_dir: str | Path, cfg: SyntheticDataConfig) -> Path:
    """Write the synthetic dataset under data_root_dir (once; an existing complete build is reused)."""
    out = dataset_dir(data_root_dir)
    if (out / "dataset_info.json").is_file():
        return out
    import tensorflow_datasets as tfds

    builder = _builder_class()(synthetic=cfg, data_dir=str(data_root_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False, verify_ssl=False)
    )
    return out


__all__ = ["build_synthetic_dataset", "dataset_dir", "generate_episode", "DATASET_NAME"]
