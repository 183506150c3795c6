"""Loading OpenVLA-format directories: a tiny checkpoint in exactly openvla-7b's key layout, checked
against a reference forward written here in plain torch straight from the timm-named weights (and
transformers' LlamaForCausalLM for the LM), plus every rejection the loader makes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vla_train.models.openvla_format import (
    convert_openvla_state_dict,
    is_openvla_dir,
    known_unused_keys,
    load_openvla_dir,
    openvla_vla_config,
)
from vla_train.models.policy import VLAPolicy
from vla_train.models.tokenizer import build_local_tokenizer

INSTRUCTIONS = ["pick up the red block", "open the drawer", "push the blue cube to the left"]
DINO, SIGLIP = "vision_backbone.featurizer.", "vision_backbone.fused_featurizer."
TINY = {
    "image": 32,
    "patch": 8,
    "dino": {"hidden": 32, "heads": 2, "depth": 3, "registers": 4, "mlp": 128},
    "siglip": {"hidden": 48, "heads": 3, "depth": 3, "mlp": 100},  # MLP not a multiple, like so400m's 4304
    "llm": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4},
}
OPENVLA_7B = {
    "image": 224,
    "patch": 14,
    "dino": {"hidden": 1024, "heads": 16, "depth": 24, "registers": 4, "mlp": 4096},
    "siglip": {"hidden": 1152, "heads": 16, "depth": 27, "mlp": 4304},
    "llm": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
}
DINO_MEAN, DINO_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


# ---- the checkpoint layout, written from openvla-7b's key names -------------------------------------
def timm_vit_shapes(prefix: str, t: dict, image: int, patch: int, dino: bool) -> dict[str, tuple]:
    D, P = t["hidden"], (image // patch) ** 2
    s = {f"{prefix}patch_embed.proj.weight": (D, 3, patch, patch), f"{prefix}patch_embed.proj.bias": (D,)}
    s[f"{prefix}pos_embed"] = (1, P, D)  # patches only: DINOv2-reg has no_embed_class, SigLIP no class token
    if dino:
        s[f"{prefix}cls_token"] = (1, 1, D)
        s[f"{prefix}reg_token"] = (1, t["registers"], D)
    for n in range(t["depth"]):
        b = f"{prefix}blocks.{n}."
        s |= {
            b + "norm1.weight": (D,),
            b + "norm1.bias": (D,),
            b + "norm2.weight": (D,),
            b + "norm2.bias": (D,),
        }
        s |= {b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,)}
        s |= {b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,)}
        s |= {b + "mlp.fc1.weight": (t["mlp"], D), b + "mlp.fc1.bias": (t["mlp"],)}
        s |= {b + "mlp.fc2.weight": (D, t["mlp"]), b + "mlp.fc2.bias": (D,)}
        if dino:
            s |= {b + "ls1.scale_factor": (D,), b + "ls2.scale_factor": (D,)}
    s |= {f"{prefix}norm.weight": (D,), f"{prefix}norm.bias": (D,)}
    if not dino:  # timm AttentionPoolLatent (global_pool="map"): one latent query, fused kv, MLP
        a = f"{prefix}attn_pool."
        s |= {a + "latent": (1, 1, D), a + "q.weight": (D, D), a + "q.bias": (D,)}
        s |= {
            a + "kv.weight": (2 * D, D),
            a + "kv.bias": (2 * D,),
            a + "proj.weight": (D, D),
            a + "proj.bias": (D,),
        }
        s |= {a + "norm.weight": (D,), a + "norm.bias": (D,)}
        s |= {a + "mlp.fc1.weight": (t["mlp"], D), a + "mlp.fc1.bias": (t["mlp"],)}
        s |= {a + "mlp.fc2.weight": (D, t["mlp"]), a + "mlp.fc2.bias": (D,)}
    return s


def openvla_shapes(sizes: dict, vocab: int) -> dict[str, tuple]:
    s = timm_vit_shapes(DINO, sizes["dino"], sizes["image"], sizes["patch"], dino=True)
    s |= timm_vit_shapes(SIGLIP, sizes["siglip"], sizes["image"], sizes["patch"], dino=False)
    v, h = sizes["dino"]["hidden"] + sizes["siglip"]["hidden"], sizes["llm"]["hidden_size"]
    s |= {"projector.fc1.weight": (4 * v, v), "projector.fc1.bias": (4 * v,)}
    s |= {"projector.fc2.weight": (h, 4 * v), "projector.fc2.bias": (h,)}
    s |= {"projector.fc3.weight": (h, h), "projector.fc3.bias": (h,)}
    m, i = "language_model.model.", sizes["llm"]["intermediate_size"]
    s |= {
        m + "embed_tokens.weight": (vocab, h),
        m + "norm.weight": (h,),
        "language_model.lm_head.weight": (vocab, h),
    }
    for n in range(sizes["llm"]["num_hidden_layers"]):
        b = f"{m}layers.{n}."
        s |= {b + f"self_attn.{p}_proj.weight": (h, h) for p in "qkvo"}
        s |= {
            b + "mlp.gate_proj.weight": (i, h),
            b + "mlp.up_proj.weight": (i, h),
            b + "mlp.down_proj.weight": (h, i),
        }
        s |= {b + "input_layernorm.weight": (h,), b + "post_attention_layernorm.weight": (h,)}
    return s


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in shapes.items():
        if "norm" in k.rsplit(".", 2)[-2] and k.endswith("weight") or "scale_factor" in k:
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)  # norms and LayerScale away from identity
        else:
            t = 0.2 * torch.randn(shape, generator=g)
        state[k] = t
    return state


def openvla_config_json(sizes: dict, tokenizer, backbone: str = "tiny-dinosiglip") -> dict:
    """config.json as prismatic's OpenVLAConfig writes it (text_config holds only non-default fields)."""
    vocab = (len(tokenizer) + 63) // 64 * 64
    return {
        "architectures": ["OpenVLAForActionPrediction"],
        # Remote code the loader must not need (its files are not even in the directory).
        "auto_map": {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        },
        "model_type": "openvla",
        "vision_backbone_id": backbone,
        "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive",
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None],
        "image_sizes": [sizes["image"], sizes["image"]],
        "vision_num_heads": [sizes["dino"]["heads"], sizes["siglip"]["heads"]],
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "llm_max_length": 2048,
        "pad_token_id": tokenizer.pad_token_id,
        "pad_to_multiple_of": 64,
        "n_action_bins": 256,
        "norm_stats": {
            "bridge_orig": {
                "action": {
                    "q01": [-0.03, -0.04, -0.02, -0.1, -0.1, -0.2, 0.0],
                    "q99": [0.03, 0.04, 0.05, 0.1, 0.1, 0.2, 1.0],
                    "mask": [True] * 6 + [False],
                },
                "num_transitions": 10,
                "num_trajectories": 2,
            }
        },
        "text_config": {"model_type": "llama", "pad_token_id": tokenizer.pad_token_id, "vocab_size": vocab}
        | sizes["llm"],
        "torch_dtype": "float32",
    }


def write_openvla_dir(path: Path, state: dict, cfg: dict, tokenizer, num_shards: int = 1) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer.save_pretrained(str(path))
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "LlamaTokenizer"  # as openvla-7b's tokenizer_config.json says
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    keys = sorted(state)
    if num_shards == 1:
        save_file({k: state[k].contiguous() for k in keys}, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.array(keys), num_shards)):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in chunk}, str(path / name))
        weight_map |= {k: name for k in chunk}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return build_local_tokenizer(INSTRUCTIONS, 200, 256)


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    """(directory, timm-named state, config.json dict, loaded model, processor)."""
    vocab = (len(tokenizer) + 63) // 64 * 64
    state = random_state(openvla_shapes(TINY, vocab))
    cfg = openvla_config_json(TINY, tokenizer)
    d = write_openvla_dir(tmp_path_factory.mktemp("openvla") / "tiny", state, cfg, tokenizer)
    model, proc = load_openvla_dir(d)
    return d, state, cfg, model, proc


# ---- the reference: timm-style ViTs and the projector in plain torch ---------------------------------
def ref_block(x: torch.Tensor, w: dict, b: str, heads: int, layer_scale: bool) -> torch.Tensor:
    B, N, D = x.shape
    h = F.layer_norm(x, (D,), w[b + "norm1.weight"], w[b + "norm1.bias"], eps=1e-6)
    qkv = F.linear(h, w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"])
    q, k, v = qkv.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
    a = F.linear(a, w[b + "attn.proj.weight"], w[b + "attn.proj.bias"])
    x = x + (a * w[b + "ls1.scale_factor"] if layer_scale else a)
    h = F.layer_norm(x, (D,), w[b + "norm2.weight"], w[b + "norm2.bias"], eps=1e-6)
    h = F.gelu(F.linear(h, w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"]))  # exact GELU in both towers
    h = F.linear(h, w[b + "mlp.fc2.weight"], w[b + "mlp.fc2.bias"])
    return x + (h * w[b + "ls2.scale_factor"] if layer_scale else h)


def ref_tower_tokens(px: torch.Tensor, w: dict, p: str, dino: bool) -> torch.Tensor:
    """Token sequence entering block 0: patches + pos_embed, then (DINOv2) class and registers prepended."""
    x = F.conv2d(px, w[p + "patch_embed.proj.weight"], w[p + "patch_embed.proj.bias"], stride=TINY["patch"])
    x = x.flatten(2).transpose(1, 2) + w[p + "pos_embed"]
    if dino:
        B = x.shape[0]
        x = torch.cat([w[p + "cls_token"].expand(B, -1, -1), w[p + "reg_token"].expand(B, -1, -1), x], dim=1)
    return x


def ref_tower(px: torch.Tensor, w: dict, p: str, t: dict, dino: bool) -> torch.Tensor:
    x = ref_tower_tokens(px, w, p, dino)
    for n in range(t["depth"] - 1):  # output of the second-to-last block, no final norm
        x = ref_block(x, w, f"{p}blocks.{n}.", t["heads"], layer_scale=dino)
    return x[:, 1 + t["registers"] :] if dino else x


def ref_patches(px: torch.Tensor, w: dict) -> tuple[torch.Tensor, torch.Tensor]:
    dino_px, siglip_px = px[:, :3], px[:, 3:]
    feats = torch.cat(
        [
            ref_tower(dino_px, w, DINO, TINY["dino"], True),
            ref_tower(siglip_px, w, SIGLIP, TINY["siglip"], False),
        ],
        dim=-1,
    )
    h = F.gelu(F.linear(feats, w["projector.fc1.weight"], w["projector.fc1.bias"]))
    h = F.gelu(F.linear(h, w["projector.fc2.weight"], w["projector.fc2.bias"]))
    return feats, F.linear(h, w["projector.fc3.weight"], w["projector.fc3.bias"])


def ref_lm(state: dict, cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    tc = cfg["text_config"]
    lm_cfg = LlamaConfig(
        **{k: v for k, v in tc.items() if k != "model_type"},
        rms_norm_eps=1e-6,  # what openvla-7b's text_config leaves to the LlamaConfig default
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    lm = LlamaForCausalLM(lm_cfg)
    lm.load_state_dict(
        {k.removeprefix("language_model."): v for k, v in state.items() if k.startswith("language_model.")}
    )
    return lm.eval()


def ref_pixels(images_BHWC: np.ndarray) -> torch.Tensor:
    x = images_BHWC.astype(np.float64) / 255.0
    both = np.concatenate([(x - DINO_MEAN) / DINO_STD, (x - 0.5) / 0.5], axis=-1)
    return torch.tensor(both, dtype=torch.float32).permute(0, 3, 1, 2)


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, TINY["image"], TINY["image"], 3), dtype=np.uint8)


# ---- equality with the reference ---------------------------------------------------------------------
def test_vision_features_and_projector_match_reference(tiny):
    _, state, _, model, _ = tiny
    px = ref_pixels(random_images(2))
    vb = model.vision_backbone
    with torch.no_grad():
        # DINOv2 tokens entering block 0: patch-only pos_embed + zero class slot is bitwise timm's order.
        assert torch.equal(
            vb.featurizer.embeddings(px[:, :3]), ref_tower_tokens(px[:, :3], state, DINO, True)
        )
        assert torch.equal(
            vb.fused_featurizer.embeddings(px[:, 3:]), ref_tower_tokens(px[:, 3:], state, SIGLIP, False)
        )
        feats, patches = ref_patches(px, state)
        ours = vb(px)
        assert ours.shape == (2, 16, 80)
        torch.testing.assert_close(ours, feats, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.projector(ours), patches, rtol=0, atol=1e-5)


def test_forward_logits_match_reference_lm(tiny):
    _, state, cfg, model, proc = tiny
    images = random_images(3, seed=1)
    actions = np.random.default_rng(1).uniform(-1, 1, (3, 7))
    inputs = proc.collate(images, INSTRUCTIONS, actions)
    torch.testing.assert_close(inputs["pixel_values_BCHW"], ref_pixels(images), rtol=0, atol=1e-6)
    lm = ref_lm(state, cfg)
    with torch.no_grad():
        out = model(**inputs)
        _, patches = ref_patches(ref_pixels(images), state)
        for b in range(3):
            # Reference: one unpadded row, [BOS, patches, rest of the text], logits at the supervised ones.
            n = int(inputs["attention_mask_BL"][b].sum())
            ids, labels = inputs["input_ids_BL"][b, :n], inputs["labels_BL"][b, :n]
            embed = lm.get_input_embeddings()
            emb = torch.cat([embed(ids[:1]), patches[b], embed(ids[1:])])[None]
            logits = lm(inputs_embeds=emb).logits[0]
            supervised = (labels[1:] != -100).nonzero().squeeze(-1)
            assert len(supervised) == 8  # 7 action tokens + EOS
            mine = out.logits_NV[out.sample_index_N == b]
            torch.testing.assert_close(mine, logits[supervised + patches.shape[1]], rtol=1e-5, atol=1e-5)
            assert torch.equal(out.labels_N[out.sample_index_N == b], labels[1:][supervised])


def ref_greedy(lm, prompt_ids: list[int], patches_PD: torch.Tensor, steps: int) -> list[int]:
    embed, ids, out = lm.get_input_embeddings(), torch.tensor(prompt_ids), []
    for _ in range(steps):  # no KV cache: the whole sequence every step
        emb = torch.cat([embed(ids[:1]), patches_PD, embed(ids[1:])])[None]
        tok = int(lm(inputs_embeds=emb).logits[0, -1].argmax())
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([tok])])
    return out


def test_predict_action_matches_reference_decoding(tiny):
    _, state, cfg, model, proc = tiny
    lm = ref_lm(state, cfg)
    images = random_images(3, seed=2)
    policy = VLAPolicy(model, proc)
    tokens = policy.predict_tokens(images, INSTRUCTIONS)
    stats = cfg["norm_stats"]["bridge_orig"]["action"]
    with torch.no_grad():
        _, patches = ref_patches(ref_pixels(images), state)
        for b, instruction in enumerate(INSTRUCTIONS):
            prompt = proc.inference_prompts([instruction])[0]
            assert prompt[0] == 1 and prompt[-1] == proc.tokenizer.get_vocab()["▁"]  # BOS ... empty piece
            want = ref_greedy(lm, prompt, patches[b], 7)
            assert tokens[b].tolist() == want
            # OpenVLA's decoding: index = clip(base_vocab - id - 1, 0, 254) into the 255 bin centres.
            edges = np.linspace(-1, 1, 256)
            centres = (edges[:-1] + edges[1:]) / 2
            normalized = centres[np.clip(cfg["pad_token_id"] - np.array(want) - 1, 0, 254)]
            q01, q99, mask = (np.array(stats[k]) for k in ("q01", "q99", "mask"))
            expected = np.where(mask, 0.5 * (normalized + 1) * (q99 - q01) + q01, normalized)
            got = policy.predict_action(images[b], instruction, unnorm_key="bridge_orig")
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_config_and_dropped_keys(tiny):
    _, state, _, model, proc = tiny
    c = model.config
    assert (c.image_size, c.patch_size, c.num_patches) == (32, 8, 16)
    assert c.dino == {"hidden": 32, "layers": 3, "heads": 2, "registers": 4, "intermediate": 128}
    assert c.siglip == {"hidden": 48, "layers": 3, "heads": 3, "intermediate": 100}
    assert c.llm["hidden_size"] == 64 and c.llm["rms_norm_eps"] == 1e-6 and c.llm["model_type"] == "llama"
    base = len(proc.tokenizer) - 1  # the tokenizer's vocabulary (+ action tokens), then <pad>
    assert (c.base_vocab_size, c.pad_token_id, c.empty_piece_id) == (
        base,
        base,
        proc.tokenizer.get_vocab()["▁"],
    )
    assert c.action_dim == 7 and "bridge_orig" in c.norm_stats
    assert model.language_model.get_input_embeddings().weight.shape[0] == (base + 1 + 63) // 64 * 64
    dropped = known_unused_keys(set(state), c)
    assert all(
        k.startswith((f"{DINO}blocks.2.", f"{SIGLIP}blocks.2.", f"{SIGLIP}attn_pool."))
        or k.endswith(("featurizer.norm.weight", "featurizer.norm.bias"))
        for k in dropped
    )
    assert len(dropped) == 14 + 12 + 4 + 13  # last DINO block, last SigLIP block, 2 final norms, attn_pool
    assert torch.equal(model.vision_backbone.featurizer.embeddings.mask_token, torch.zeros(1, 32))


# ---- rejections ----------------------------------------------------------------------------------------
def test_unknown_keys_are_all_listed(tiny):
    _, state, _, model, _ = tiny
    bad = dict(state) | {
        "projector.fc4.weight": torch.zeros(2),
        f"{DINO}blocks.0.attn.q_norm.weight": torch.zeros(2),
    }
    bad[f"{DINO}blocks.7.norm1.weight"] = torch.zeros(32)  # a block beyond the config's depth is not "unused"
    with pytest.raises(ValueError, match="3 unknown checkpoint key") as e:
        convert_openvla_state_dict(bad, model.config, model)
    unknown = [f"{DINO}blocks.0.attn.q_norm.weight", f"{DINO}blocks.7.norm1.weight", "projector.fc4.weight"]
    assert f"unknown checkpoint key(s): {sorted(unknown)}" in str(e.value)


def test_missing_keys_are_all_listed(tiny):
    _, state, _, model, _ = tiny
    gone = ["projector.fc2.bias", f"{SIGLIP}blocks.1.attn.qkv.weight", "language_model.lm_head.weight"]
    with pytest.raises(ValueError, match="5 model key") as e:  # the qkv weight feeds q, k and v
        convert_openvla_state_dict({k: v for k, v in state.items() if k not in gone}, model.config, model)
    msg = str(e.value)
    for k in gone:
        assert k in msg
    assert (
        f"{SIGLIP}encoder.layers.1.self_attn.k_proj.weight (checkpoint key {SIGLIP}blocks.1.attn.qkv.weight)"
        in msg
    )
    assert "unknown" not in msg


def test_wrong_shapes_name_key_and_both_shapes(tiny):
    _, state, _, model, _ = tiny
    bad = dict(state)
    bad["projector.fc1.weight"] = torch.zeros(320, 81)
    bad[f"{DINO}blocks.1.attn.qkv.weight"] = torch.zeros(3 * 33, 32)
    with pytest.raises(ValueError, match="2 shape mismatch") as e:
        convert_openvla_state_dict(bad, model.config, model)
    msg = str(e.value)
    assert "projector.fc1.weight: checkpoint (320, 81), model expects (320, 80)" in msg
    assert f"{DINO}blocks.1.attn.qkv.weight: checkpoint (99, 32), model expects (96, 32)" in msg


def test_config_sizes_that_do_not_match_the_weights(tiny, tokenizer, tmp_path):
    d, state, cfg, _, _ = tiny
    wrong = dict(cfg, vision_backbone_id="dinosiglip-vit-so-224px", image_sizes=[224, 224])
    del wrong["vision_num_heads"]
    (tmp_path / "config.json").write_text(json.dumps(wrong))
    for f in d.iterdir():
        if f.name != "config.json":
            (tmp_path / f.name).symlink_to(f)
    with pytest.raises(ValueError, match="shape mismatch") as e:
        load_openvla_dir(tmp_path)
    assert f"{DINO}patch_embed.proj.weight: checkpoint (32, 3, 8, 8), model expects (1024, 3, 14, 14)" in str(
        e.value
    )


def test_unknown_backbone_needs_head_counts(tiny, tmp_path):
    d, _, cfg, _, _ = tiny
    (tmp_path / "config.json").write_text(
        json.dumps({k: v for k, v in cfg.items() if k != "vision_num_heads"})
    )
    for f in d.iterdir():
        if f.name != "config.json":
            (tmp_path / f.name).symlink_to(f)
    with pytest.raises(ValueError, match=r'"vision_num_heads": \[DINOv2 heads, SigLIP heads\]'):
        load_openvla_dir(tmp_path)


def test_is_openvla_dir(tiny, tmp_path):
    assert is_openvla_dir(tiny[0])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vla_train", "image_size": 32}))
    assert not is_openvla_dir(tmp_path) and not is_openvla_dir(tmp_path / "nowhere")


# ---- other layouts ---------------------------------------------------------------------------------------
def test_sharded_checkpoint_loads_identically(tiny, tokenizer, tmp_path):
    _, state, cfg, model, _ = tiny
    d = write_openvla_dir(tmp_path / "sharded", state, cfg, tokenizer, num_shards=3)
    assert len(list(d.glob("model-*.safetensors"))) == 3 and not (d / "model.safetensors").exists()
    sharded, _ = load_openvla_dir(d)
    ours, theirs = model.state_dict(), sharded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_bfloat16_load_predicts(tiny):
    d, _, _, _, _ = tiny
    model, proc = load_openvla_dir(d, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    action = VLAPolicy(model, proc).predict_action(
        random_images(1)[0], "open the drawer", unnorm_key="bridge_orig"
    )
    assert action.shape == (7,) and np.isfinite(action).all()


class _LlamaVocab:
    """What the config builder reads from a tokenizer, sized like Llama-2's plus OpenVLA's <PAD>."""

    pad_token_id = 32000

    def __len__(self) -> int:
        return 32001

    def get_vocab(self) -> dict[str, int]:
        return {"▁": 29871}


def test_full_size_openvla_7b_layout_converts_on_meta():
    shapes = openvla_shapes(OPENVLA_7B, 32064)
    count = lambda prefix: sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(prefix))  # noqa: E731
    # The layout matches the towers as timm builds them (303.2 M and 427.7 M parameters).
    assert round(count(DINO) / 1e6, 1) == 303.2 and round(count(SIGLIP) / 1e6, 1) == 427.7
    cfg = openvla_config_json(OPENVLA_7B, _LlamaVocab(), backbone="dinosiglip-vit-so-224px")
    del cfg["vision_num_heads"]
    cfg["text_config"] = {
        "model_type": "llama",
        "pad_token_id": 32000,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064,
    }
    config = openvla_vla_config(cfg, shapes, _LlamaVocab())
    assert config.dino["heads"] == 16 and config.siglip["intermediate"] == 4304 and config.num_patches == 256
    assert (config.base_vocab_size, config.empty_piece_id, config.llm["num_hidden_layers"]) == (
        32000,
        29871,
        32,
    )
    with torch.device("meta"):
        state = {k: torch.empty(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    converted = convert_openvla_state_dict(state, config)
    assert converted[f"{DINO}embeddings.position_embeddings"].shape == (1, 257, 1024)
    assert converted[f"{SIGLIP}embeddings.position_embedding.weight"].shape == (256, 1152)
    assert f"{DINO}encoder.layer.23.norm1.weight" not in converted  # the last block is not built
    assert f"{DINO}encoder.layer.22.attention.v_proj.bias" in converted
