"""The VLA model: supervised-position logits, batched prediction, save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_train.config import ModelConfig
from vla_train.models.load import build_from_config, load_model_dir, save_model_dir
from vla_train.models.policy import VLAPolicy

TINY = ModelConfig(
    image_size=32,
    patch_size=8,
    dino_hidden_size=32,
    dino_num_layers=2,
    dino_num_heads=2,
    siglip_hidden_size=32,
    siglip_num_layers=2,
    siglip_num_heads=2,
    llm_hidden_size=64,
    llm_num_layers=2,
    llm_num_heads=2,
    llm_intermediate_size=128,
    max_length=128,
)
INSTRUCTIONS = ["pick up the red block", "open the drawer", "push the blue cube to the left"]


@pytest.fixture(scope="module")
def built():
    model, proc = build_from_config(TINY, INSTRUCTIONS, seed=0)
    model.config.norm_stats = {
        "ds": {"action": {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [1.0], "mask": [True] * 6 + [False]}}
    }
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
    emb, mask, P = model._multimodal_embeddings(
        inputs["input_ids_BL"], inputs["attention_mask_BL"], inputs["pixel_values_BCHW"]
    )
    full = model.language_model(inputs_embeds=emb, attention_mask=mask).logits
    lab = inputs["labels_BL"][0]
    pos = (lab[1:] != -100).nonzero().squeeze(-1) + P
    torch.testing.assert_close(out.logits_NV[:8], full[0, pos].float(), rtol=1e-4, atol=1e-4)


def test_labelled_positions_loss_equals_the_full_logits_loss(built):
    """VLA.forward projects only the labelled positions through the LM head: its loss is the causal LM's
    loss over logits at every position (transformers' shifted cross-entropy), and its predictions (the
    argmax, what accuracy and validation use) are those of the full logits, in train and eval mode."""
    from vla_train.models.prompting import IGNORE_INDEX

    model, proc = built
    _, inputs = batch(proc)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        out = model(**inputs)
        emb, mask, P = model._multimodal_embeddings(
            inputs["input_ids_BL"], inputs["attention_mask_BL"], inputs["pixel_values_BCHW"]
        )
        labels = inputs["labels_BL"]
        full_labels = torch.cat(
            [labels[:, :1], torch.full((labels.shape[0], P), IGNORE_INDEX), labels[:, 1:]], dim=1
        )
        full = model.language_model(inputs_embeds=emb, attention_mask=mask, labels=full_labels)
        assert full.logits.shape[1] == emb.shape[1]  # every position
        torch.testing.assert_close(out.loss, full.loss, rtol=1e-6, atol=1e-6)
        keep = full_labels[:, 1:] != IGNORE_INDEX
        assert torch.equal(out.logits_NV.argmax(-1), full.logits[:, :-1][keep].argmax(-1))
        assert torch.equal(out.labels_N, full_labels[:, 1:][keep])
    model.eval()


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
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "dataset_statistics.json",
    ):
        assert (tmp_path / "m" / name).is_file()
    loaded, proc2 = load_model_dir(tmp_path / "m")
    images, inputs = batch(proc)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits_NV, model(**inputs).logits_NV, rtol=0, atol=0)
    assert torch.equal(
        VLAPolicy(loaded, proc2).predict_tokens(images, INSTRUCTIONS),
        VLAPolicy(model, proc).predict_tokens(images, INSTRUCTIONS),
    )
    assert loaded.config.norm_stats == model.config.norm_stats


def _preset_model_on_meta(preset: str):
    from vla_test_utils import REPO
    from vla_train.config import TrainConfig
    from vla_train.config_cli import parse_config
    from vla_train.models.load import vla_config_from
    from vla_train.models.tokenizer import build_local_tokenizer
    from vla_train.models.vla import VLA

    cfg = parse_config(
        TrainConfig, ["--config_path", str(REPO / "configs" / f"{preset}.yaml")], validate=False
    )
    assert cfg.model.validate() == []
    tok = build_local_tokenizer(INSTRUCTIONS, cfg.model.text_vocab_size, cfg.model.n_action_bins)
    config = vla_config_from(cfg.model, tok)
    with torch.device("meta"):
        model = VLA(config)
    return model, config, tok


def test_openvla_7b_shape_on_meta():
    from vla_train.models.vla import openvla_unused_parameters

    model, config, tok = _preset_model_on_meta("model_openvla_7b")
    built = sum(p.numel() for p in model.parameters())
    assert config.base_vocab_size == 32000 and config.pad_token_id == 32000 and len(tok) == 32001
    assert model.language_model.get_input_embeddings().weight.shape == (32064, 4096)
    assert model.vision_backbone.num_patches == 256 and model.vision_backbone.embed_dim == 2176
    # OpenVLA's checkpoint holds 7.54 B; the last tower blocks, final norms and attention pool (44 M) are
    # never used for features, so they are not built.
    assert 7.5e9 <= built + openvla_unused_parameters(config) <= 7.6e9
    assert 7.45e9 <= built < 7.5e9
    print(
        f"openvla-7b shape: {built / 1e9:.4f} B built, {(built + openvla_unused_parameters(config)) / 1e9:.4f} B as stored"
    )


def test_minivla_shape_on_meta():
    model, config, _ = _preset_model_on_meta("model_minivla")
    built = sum(p.numel() for p in model.parameters())
    assert model.language_model.config.model_type == "qwen2"
    assert model.language_model.config.tie_word_embeddings
    assert 0.5e9 <= built <= 1.25e9  # MiniVLA: "around 1 B" (Qwen2.5-0.5B + OpenVLA's vision towers)


def test_bad_inputs_are_named(built):
    model, proc = built
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 6, 32, 32\]"):
        model.predict_action_tokens([[1, 5]], torch.zeros(1, 6, 48, 48))
    with pytest.raises(ValueError, match=r"\[batch, height, width, 3\]"):
        proc.pixel_values(np.zeros((1, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        VLAPolicy(model, proc).predict_tokens(np.zeros((1, 32, 32, 3), np.uint8), ["open the drawer " * 200])
    with pytest.raises(ValueError, match="max_length"):
        proc.collate(np.zeros((1, 32, 32, 3), np.uint8), ["open the drawer " * 200], np.zeros((1, 7)))


def test_weights_that_do_not_match_the_config_are_named(built, tmp_path):
    import json

    model, proc = built
    save_model_dir(tmp_path / "m", model, proc)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["llm"]["num_hidden_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing \['language_model.model.layers.2"):
        load_model_dir(tmp_path / "m")
    cfg["llm"]["num_hidden_layers"] = 2
    cfg["llm"]["intermediate_size"] = 96
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"in shape: .*mlp.*file \(128, 64\), config \(96, 64\)"):
        load_model_dir(tmp_path / "m")


def test_qwen2_language_model_trains_and_predicts():
    """Any transformers causal LM: a tiny Qwen2 (grouped-query attention, tied embeddings) in place of Llama."""
    import dataclasses

    cfg = dataclasses.replace(TINY, llm_type="qwen2", llm_num_kv_heads=1, llm_tie_word_embeddings=True)
    model, proc = build_from_config(cfg, INSTRUCTIONS, seed=0)
    assert model.language_model.config.model_type == "qwen2"
    images, inputs = batch(proc)
    out = model(**inputs)
    out.loss.backward()
    assert model.language_model.get_input_embeddings().weight.grad is not None
    tokens = VLAPolicy(model.eval(), proc).predict_tokens(images, INSTRUCTIONS)
    assert tokens.shape == (3, 7)


def test_unnorm_key_is_required_with_several_datasets(built):
    model, proc = built
    stats = model.config.norm_stats["ds"]
    model.config.norm_stats = {"bridge": stats, "fractal": stats}
    try:
        policy = VLAPolicy(model, proc)
        image = np.zeros((32, 32, 3), np.uint8)
        with pytest.raises(ValueError, match=r"pass unnorm_key= one of \['bridge', 'fractal'\]"):
            policy.predict_action(image, "open the drawer")
        assert policy.predict_action(image, "open the drawer", unnorm_key="fractal").shape == (7,)
    finally:
        model.config.norm_stats = {"ds": stats}
