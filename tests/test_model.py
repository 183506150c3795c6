"""The VLA model: supervised-position logits, batched prediction, save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_train.config import ModelConfig
from vla_train.models.load import build_from_config, load_model_dir, save_model_dir
from vla_train.models.policy import VLAPolicy

TINY = ModelConfig(image_size=32, patch_size=8, dino_hidden_size=32, dino_num_layers=2, dino_num_heads=2,
                   siglip_hidden_size=32, siglip_num_layers=2, siglip_num_heads=2, llm_hidden_size=64,
                   llm_num_layers=2, llm_num_heads=2, llm_intermediate_size=128, max_length=128)
INSTRUCTIONS = ["pick up the red block", "open the drawer", "push the blue cube to the left"]


@pytest.fixture(scope="module")
def built():
    model, proc = build_from_config(TINY, INSTRUCTIONS, seed=0)
    model.config.norm_stats = {"ds": {"action": {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [1.0],
                                                 "mask": [True] * 6 + [False]}}}
    return model.eval(), proc


def batch(proc, n=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return images, proc.collate(images, INSTRUCTIONS[:n], rng.uniform(-1, 1, (n, 7)))


def test_vision_features_are_second_to_last_block_without_prefix(built):
    model, proc = built
    vb = model.vision_backbone
    assert len(vb.featurizer.encoder.layer) == 1 and len(vb.fused_featurizer.encoder.layers) == 1  # of 2
    px = torch.randn(2, 6, 32, 32)
    assert vb(px).shape == (2, 16, 64)  # 16 patches, 32 + 32 features; no class/register tokens


def test_logits_only_at_supervised_positions(built):
    model, proc = built
    _, inputs = batch(proc)
    out = model(**inputs)
    assert out.logits_NV.shape[0] == 3 * 8  # 7 action tokens + EOS per sample
    assert torch.equal(out.labels_N[:8], inputs["labels_BL"][0][inputs["labels_BL"][0] != -100])
    # Reference: the full LM over [BOS, patches, text] gives the same logits at those positions.
    emb, mask, P = model._multimodal_embeddings(inputs["input_ids_BL"], inputs["attention_mask_BL"],
                                                inputs["pixel_values_BCHW"])
    full = model.language_model(inputs_embeds=emb, attention_mask=mask).logits
    lab = inputs["labels_BL"][0]
    pos = (lab[1:] != -100).nonzero().squeeze(-1) + P
    torch.testing.assert_close(out.logits_NV[:8], full[0, pos].float(), rtol=1e-4, atol=1e-4)


def test_batched_prediction_equals_per_sample(built):
    model, proc = built
    images, _ = batch(proc)
    policy = VLAPolicy(model, proc)
    together = policy.predict_tokens(images, INSTRUCTIONS)
    for i in range(3):
        assert torch.equal(policy.predict_tokens(images[i : i + 1], INSTRUCTIONS[i : i + 1])[0], together[i])
    assert together.shape == (3, 7)


def test_predict_action_unnorm_key_errors(built):
    model, proc = built
    policy = VLAPolicy(model, proc)
    image = np.zeros((32, 32, 3), np.uint8)
    assert policy.predict_action(image, "open the drawer").shape == (7,)
    with pytest.raises(ValueError, match=r"unknown unnorm_key 'x'; available: \['ds'\]"):
        policy.predict_action(image, "open the drawer", unnorm_key="x")


def test_save_load_round_trip_is_identical(built, tmp_path):
    model, proc = built
    save_model_dir(tmp_path / "m", model, proc, model.config.norm_stats)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "dataset_statistics.json"):
        assert (tmp_path / "m" / name).is_file()
    loaded, proc2 = load_model_dir(tmp_path / "m")
    images, inputs = batch(proc)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits_NV, model(**inputs).logits_NV, rtol=0, atol=0)
    assert torch.equal(VLAPolicy(loaded, proc2).predict_tokens(images, INSTRUCTIONS),
                       VLAPolicy(model, proc).predict_tokens(images, INSTRUCTIONS))
    assert loaded.config.norm_stats == model.config.norm_stats
