"""Prompt text, BOS/empty-piece handling and label masking (OpenVLA's conventions)."""

from __future__ import annotations

import numpy as np
import torch

from vla_train.models.action_tokenizer import ActionTokenizer
from vla_train.models.processor import ProcessorSettings, VLAProcessor
from vla_train.models.prompting import IGNORE_INDEX, PromptBuilder, prompt_text
from vla_train.models.tokenizer import EMPTY_PIECE, build_local_tokenizer, empty_piece_id


def test_prompt_text():
    assert prompt_text("Pick Up the Red Block") == (
        "In: What action should the robot take to pick up the red block?\nOut: "
    )


def tokenizer():
    return build_local_tokenizer(["pick up the red block", "open the drawer"], 256, 256)


def test_local_tokenizer_layout():
    t = tokenizer()
    base = len(t) - 1
    assert (t.unk_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2)
    assert t.pad_token_id == base  # pad right after the base vocabulary, like OpenVLA's 32000
    assert (
        t.convert_ids_to_tokens(base - 256) == "<act_0>" and t.convert_ids_to_tokens(base - 1) == "<act_255>"
    )
    assert t.convert_ids_to_tokens(empty_piece_id(t)) == EMPTY_PIECE
    # instruction text never produces action ids
    ids = t(prompt_text("open the drawer quickly, then pick up the red block")).input_ids
    assert max(ids) < base - 256 and ids[0] == t.bos_token_id


def test_training_example_masks_everything_but_actions_and_eos():
    t = tokenizer()
    at = ActionTokenizer(len(t) - 1)
    pb = PromptBuilder(t, empty_piece_id(t))
    actions = np.array([-1.0, 0.0, 1.0, 0.5, -0.5, 0.25, 1.0])
    input_ids, labels = pb.training_example("Pick up the red block", at.encode(actions))
    prompt = t(prompt_text("pick up the red block")).input_ids
    if prompt[-1] != empty_piece_id(t):
        prompt = prompt + [empty_piece_id(t)]
    assert input_ids == prompt + at.encode(actions).tolist() + [t.eos_token_id]
    assert input_ids[-9] == empty_piece_id(t)  # the empty piece right before the 7 action tokens
    assert labels[:-8] == [IGNORE_INDEX] * (len(input_ids) - 8)
    assert labels[-8:] == input_ids[-8:]


def test_collate_right_pads_and_masks():
    t = tokenizer()
    proc = VLAProcessor(t, ProcessorSettings(image_size=16), empty_piece_id(t), 256)
    images = np.zeros((2, 16, 16, 3), np.uint8)
    batch = proc.collate(images, ["open the drawer", "pick up the red block please now"], np.zeros((2, 7)))
    ids, mask, labels = batch["input_ids_BL"], batch["attention_mask_BL"], batch["labels_BL"]
    assert torch.equal(mask, (ids != t.pad_token_id).long())
    short = int(mask[0].sum())
    assert short < ids.shape[1] and (ids[0, short:] == t.pad_token_id).all()
    assert (labels[0, short:] == IGNORE_INDEX).all() and (labels != IGNORE_INDEX).sum(1).tolist() == [8, 8]
    assert batch["pixel_values_BCHW"].shape == (2, 6, 16, 16)
    # black pixels: DINOv2 channels -mean/std, SigLIP channels -1
    px = batch["pixel_values_BCHW"][0, :, 0, 0]
    assert torch.allclose(px[:3], torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))
    assert torch.allclose(px[3:], torch.full((3,), -1.0))


def test_pixel_values_reject_wrong_channels():
    t = tokenizer()
    proc = VLAProcessor(t, ProcessorSettings(image_size=16), empty_piece_id(t), 256)
    try:
        proc.pixel_values(np.zeros((1, 16, 16, 4), np.uint8))
    except ValueError as e:
        assert "[batch, height, width, 3]" in str(e)
    else:
        raise AssertionError("4-channel images were accepted")
