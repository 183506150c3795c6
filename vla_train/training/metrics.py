"""Action-token accuracy, action L1 and loss from a forward's supervised-position logits (OpenVLA's
metrics): predictions are the argmax; only action-token labels count for accuracy and L1 (EOS and ignored
positions do not), every supervised position (actions + EOS) counts for the loss.

Everything is kept as sums (never means) so that micro-batches, steps and ranks add up exactly: the
trainer sums the dictionaries over ranks and `finalize` divides once. With `dataset_names`, the same sums
are kept per dataset (`ds/<name>/...`) and `finalize` reports them when more than one dataset was seen.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vla_train.data.normalize import unnormalize
from vla_train.models.action_tokenizer import ActionTokenizer
from vla_train.models.vla import VLAOutput

DS_PREFIX = "ds/"
TASK_PREFIX = "task/"  # sums per instruction (validation)
MAX_REPORTED_TASKS = 50  # per-instruction metrics are reported when validation saw at most this many


def _core_sums(
    logits_NV: torch.Tensor,
    labels_N: torch.Tensor,
    token_loss_N: torch.Tensor | None,
    action_tokenizer: ActionTokenizer,
    statistics: dict | None = None,
) -> dict:
    """Sums of some supervised positions; with one dataset's `statistics` (stats + normalization) also
    the L1 in physical units."""
    pred = logits_NV.argmax(-1)
    mask = action_tokenizer.is_action_token(labels_N)
    n = int(mask.sum())
    pred_np = action_tokenizer.decode(pred[mask].cpu().numpy())
    true_np = action_tokenizer.decode(labels_N[mask].cpu().numpy())
    sums = {
        "n_tok": int(labels_N.numel()),
        "n": n,
        "correct": int((pred[mask] == labels_N[mask]).sum()),
        "l1_sum": float(np.abs(pred_np - true_np).sum()),
    }
    if token_loss_N is not None:
        sums["loss_sum"] = float(token_loss_N.sum())
    if statistics is not None and n:
        stats, mode = statistics["action"], statistics.get("normalization", "bounds_q99")
        A = len(stats["q01"])
        if n % A == 0:  # whole actions (or chunk steps) supervised
            phys_p = unnormalize(pred_np.reshape(-1, A), stats, mode)
            phys_t = unnormalize(true_np.reshape(-1, A), stats, mode)
            sums["l1_phys_sum"] = float(np.abs(phys_p - phys_t).sum())
            correct = (pred[mask] == labels_N[mask]).cpu().numpy().reshape(-1, A)
            sums.update(_per_dim_sums(correct, np.abs(pred_np - true_np).reshape(-1, A), stats, ""))
    return sums


def varying_dims(action_stats: dict) -> np.ndarray:
    """The action dimensions whose value changes in the dataset (max > min). A constant dimension (the
    rotation of a robot that never turns) is predicted right from the first steps on and would inflate
    the accuracy over all dimensions."""
    high = action_stats["max"] if "max" in action_stats else action_stats["q99"]
    low = action_stats["min"] if "min" in action_stats else action_stats["q01"]
    return np.asarray(high, np.float64) > np.asarray(low, np.float64)


def _per_dim_sums(correct_RA: np.ndarray, l1_RA: np.ndarray, action_stats: dict, prefix: str) -> dict:
    """Sums per action dimension (`<prefix>dim<d>_...`) and over the dimensions that vary."""
    out = {}
    for d in range(correct_RA.shape[1]):
        out[f"{prefix}dim{d}_n"] = int(correct_RA.shape[0])
        out[f"{prefix}dim{d}_correct"] = int(correct_RA[:, d].sum())
        out[f"{prefix}dim{d}_l1_sum"] = float(l1_RA[:, d].sum())
    varying = varying_dims(action_stats)
    out[f"{prefix}varying_n"] = int(correct_RA.shape[0] * varying.sum())
    out[f"{prefix}varying_correct"] = int(correct_RA[:, varying].sum())
    return out


@torch.no_grad()
def action_metrics(
    out: VLAOutput,
    action_tokenizer: ActionTokenizer,
    dataset_names: list[str] | None = None,
    statistics: dict | None = None,
    instructions: list[str] | None = None,
) -> dict:
    """Sums of one forward (see the module docstring); `dataset_names[b]` names batch row b's dataset.

    With `instructions` (and dataset_names) the sums are also kept per instruction (`task/<text>/...`).
    With statistics, accuracy and L1 are also summed per action dimension, and accuracy over the
    dimensions that vary in their dataset (varying_dims).

    With dataset_names the sums are also kept per dataset, and with `statistics` ({dataset: stats +
    normalization}, the run's norm_stats) the physical L1 is added, each frame unnormalized with its own
    dataset's statistics. Without dataset_names nothing is split (the cheap path for a one-dataset run).
    """
    if out.logits_NV is None:  # the l1_parallel head: supervised chunk steps are the rows
        keep = out.action_mask_BK.to(torch.bool).cpu()
        pred = out.actions_pred_BKA.detach().float().cpu()[keep].numpy()
        true = out.actions_BKA.detach().float().cpu()[keep].numpy()
        rows = keep.nonzero(as_tuple=True)[0].numpy()

        def core(sel, stats=None, with_loss=True):
            return _l1_core_sums(pred[sel], true[sel], action_tokenizer, stats)

    else:
        logits = out.logits_NV.detach().float()
        rows = out.sample_index_N.cpu().numpy()
        token_loss = None

        def core(sel, stats=None, with_loss=True):
            nonlocal token_loss
            if token_loss is None and with_loss:
                token_loss = F.cross_entropy(logits, out.labels_N, reduction="none")
            if isinstance(sel, np.ndarray):
                sel = torch.as_tensor(sel, device=logits.device)
            loss = token_loss[sel] if with_loss else None
            return _core_sums(logits[sel], out.labels_N[sel], loss, action_tokenizer, stats)

    sums = core(slice(None), with_loss=False)
    # The model's own mean loss, weighted by its count: what the optimizer saw.
    sums["loss_sum"] = float(out.loss.detach()) * sums["n_tok"]
    if dataset_names is not None:
        names = np.asarray(dataset_names, dtype=object)[rows] if len(rows) else np.asarray([], dtype=object)
        for name in sorted(set(names.tolist())):
            stats = statistics[name] if statistics is not None else None
            part = core(names == name, stats)
            for k in [k for k in part if k in _OVER_DATASETS or k.startswith(("dim", "varying_"))]:
                sums[k] = sums.get(k, 0) + part.pop(k)  # summed over datasets, not kept per dataset
            for k, v in part.items():
                sums[f"{DS_PREFIX}{name}/{k}"] = v
        if instructions is not None:
            texts = (
                np.asarray(instructions, dtype=object)[rows] if len(rows) else np.asarray([], dtype=object)
            )
            for text in sorted(set(texts.tolist())):
                part = core(texts == text)
                for k, v in part.items():
                    sums[f"{TASK_PREFIX}{text}/{k}"] = v
    return sums


def _l1_core_sums(
    pred_RA: np.ndarray, true_RA: np.ndarray, action_tokenizer: ActionTokenizer, statistics: dict | None
) -> dict:
    """The l1_parallel head's sums over R supervised chunk steps, under the token head's names: `correct`
    counts the values that fall in the right one of the 256 bins (comparable with the token head's
    accuracy), l1_sum the continuous normalized L1 (also the loss), l1_phys_sum the physical L1."""
    abs_RA = np.abs(pred_RA - true_RA)
    correct = action_tokenizer.encode(pred_RA) == action_tokenizer.encode(true_RA)
    sums = {
        "n_tok": int(abs_RA.size),
        "n": int(abs_RA.size),
        "correct": int(correct.sum()),
        "l1_sum": float(abs_RA.sum()),
        "loss_sum": float(abs_RA.sum()),
    }
    if statistics is not None and abs_RA.size:
        stats, mode = statistics["action"], statistics.get("normalization", "bounds_q99")
        phys = np.abs(unnormalize(pred_RA, stats, mode) - unnormalize(true_RA, stats, mode))
        sums["l1_phys_sum"] = float(phys.sum())
        sums.update(_per_dim_sums(correct, abs_RA, stats, ""))
    return sums


_OVER_DATASETS = ("l1_phys_sum",)


def generated_metrics(
    tokens_BA: np.ndarray,
    actions_BA: np.ndarray,
    action_tokenizer: ActionTokenizer,
    dataset_names: list[str] | None = None,
    statistics: dict | None = None,
    instructions: list[str] | None = None,
) -> dict:
    """Sums comparing greedily generated action tokens with the true (normalized) actions' tokens; with
    dataset_names and statistics also per dimension and over the varying ones (`gen_dim<d>_...`,
    `gen_varying_...`), with instructions also per instruction."""
    true = action_tokenizer.encode(actions_BA)
    l1 = np.abs(action_tokenizer.decode(tokens_BA) - action_tokenizer.decode(true))
    correct = tokens_BA == true
    sums = {"gen_n": int(true.size), "gen_correct": int(correct.sum()), "gen_l1_sum": float(l1.sum())}
    if dataset_names is not None and statistics is not None:
        names = np.asarray(dataset_names, dtype=object)
        for name in sorted(set(names.tolist())):
            rows = names == name
            accumulate(sums, _per_dim_sums(correct[rows], l1[rows], statistics[name]["action"], "gen_"))
    if instructions is not None:
        texts = np.asarray(instructions, dtype=object)
        for text in sorted(set(texts.tolist())):
            rows = texts == text
            sums[f"{TASK_PREFIX}{text}/gen_n"] = int(correct[rows].size)
            sums[f"{TASK_PREFIX}{text}/gen_correct"] = int(correct[rows].sum())
    return sums


def accumulate(total: dict, new: dict) -> dict:
    for k, v in new.items():
        total[k] = total.get(k, 0) + v
    return total


def _finalize_core(sums: dict, prefix: str, key: str = "") -> dict:
    n = max(sums.get(key + "n", 0), 1)
    out = {
        f"{prefix}/loss": sums.get(key + "loss_sum", 0.0) / max(sums.get(key + "n_tok", 0), 1),
        f"{prefix}/action_token_accuracy": sums.get(key + "correct", 0) / n,
        f"{prefix}/action_l1": sums.get(key + "l1_sum", 0.0) / n,
    }
    return out


def finalize(sums: dict, prefix: str) -> dict:
    """Means from sums: loss per supervised token, accuracy and L1 per action token."""
    out = _finalize_core(sums, prefix)
    n = max(sums.get("n", 0), 1)
    if sums.get("gen_n"):
        out[f"{prefix}/generated_action_token_accuracy"] = sums["gen_correct"] / sums["gen_n"]
        out[f"{prefix}/generated_action_l1"] = sums["gen_l1_sum"] / sums["gen_n"]
    if "l1_phys_sum" in sums:
        out[f"{prefix}/action_l1_physical"] = sums["l1_phys_sum"] / n
    datasets = sorted({k[len(DS_PREFIX) :].rsplit("/", 1)[0] for k in sums if k.startswith(DS_PREFIX)})
    if len(datasets) > 1:
        for name in datasets:
            out.update(_finalize_core(sums, f"{prefix}/{name}", f"{DS_PREFIX}{name}/"))
    for g, label in (("", ""), ("gen_", "generated_")):
        d = 0
        while f"{g}dim{d}_n" in sums:
            n_d = max(sums[f"{g}dim{d}_n"], 1)
            out[f"{prefix}/dim{d}/{label}action_token_accuracy"] = sums[f"{g}dim{d}_correct"] / n_d
            out[f"{prefix}/dim{d}/{label}action_l1"] = sums[f"{g}dim{d}_l1_sum"] / n_d
            d += 1
        if sums.get(f"{g}varying_n"):
            out[f"{prefix}/{label}action_token_accuracy_varying_dims"] = (
                sums[f"{g}varying_correct"] / sums[f"{g}varying_n"]
            )
    tasks = sorted({k[len(TASK_PREFIX) :].rsplit("/", 1)[0] for k in sums if k.startswith(TASK_PREFIX)})
    if 1 < len(tasks) <= MAX_REPORTED_TASKS:
        for text in tasks:
            key = f"{TASK_PREFIX}{text}/"
            out.update(_finalize_core(sums, f"{prefix}/task/{text}", key))
            if sums.get(key + "gen_n"):
                out[f"{prefix}/task/{text}/generated_action_token_accuracy"] = (
                    sums[key + "gen_correct"] / sums[key + "gen_n"]
                )
    return out
