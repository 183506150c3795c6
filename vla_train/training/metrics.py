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
    return sums


@torch.no_grad()
def action_metrics(
    out: VLAOutput,
    action_tokenizer: ActionTokenizer,
    dataset_names: list[str] | None = None,
    statistics: dict | None = None,
) -> dict:
    """Sums of one forward (see the module docstring); `dataset_names[b]` names batch row b's dataset.

    With dataset_names the sums are also kept per dataset, and with `statistics` ({dataset: stats +
    normalization}, the run's norm_stats) the physical L1 is added, each frame unnormalized with its own
    dataset's statistics. Without dataset_names nothing is split (the cheap path for a one-dataset run).
    """
    logits = out.logits_NV.detach().float()
    sums = _core_sums(logits, out.labels_N, None, action_tokenizer)
    # The model's own mean loss, weighted by its token count: what the optimizer saw.
    sums["loss_sum"] = float(out.loss.detach()) * sums["n_tok"]
    if dataset_names is not None:
        token_loss = F.cross_entropy(logits, out.labels_N, reduction="none")
        rows = out.sample_index_N.cpu().numpy()
        names = np.asarray(dataset_names, dtype=object)[rows] if len(rows) else np.asarray([], dtype=object)
        for name in sorted(set(names.tolist())):
            sel = torch.as_tensor(names == name, device=logits.device)
            stats = statistics[name] if statistics is not None else None
            part = _core_sums(logits[sel], out.labels_N[sel], token_loss[sel], action_tokenizer, stats)
            if "l1_phys_sum" in part:
                sums["l1_phys_sum"] = sums.get("l1_phys_sum", 0.0) + part.pop("l1_phys_sum")
            for k, v in part.items():
                sums[f"{DS_PREFIX}{name}/{k}"] = v
    return sums


def generated_metrics(
    tokens_BA: np.ndarray, actions_BA: np.ndarray, action_tokenizer: ActionTokenizer
) -> dict:
    """Sums comparing greedily generated action tokens with the true (normalized) actions' tokens."""
    true = action_tokenizer.encode(actions_BA)
    return {
        "gen_n": int(true.size),
        "gen_correct": int((tokens_BA == true).sum()),
        "gen_l1_sum": float(np.abs(action_tokenizer.decode(tokens_BA) - action_tokenizer.decode(true)).sum()),
    }


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
    return out
