"""Action-token accuracy and action L1 from a forward's supervised-position logits (OpenVLA's metrics):
predictions are the argmax; only action-token labels count (EOS and ignored positions do not)."""

from __future__ import annotations

import numpy as np

from vla_train.data.normalize import unnormalize
from vla_train.models.action_tokenizer import ActionTokenizer
from vla_train.models.vla import VLAOutput


def action_metrics(
    out: VLAOutput, action_tokenizer: ActionTokenizer, action_stats: dict | None = None
) -> dict:
    """Sums (not means) so that batches and ranks can be accumulated exactly; see `finalize`."""
    pred = out.logits_NV.argmax(-1)
    mask = action_tokenizer.is_action_token(out.labels_N)
    n = int(mask.sum())
    correct = int((pred[mask] == out.labels_N[mask]).sum())
    pred_np = action_tokenizer.decode(pred[mask].cpu().numpy())
    true_np = action_tokenizer.decode(out.labels_N[mask].cpu().numpy())
    sums = {
        "loss_sum": float(out.loss.detach()),
        "batches": 1,
        "n": n,
        "correct": correct,
        "l1_sum": float(np.abs(pred_np - true_np).sum()),
    }
    if action_stats is not None and n:
        A = len(action_stats["q01"])
        if n % A == 0:  # every sample has all action_dim tokens supervised
            phys_p = unnormalize(pred_np.reshape(-1, A), action_stats)
            phys_t = unnormalize(true_np.reshape(-1, A), action_stats)
            sums["l1_phys_sum"] = float(np.abs(phys_p - phys_t).sum())
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


def finalize(sums: dict, prefix: str) -> dict:
    n = max(sums.get("n", 0), 1)
    out = {
        f"{prefix}/loss": sums.get("loss_sum", 0.0) / max(sums.get("batches", 0), 1),
        f"{prefix}/action_token_accuracy": sums.get("correct", 0) / n,
        f"{prefix}/action_l1": sums.get("l1_sum", 0.0) / n,
    }
    if sums.get("gen_n"):
        out[f"{prefix}/generated_action_token_accuracy"] = sums["gen_correct"] / sums["gen_n"]
        out[f"{prefix}/generated_action_l1"] = sums["gen_l1_sum"] / sums["gen_n"]
    if "l1_phys_sum" in sums:
        out[f"{prefix}/action_l1_physical"] = sums["l1_phys_sum"] / n
    return out
