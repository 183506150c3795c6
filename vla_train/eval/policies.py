"""What vla-eval can run: a trained model (an exported model directory, or a run's newest checkpoint),
the scripted experts (Meta-World's own, live), or a replay of a dataset's recorded actions (a check of
the data and the action mapping: it must score 100% on the seeds it was recorded from).

Every policy answers `act(observations, instructions, trials, steps)` with one 7-D OpenVLA-layout action
per observation (None: the worker's expert acts) and says whether it looks at frames (`needs_frames`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vla_train.sim.demos import DATASET_NAME, dataset_dir


class ModelPolicy:
    """A VLA: the primary camera's frame + the task's instruction -> the current step's action."""

    needs_frames = True

    def __init__(self, vla_policy, unnorm_key: str = ""):
        self.policy = vla_policy
        stats = vla_policy.model.config.norm_stats or {}
        if unnorm_key:
            self.unnorm_key = unnorm_key
        elif DATASET_NAME in stats:
            self.unnorm_key = DATASET_NAME
        else:
            self.unnorm_key = None  # the only dataset, or a clear error from VLAPolicy
        self.action_dim = vla_policy.model.config.action_dim

    def act(self, observations, instructions, trials, steps):
        from vla_train.data.image_ops import resize_uint8

        size = self.policy.processor.settings.image_size
        # the training pipeline's own resize (lanczos3, antialiased), so the model sees frames as in training
        images = np.stack(
            [
                o["frames"]["image"]
                if o["frames"]["image"].shape[0] == size
                else resize_uint8(o["frames"]["image"], size)
                for o in observations
            ]
        )
        actions = self.policy.predict_action_batch(images, list(instructions), self.unnorm_key)
        return list(actions[:, : self.action_dim])  # the current step's action of a chunk


class ExpertPolicy:
    """Meta-World's scripted expert for each task, acting inside the simulator worker."""

    needs_frames = False

    def act(self, observations, instructions, trials, steps):
        return [None] * len(observations)


class ReplayPolicy:
    """Plays back the 7-D `action` of each recorded episode of a metaworld_mt10 dataset, open loop, from
    that episode's own seed (after the last recorded step it holds still with the gripper as it was)."""

    needs_frames = False

    def __init__(self, data_root_dir: str | Path, split: str = "train"):
        from vla_train.data.tf_setup import tfds

        directory = dataset_dir(data_root_dir)
        if not (directory / "dataset_info.json").is_file():
            raise FileNotFoundError(
                f"no {DATASET_NAME} dataset under {data_root_dir} ({directory}); write one with vla-data metaworld"
            )
        builder = tfds.builder_from_directory(str(directory))
        self.actions: dict[tuple[str, int], np.ndarray] = {}
        observation = builder.info.features["steps"]["observation"]
        skip = {k: tfds.decode.SkipDecoding() for k in observation.keys() if "image" in k}  # no JPEG decode
        ds = builder.as_dataset(split=split, decoders={"steps": {"observation": skip}})
        for episode in ds:  # eager: each episode's steps are a nested dataset
            meta = episode["episode_metadata"]
            key = (meta["task"].numpy().decode(), int(meta["seed"]))
            self.actions[key] = np.stack([s["action"].numpy() for s in episode["steps"]]).astype(np.float32)

    def seeds(self, tasks: list[str]) -> dict[str, list[int]]:
        return {t: sorted(s for task, s in self.actions if task == t) for t in tasks}

    def act(self, observations, instructions, trials, steps):
        out = []
        for trial, t in zip(trials, steps):
            recorded = self.actions[(trial.task, trial.seed)]
            if t < len(recorded):
                out.append(recorded[t])
            else:
                out.append(np.array([0, 0, 0, 0, 0, 0, recorded[-1, 6]], np.float32))
        return out


def load_policy(spec: str, unnorm_key: str = "", device: str = "cpu"):
    """'expert', 'replay:<data_root_dir>', an exported model directory (config.json), or a vla-train run
    directory (its newest checkpoint, adapters unmerged). Returns (policy, a description for results)."""
    if spec == "expert":
        return ExpertPolicy(), {"kind": "expert"}
    if spec.startswith("replay:"):
        root = spec.removeprefix("replay:")
        return ReplayPolicy(root), {"kind": "replay", "data_root_dir": root}
    path = Path(spec)
    from vla_train.models.policy import VLAPolicy

    if (path / "config.yaml").is_file():  # a training run
        from vla_train.export import load_run_config, load_trained
        from vla_train.training.checkpoint import latest_checkpoint

        train_cfg = load_run_config(path)
        ckpt = latest_checkpoint(path)
        model, processor = load_trained(path, train_cfg, ckpt)
        vla = VLAPolicy(model.to(device), processor)
        return ModelPolicy(vla, unnorm_key), {"kind": "run", "run_dir": str(path), "checkpoint": str(ckpt)}
    if (path / "config.json").is_file():
        vla = VLAPolicy.from_dir(path, device)
        info = {"kind": "model_dir", "model_dir": str(path)}
        report = path / "export_report.json"
        if report.is_file():
            info["checkpoint"] = json.loads(report.read_text()).get("checkpoint")
        return ModelPolicy(vla, unnorm_key), info
    raise FileNotFoundError(
        f"policy '{spec}' is neither a model directory (config.json), a run directory (config.yaml), "
        "'expert' nor 'replay:<data_root_dir>'"
    )
