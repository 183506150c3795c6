"""vla-data inspect NAME: what a registered dataset holds, as the pipeline reads it (standardized), in
numbers and pictures, written to a folder:

    summary.json / summary.md   episodes and steps per split, instructions (counts), the action and proprio
                                statistics per dimension (the cached ones training uses)
    contact_sheet.png           frames of the first episodes (primary camera; wrist beside it when the
                                dataset has one), each row titled with its episode's instruction
    actions.png                 each action dimension over the first episode, one panel per dimension
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from vla_train.config import InspectConfig

THUMB = 96  # pixels per frame on the contact sheet


def _episodes(cfg: InspectConfig, builder, split: str, cameras: tuple[str, ...]) -> list[dict]:
    from vla_train.data.pipeline import decode_frame
    from vla_train.data.rlds import EpisodeOrder, read_episodes

    ds = read_episodes(
        builder, split, EpisodeOrder(train=False, seed=0), dataset_name=cfg.data.dataset_name, cameras=cameras
    )
    out = []
    for traj in ds.take(cfg.episodes).as_numpy_iterator():
        T = len(traj["action"])
        picks = np.unique(np.linspace(0, T - 1, min(cfg.frames, T)).round().astype(int))
        frames = {}
        for role in cameras:
            data = traj["observation"][f"image_{role}"]
            if all(len(data[i]) for i in picks):
                frames[role] = [decode_frame(data[i], may_be_missing=False)[0].numpy() for i in picks]
        text = next((t.decode() for t in traj["task"]["language_instruction"] if t), "(no instruction)")
        out.append({"instruction": text, "action": traj["action"], "frames": frames, "steps": picks})
    return out


def _contact_sheet(episodes: list[dict], path: Path) -> None:
    from PIL import Image, ImageDraw

    cams = sorted(
        {role for ep in episodes for role in ep["frames"]}, key=["primary", "wrist", "secondary"].index
    )
    cols = max(len(ep["steps"]) for ep in episodes)
    title, pad = 16, 4
    width = cols * len(cams) * (THUMB + pad) + pad
    height = len(episodes) * (THUMB + title + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, ep in enumerate(episodes):
        y = pad + r * (THUMB + title + pad)
        draw.text((pad, y), f"{r}: {ep['instruction']}"[:120], fill=(0, 0, 0))
        x = pad
        for c in range(cols):
            for role in cams:
                images = ep["frames"].get(role, [])
                if c < len(images):
                    sheet.paste(Image.fromarray(images[c]).resize((THUMB, THUMB)), (x, y + title))
                x += THUMB + pad
    sheet.save(path)


def _action_plot(episode: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    action = episode["action"].reshape(len(episode["action"]), -1)
    dims = action.shape[1]
    fig, axes = plt.subplots(dims, 1, figsize=(7, 1.3 * dims + 0.6), sharex=True, squeeze=False)
    for d in range(dims):
        axes[d][0].plot(action[:, d], lw=1.2)
        axes[d][0].set_ylabel(f"dim {d}", fontsize=8)
    axes[-1][0].set_xlabel("step")
    fig.suptitle(f"actions over episode 0: {episode['instruction']}"[:90], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _stats_table(stats: dict) -> list[str]:
    lines = [
        "| field | dim | mean | std | min | q01 | q99 | max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for field in ("action", "proprio"):
        s = stats.get(field)
        if not s:
            continue
        for d in range(len(s["mean"])):
            values = " | ".join(f"{s[k][d]:.4g}" for k in ("mean", "std", "min", "q01", "q99", "max"))
            lines.append(f"| {field} | {d} | {values} |")
    return lines


def inspect_dataset(cfg: InspectConfig) -> dict:
    """Write the summary and the pictures of cfg.data.dataset_name to cfg.out; returns the summary."""
    from vla_train.data.mixture import run_datasets
    from vla_train.data.registry import get_dataset_spec
    from vla_train.data.rlds import get_statistics, open_builder
    from vla_train.data.tf_setup import tfds

    d = cfg.data
    run_datasets(d)  # registers the user's registry_files
    builder = open_builder(d.data_root_dir, d.dataset_name)
    stats = get_statistics(d.data_root_dir, d.dataset_name, d.stats_cache_dir, d.on_bad_data)
    splits = {name: {"episodes": info.num_examples} for name, info in builder.info.splits.items()}
    split = "train" if "train" in splits else next(iter(splits))
    instructions = Counter()
    for ep in builder.as_dataset(split=split, decoders={"steps": tfds.decode.SkipDecoding()}):
        texts = {t for t in ep["steps"]["language_instruction"].numpy() if t}
        instructions.update(t.decode() for t in texts)
    spec = get_dataset_spec(d.dataset_name)
    cameras = tuple(r for r in ("primary", "wrist", "secondary") if spec.image_obs_keys.get(r))
    episodes = _episodes(cfg, builder, split, cameras)
    out = Path(cfg.out or f"runs/inspect_{d.dataset_name}")
    out.mkdir(parents=True, exist_ok=True)
    _contact_sheet(episodes, out / "contact_sheet.png")
    _action_plot(episodes[0], out / "actions.png")
    summary = {
        "dataset": d.dataset_name,
        "path": str(builder.data_dir),
        "splits": splits,
        "num_transitions": stats["num_transitions"],
        "num_trajectories": stats["num_trajectories"],
        "cameras": list(cameras),
        "instructions": dict(instructions.most_common()),
        "num_instructions": len(instructions),
        "statistics": {k: stats[k] for k in ("action", "proprio") if k in stats},
        "pictures": [str(out / "contact_sheet.png"), str(out / "actions.png")],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    md = [
        f"# {d.dataset_name}",
        "",
        f"{builder.data_dir}: "
        + ", ".join(f"{k} {v['episodes']} episodes" for k, v in splits.items())
        + f", {stats['num_transitions']} steps (statistics over all splits)",
        "",
    ]
    md += ["| instruction | episodes |", "| --- | --- |"] + [
        f"| {t} | {n} |" for t, n in instructions.most_common(50)
    ]
    md += ["", *_stats_table(stats), "", "![frames](contact_sheet.png)", "", "![actions](actions.png)", ""]
    (out / "summary.md").write_text("\n".join(md))
    return summary
