"""Validation: one ordered pass over the first frames of the validation split, with OpenVLA's
teacher-forced metrics and the greedy-decoding ones (what `predict_action` would output), summed over
ranks so that the result does not depend on the world size."""

from __future__ import annotations

import math
from typing import Any

import torch

from vla_train.data.stream import FrameStream, StreamSpec
from vla_train.models.processor import VLAProcessor
from vla_train.runs import current_action, model_inputs
from vla_train.training.distributed import DistContext, autocast, reshard, sum_over_ranks
from vla_train.training.metrics import accumulate, action_metrics, finalize, generated_metrics


def _rows(batch: dict[str, Any], rows: slice) -> dict[str, Any]:
    return {k: v[rows] for k, v in batch.items()}


def _evaluate_batch(vla, processor: VLAProcessor, batch: dict[str, Any], statistics: dict, ctx: DistContext):
    """The sums of one validation batch: teacher-forced and generated metrics, with the inference
    preprocessing (the processor's centre crop, as the exported policy sees images)."""
    inputs = model_inputs(processor, batch, train=False)
    with autocast(ctx):
        out = vla(**{k: v.to(ctx.device) for k, v in inputs.items()})
        if out.actions_pred_BKA is not None:  # l1_parallel: the forward is already what inference outputs
            tokens = processor.action_tokenizer.encode(out.actions_pred_BKA[:, 0].float().cpu().numpy())
        else:
            extra = {k: inputs[k].to(ctx.device) for k in ("proprio_BP", "image_mask_BN") if k in inputs}
            generated = vla.predict_action_tokens(
                processor.inference_prompts(batch["instruction"]),
                inputs["pixel_values_BCHW"].to(ctx.device),
                **extra,
            )
            tokens = generated.cpu().numpy()[:, : vla.config.action_dim]
    sums: dict[str, Any] = {}
    names, texts = batch["dataset_name"], batch["instruction"]
    accumulate(sums, action_metrics(out, processor.action_tokenizer, names, statistics, texts))
    # the first action of what inference outputs, compared with the frame's own (a chunk's first)
    accumulate(
        sums,
        generated_metrics(
            tokens, current_action(batch), processor.action_tokenizer, names, statistics, texts
        ),
    )
    sums["frames"] = len(batch["instruction"])
    return sums


@torch.no_grad()
def validate(
    vla: torch.nn.Module,
    processor: VLAProcessor,
    spec: StreamSpec,
    statistics: dict,
    num_frames: int,
    ctx: DistContext,
) -> dict:
    """Metrics of the first `num_frames` frames (all of them when negative) of the validation stream
    `spec` (every dataset of a mixture, interleaved at the mixture's weights), as `val/...`. Call on every
    rank.

    statistics: {dataset_name: statistics} of the run; physical errors use each frame's own.

    Every rank reads the same ordered frames and evaluates every world_size-th batch; ranks without a
    batch in the last round evaluate a discarded one, so that all ranks run the same number of forwards
    (FSDP gathers parameters collectively). The sums are added over ranks: the result does not depend on
    the world size.

    Besides the teacher-forced metrics (OpenVLA's: each action token predicted from the true previous
    ones), greedy decoding gives `val/generated_*`: what `predict_action` would output. Teacher forcing
    leaks information (once the true first tokens are given, later ones may follow from them), so only
    the generated metrics show what a policy knows on its own.
    """
    if num_frames == 0:
        return {}
    was_training = vla.training
    vla.eval()
    sums: dict[str, Any] = {}
    seen, count, mine, first = 0, 0, 0, None
    whole = num_frames < 0  # the whole split: the ordered pass ends by itself
    for batch in FrameStream(spec, statistics):
        if not whole:
            batch = _rows(batch, slice(0, min(len(batch["instruction"]), num_frames - seen)))
        first = batch if first is None else first
        if count % ctx.world_size == ctx.rank:
            accumulate(sums, _evaluate_batch(vla, processor, batch, statistics, ctx))
            mine += 1
        count += 1
        seen += len(batch["instruction"])
        if not whole and seen >= num_frames:
            break
    for _ in range(math.ceil(count / ctx.world_size) - mine):
        _evaluate_batch(vla, processor, first, statistics, ctx)  # keeps the forwards collective
    reshard(vla)
    vla.train(was_training)
    total = sum_over_ranks(sums, ctx)
    return {**finalize(total, "val"), "val/num_frames": int(total.get("frames", 0))}
