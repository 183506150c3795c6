"""What vla-eval can run: a trained model (an exported model directory, or a run's newest checkpoint),
the scripted experts (Meta-World's own, live), or a replay of a dataset's recorded actions (a check of
the data and the action mapping: it must score 100% on the seeds it was recorded from).

Every policy answers `act(observations, instructions, trials, steps)` with one 7-D OpenVLA-layout action
per observation (None: the worker's expert acts) and says whether it looks at frames (`needs_frames`). A
model that predicts chunks executes them (ModelPolicy.execute_steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vla_train.sim.demos import DATASET_NAME, dataset_dir


class ModelPolicy:
    """A VLA: the frames of its cameras + the task's instruction (+ the proprio state) -> the current
    step's action. A model that predicts chunks of K actions is queried once per `execute_steps` steps
    of a trial (0 = K: the whole chunk open loop, as OpenVLA-OFT executes it); the rest of the chunk is
    played from a queue without looking at the frames."""

    needs_frames = True

    def __init__(self, vla_policy, unnorm_key: str = "", execute_steps: int = 0):
        self.policy = vla_policy
        stats = vla_policy.model.config.norm_stats or {}
        if unnorm_key:
            self.unnorm_key = unnorm_key
        elif DATASET_NAME in stats:
            self.unnorm_key = DATASET_NAME
        else:
            self.unnorm_key = None  # the only dataset, or a clear error from VLAPolicy
        config = vla_policy.model.config
        self.action_dim, self.chunk_size = config.action_dim, config.chunk_size
        if execute_steps > config.chunk_size:
            raise ValueError(
                f"execute_steps: {execute_steps} is more than the {config.chunk_size} actions this model "
                "predicts per query (0 = all of them)"
            )
        self.execute_steps = execute_steps or config.chunk_size
        self.cameras = vla_policy.processor.cameras  # what the simulator must render
        self.queues: dict[tuple, list[np.ndarray]] = {}
        self.queries = 0  # frames the model saw: one per executed chunk
        self.last_query_size = 0  # frames of the last act() that went to the model

    def _frames(self, observations, key: str) -> np.ndarray:
        from vla_train.data.image_ops import resize_uint8

        size = self.policy.processor.settings.image_size
        out = []
        for o in observations:
            if key not in o["frames"]:
                raise ValueError(
                    f"the policy reads the {key} camera, which the simulator does not render (only the "
                    "primary and, for a model that reads it, the wrist camera are)"
                )
            frame = o["frames"][key]
            # the training pipeline's own resize (lanczos3, antialiased), so the model sees frames as in training
            out.append(frame if frame.shape[0] == size else resize_uint8(frame, size))
        return np.stack(out)

    def _query(self, observations, instructions) -> np.ndarray:
        """[B, K, A] actions of the observations' frames."""
        roles = self.policy.processor.cameras
        if roles == ("primary",):
            images = self._frames(observations, "image")
        else:
            keys = {"primary": "image", "wrist": "wrist_image"}
            images = {r: self._frames(observations, keys.get(r, f"{r}_image")) for r in roles}
        proprio = np.stack([o["state"] for o in observations]) if self.policy.processor.proprio_dim else None
        actions = self.policy.predict_action_batch(
            images, list(instructions), self.unnorm_key, proprio=proprio
        )
        self.queries += len(observations)
        return actions[:, None] if actions.ndim == 2 else actions

    def act(self, observations, instructions, trials, steps):
        keys = [(t.task, t.seed, t.index) for t in trials]
        for key, step in zip(keys, steps):
            if step == 0:
                self.queues.pop(key, None)  # a new trial (or the same one again)
        need = [i for i, key in enumerate(keys) if not self.queues.get(key)]
        self.last_query_size = len(need)
        if need:
            chunks = self._query([observations[i] for i in need], [instructions[i] for i in need])
            for i, chunk in zip(need, chunks):
                self.queues[keys[i]] = list(chunk[: self.execute_steps, : self.action_dim])
        return [self.queues[key].pop(0) for key in keys]


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


def load_policy(spec: str, unnorm_key: str = "", device: str = "cpu", execute_steps: int = 0):
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
        info = {"kind": "run", "run_dir": str(path), "checkpoint": str(ckpt)}
        return ModelPolicy(vla, unnorm_key, execute_steps), info
    if (path / "config.json").is_file():
        vla = VLAPolicy.from_dir(path, device)
        info = {"kind": "model_dir", "model_dir": str(path)}
        report = path / "export_report.json"
        if report.is_file():
            info["checkpoint"] = json.loads(report.read_text()).get("checkpoint")
        return ModelPolicy(vla, unnorm_key, execute_steps), info
    raise FileNotFoundError(
        f"policy '{spec}' is neither a model directory (config.json), a run directory (config.yaml), "
        "'expert' nor 'replay:<data_root_dir>'"
    )
