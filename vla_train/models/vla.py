"""The OpenVLA-architecture VLA: fused vision towers -> projector -> causal LM, with patch embeddings
inserted right after BOS. Training forward computes LM-head logits only at the supervised positions;
`predict_action_tokens` decodes greedily with a KV cache, batched with left padding.

Sequence: BOS, the patches of each camera in `config.cameras` order (a missing camera's patches are
masked out), the proprio token (when `config.proprio_dim`), the prompt, then the action part:

- `action_head: tokens` (OpenVLA): `chunk_size x action_dim` action tokens and EOS, decoded one by one.
- `action_head: l1_parallel` (OpenVLA-OFT's parallel decoding with an L1 regression head): after the
  prompt, `chunk_size x action_dim` learned placeholder embeddings ("slots"), one forward pass; an MLP head
  on the slots' last hidden states regresses the normalized actions. Attention (`l1_parallel_mask`): the
  prompt (BOS, patches, proprio, text) stays causal and never sees the slots; each slot sees every
  non-pad prompt token and every slot, before and after it. Unlike OFT (whose fork makes every token
  attend to every non-pad token, slots included), the prompt's hidden states are those of a causal LM,
  so its keys and values do not depend on the slots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vla_train.models.prompting import IGNORE_INDEX, pad_prompts
from vla_train.models.vision import DinoSigLIPBackbone, FusedMLPProjector, dino_config, siglip_config


@dataclass
class VLAConfig:
    """Everything needed to rebuild the model; saved as config.json in a model directory."""

    image_size: int
    patch_size: int
    dino: dict[str, int]  # hidden, layers, heads, registers[, intermediate]
    siglip: dict[str, int]  # hidden, layers, heads[, intermediate]
    llm: dict[str, Any]  # model_type ("llama", "qwen2") + that transformers config's size kwargs
    base_vocab_size: int  # text vocabulary incl. action tokens (Llama-2: 32000)
    pad_token_id: int  # = base_vocab_size (OpenVLA: 32000)
    empty_piece_id: int | None  # sentencepiece "▁" appended to prompts (Llama-2: 29871)
    action_dim: int = 7
    n_action_bins: int = 256
    llm_max_length: int = 2048
    pad_to_multiple_of: int = 64
    attn_implementation: str = "sdpa"
    norm_stats: dict[str, Any] = field(default_factory=dict)
    # tokens (OpenVLA) | l1_parallel (placeholder slots, one forward pass, MLP regression head, L1 loss)
    action_head: str = "tokens"
    # actions per prediction: data.future_action_window_size + 1 (1 = OpenVLA)
    chunk_size: int = 1
    # camera roles whose patches enter the sequence, in this order (data.cameras)
    cameras: list[str] = field(default_factory=lambda: ["primary"])
    # width of the normalized proprio vector fed as one token (0 = no proprio token)
    proprio_dim: int = 0
    # hidden width of the l1_parallel head's MLP (0 = the LLM's width, as OpenVLA-OFT)
    head_hidden_size: int = 0

    @property
    def image_sizes(self) -> list[int]:
        return [self.image_size, self.image_size]

    @property
    def num_patches(self) -> int:
        """Patches of one image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens inserted after BOS: every camera's patches, and the proprio token."""
        return self.num_patches * len(self.cameras) + (1 if self.proprio_dim else 0)

    @property
    def num_action_slots(self) -> int:
        return self.chunk_size * self.action_dim

    def layout(self) -> dict[str, Any]:
        """What goes into and comes out of the model beyond OpenVLA's (VLA.set_layout can add to it)."""
        return {
            "action_head": self.action_head,
            "head_hidden_size": self.head_hidden_size,
            "chunk_size": self.chunk_size,
            "cameras": list(self.cameras),
            "proprio_dim": self.proprio_dim,
        }

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = "vla_train"
        d["image_sizes"] = self.image_sizes
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class VLAOutput:
    loss: torch.Tensor
    # token head: LM-head logits at the N supervised positions, their target ids, and which batch row
    # each belongs to
    logits_NV: torch.Tensor | None = None
    labels_N: torch.Tensor | None = None
    sample_index_N: torch.Tensor | None = None
    # l1_parallel head: predicted and target normalized actions, and which chunk steps are supervised
    actions_pred_BKA: torch.Tensor | None = None
    actions_BKA: torch.Tensor | None = None
    action_mask_BK: torch.Tensor | None = None


ACTION_HEADS = ("tokens", "l1_parallel")
# Modules a VLA has beyond OpenVLA's: trained whole (never LoRA-adapted nor quantized) and created at
# random when a model without them is fine-tuned into one with them.
NEW_MODULES = ("proprio_projector", "action_slots", "action_head")


class ProprioProjector(nn.Module):
    """OpenVLA-OFT's: Linear -> GELU -> Linear, the normalized proprio vector -> one LLM input token."""

    def __init__(self, proprio_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio_BP: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio_BP)))


class MLPResNetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """OpenVLA-OFT's MLPResNet (same submodule names, so its state dicts map key for key)."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList([MLPResNetBlock(hidden_dim) for _ in range(num_blocks)])
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionHead(nn.Module):
    """The slots' hidden states [B, K * A, D] -> normalized actions [B, K, A]: each chunk step's A slot
    states, concatenated, through one MLPResNet (OpenVLA-OFT's L1RegressionActionHead)."""

    def __init__(self, llm_dim: int, hidden_dim: int, action_dim: int):
        super().__init__()
        self.action_dim = action_dim
        self.model = MLPResNet(2, llm_dim * action_dim, hidden_dim, action_dim)

    def forward(self, slots_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = slots_BSD.shape
        return self.model(slots_BSD.reshape(B, S // self.action_dim, self.action_dim * D))


def l1_parallel_mask(valid_BT: torch.Tensor, slot_BT: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, True = query t may attend to key s: causal among the prompt, every slot sees
    all slots, pad keys are seen by nobody but themselves (a pad query row is never empty; its output
    is not read)."""
    T = valid_BT.shape[1]
    causal = torch.ones((T, T), dtype=torch.bool, device=valid_BT.device).tril()
    allowed = causal[None] | (slot_BT[:, :, None] & slot_BT[:, None, :])
    allowed = allowed & valid_BT[:, None, :]
    eye = torch.eye(T, dtype=torch.bool, device=valid_BT.device)[None]
    allowed = allowed | (eye & ~valid_BT[:, :, None])
    return allowed[:, None]


def padded_vocab(base_vocab_size: int, multiple: int) -> int:
    n = base_vocab_size + 1  # + pad
    return (n + multiple - 1) // multiple * multiple


def openvla_unused_parameters(config: VLAConfig) -> int:
    """Parameters an OpenVLA checkpoint stores but that never feed the features, so this model does not
    build them: the last block of each tower, both towers' final norms, and SigLIP's attention-pool head
    (timm's AttentionPoolLatent). Added to the built count this gives the checkpoint's size (7.54 B)."""

    def block(d: int, i: int, layerscale: bool) -> int:
        return (
            2 * 2 * d
            + (3 * d * d + 3 * d)
            + (d * d + d)
            + (d * i + i)
            + (i * d + d)
            + (2 * d if layerscale else 0)
        )

    dd, di = config.dino["hidden"], config.dino.get("intermediate", 4 * config.dino["hidden"])
    sd, si = config.siglip["hidden"], config.siglip.get("intermediate", 4 * config.siglip["hidden"])
    attn_pool = (
        sd
        + (sd * sd + sd)
        + (2 * sd * sd + 2 * sd)
        + (sd * sd + sd)
        + 2 * sd
        + (sd * si + si)
        + (si * sd + sd)
    )
    return block(dd, di, True) + block(sd, si, False) + 2 * dd + 2 * sd + attn_pool


class VLA(nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.config = config
        c = config
        self.vision_backbone = DinoSigLIPBackbone(
            dino_config(c.dino, c.image_size, c.patch_size, c.attn_implementation),
            siglip_config(c.siglip, c.image_size, c.patch_size, c.attn_implementation),
        )
        llm_kwargs = {"tie_word_embeddings": False, **c.llm}  # OpenVLA keeps a separate LM head
        llm_cfg = AutoConfig.for_model(
            llm_kwargs.pop("model_type", "llama"),
            vocab_size=padded_vocab(c.base_vocab_size, c.pad_to_multiple_of),
            pad_token_id=c.pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
            max_position_embeddings=c.llm_max_length,
            attn_implementation=c.attn_implementation,
            **llm_kwargs,
        )
        self.projector = FusedMLPProjector(self.vision_backbone.embed_dim, llm_cfg.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(llm_cfg)
        # Created after OpenVLA's modules: a model without them initializes exactly as before.
        self.add_missing_modules()

    def add_missing_modules(self) -> list[str]:
        """Create the NEW_MODULES the config asks for and the model lacks (at random; the action slots at
        zero, as OpenVLA-OFT's placeholder embeddings); returns their names."""
        c, D = self.config, self.language_model.config.hidden_size
        added = []
        if c.proprio_dim and not hasattr(self, "proprio_projector"):
            self.proprio_projector = ProprioProjector(c.proprio_dim, D)
            added.append("proprio_projector")
        if c.action_head == "l1_parallel" and not hasattr(self, "action_head"):
            self.action_slots = nn.Parameter(torch.zeros(c.num_action_slots, D))
            self.action_head = L1RegressionHead(D, c.head_hidden_size or D, c.action_dim)
            added += ["action_slots", "action_head"]
        return added

    def set_layout(self, layout: dict[str, Any]) -> list[str]:
        """Turn this model into one with `layout` (VLAConfig.layout keys): a pretrained token model fine-tuned
        with more cameras, a chunk, proprio or the l1_parallel head. Only additions are possible (a
        model's trained head is not dropped); returns the modules created."""
        c = self.config
        current = c.layout()
        changed = {k: v for k, v in layout.items() if current.get(k) != v}
        if not changed:
            return []
        if current["action_head"] != "tokens" and "action_head" in changed:
            raise ValueError(
                f"this model has the {current['action_head']} head; it cannot become {layout['action_head']}"
            )
        if current["proprio_dim"] and "proprio_dim" in changed:
            fix = (
                "set model.use_proprio true" if not layout["proprio_dim"] else "train on proprio of its width"
            )
            raise ValueError(
                f"this model reads proprio of width {current['proprio_dim']}, the run gives "
                f"{layout['proprio_dim']}: {fix}"
            )
        if current["action_head"] == "l1_parallel":
            if not layout.get("head_hidden_size"):  # 0 = the model's own
                changed.pop("head_hidden_size", None)
            if "head_hidden_size" in changed:
                raise ValueError(
                    f"this model's l1_parallel head is {c.head_hidden_size or 'LLM'} wide; the run asks for "
                    f"{layout['head_hidden_size']}: leave model.head_hidden_size 0"
                )
            if "chunk_size" in changed:
                raise ValueError(
                    f"this model's l1_parallel head predicts chunks of {c.chunk_size}; the run asks for "
                    f"{layout['chunk_size']}: set data.future_action_window_size {c.chunk_size - 1}"
                )
        for k, v in changed.items():
            setattr(c, k, v)
        if c.action_head == "l1_parallel" and c.attn_implementation == "flash_attention_2":
            self.language_model.set_attn_implementation("sdpa")  # flash-attn cannot take its mask
            c.attn_implementation = "sdpa"
        return self.add_missing_modules()

    # ---- structure, for parallelism -------------------------------------------------------------
    def repeated_blocks(self) -> list[nn.ModuleList]:
        """The repeated blocks: the LLM decoder layers and each vision tower's blocks. They are the units
        FSDP shards and activation checkpointing recomputes (training/distributed.py), which may replace
        entries of these lists with wrappers."""
        return [self.language_model.model.layers, *self.vision_backbone.repeated_blocks()]

    def disable_kv_cache(self) -> None:
        """No KV cache in the forward unless asked for: under activation checkpointing each recomputation
        would append to it again (transformers' own gradient checkpointing turns it off too). Generation
        (predict_action_tokens) asks for it explicitly."""
        self.language_model.config.use_cache = False

    # ---- shared by training and inference -------------------------------------------------------
    def check_pixel_values(self, pixel_values_BCHW: torch.Tensor) -> None:
        s, n = self.config.image_size, len(self.config.cameras)
        if pixel_values_BCHW.ndim != 4 or tuple(pixel_values_BCHW.shape[1:]) != (6 * n, s, s):
            cams = f"{n} cameras ({', '.join(self.config.cameras)}) x " if n > 1 else ""
            raise ValueError(
                f"pixel_values must be [batch, {cams}6, {s}, {s}] (the image at the model's {s} px, normalized "
                f"for DINOv2 and SigLIP: use the model's processor), got {tuple(pixel_values_BCHW.shape)}"
            )

    def _prefix(self, pixel_values_BCHW, proprio_BP=None, image_mask_BN=None, dtype=None):
        """The tokens after BOS: each camera's projected patches, then the proprio token; and their mask
        ([B, prefix], False for a missing camera's patches)."""
        self.check_pixel_values(pixel_values_BCHW)
        c = self.config
        n = len(c.cameras)
        B = pixel_values_BCHW.shape[0]
        pixels = (
            pixel_values_BCHW if n == 1 else pixel_values_BCHW.reshape(B * n, 6, *pixel_values_BCHW.shape[2:])
        )
        patches = self.projector(self.vision_backbone(pixels))
        if n > 1:
            patches = patches.reshape(B, n * patches.shape[1], patches.shape[2])
        patches = patches.to(dtype or patches.dtype)
        if image_mask_BN is None:
            mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        else:
            mask = image_mask_BN.to(device=patches.device, dtype=torch.bool).repeat_interleave(
                c.num_patches, 1
            )
        if c.proprio_dim:
            if proprio_BP is None or tuple(proprio_BP.shape) != (B, c.proprio_dim):
                got = None if proprio_BP is None else tuple(proprio_BP.shape)
                raise ValueError(
                    f"this model reads proprio: pass proprio [batch, {c.proprio_dim}] (normalized with the "
                    f"dataset's proprio statistics: use the model's processor), got {got}"
                )
            token = self.proprio_projector(proprio_BP.to(self.proprio_projector.fc1.weight.dtype))
            patches = torch.cat([patches, token[:, None].to(patches.dtype)], dim=1)
            mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)
        return patches, mask

    def _multimodal_embeddings(
        self, input_ids_BL, attention_mask_BL, pixel_values_BCHW, proprio_BP=None, image_mask_BN=None
    ):
        text_BLD = self.language_model.get_input_embeddings()(input_ids_BL)
        prefix, prefix_mask = self._prefix(pixel_values_BCHW, proprio_BP, image_mask_BN, text_BLD.dtype)
        emb = torch.cat([text_BLD[:, :1], prefix, text_BLD[:, 1:]], dim=1)
        mask = torch.cat(
            [attention_mask_BL[:, :1], prefix_mask.to(attention_mask_BL.dtype), attention_mask_BL[:, 1:]],
            dim=1,
        )
        return emb, mask, prefix.shape[1]

    def forward(
        self,
        input_ids_BL,
        attention_mask_BL,
        pixel_values_BCHW,
        labels_BL=None,
        proprio_BP=None,
        image_mask_BN=None,
        actions_BKA=None,
        action_mask_BK=None,
    ) -> VLAOutput:
        """Training/eval forward. Token head: labels_BL holds IGNORE_INDEX except on the supervised
        positions. l1_parallel: input_ids_BL are the prompts (right-padded), actions_BKA the normalized
        targets, action_mask_BK the supervised chunk steps."""
        if self.config.action_head == "l1_parallel":
            pred = self._l1_parallel(
                input_ids_BL, attention_mask_BL, pixel_values_BCHW, proprio_BP, image_mask_BN
            )
            if actions_BKA is None:
                return VLAOutput(loss=pred.new_zeros(()), actions_pred_BKA=pred)
            target = actions_BKA.to(pred.device, torch.float32)
            if action_mask_BK is None:
                action_mask_BK = torch.ones(target.shape[:2], dtype=torch.bool, device=pred.device)
            keep = action_mask_BK.to(pred.device, torch.bool)[..., None].expand_as(target)
            loss = (pred - target).abs()[keep].mean()
            return VLAOutput(
                loss=loss, actions_pred_BKA=pred, actions_BKA=target, action_mask_BK=action_mask_BK
            )
        emb, mask, num_prefix = self._multimodal_embeddings(
            input_ids_BL, attention_mask_BL, pixel_values_BCHW, proprio_BP, image_mask_BN
        )
        hidden = self.language_model.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        # Text token i (i >= 1) is predicted from the hidden state at sequence position num_prefix + i - 1.
        supervised = labels_BL[:, 1:] != IGNORE_INDEX
        rows, cols = supervised.nonzero(as_tuple=True)
        hidden_ND = hidden[rows, cols + num_prefix]
        logits_NV = self.language_model.lm_head(hidden_ND).float()
        labels_N = labels_BL[:, 1:][rows, cols]
        loss = F.cross_entropy(logits_NV, labels_N)
        return VLAOutput(loss=loss, logits_NV=logits_NV, labels_N=labels_N, sample_index_N=rows)

    def _attention_mask_4d(self, allowed_B1TT: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A custom mask in the form the attention kernel takes: bool for SDPA, additive for eager."""
        impl = self.language_model.config._attn_implementation
        if impl == "sdpa":
            return allowed_B1TT
        if impl == "eager":
            zero = torch.zeros((), dtype=dtype, device=allowed_B1TT.device)
            return torch.where(allowed_B1TT, zero, torch.finfo(dtype).min)
        raise ValueError(
            f"the l1_parallel head needs its own attention mask, which attn_implementation '{impl}' cannot "
            "take: use sdpa or eager"
        )

    def _l1_parallel(self, input_ids_BL, attention_mask_BL, pixel_values_BCHW, proprio_BP, image_mask_BN):
        """One forward pass: [BOS, prefix, prompt, slots, pad] -> normalized actions [B, K, A] (float32)."""
        c = self.config
        B, L = input_ids_BL.shape
        S = c.num_action_slots
        embed = self.language_model.get_input_embeddings()
        text_BLD = embed(input_ids_BL)
        lens = attention_mask_BL.sum(1)  # prompts are right-padded: row b's text is [0, lens[b])
        pos = torch.arange(L + S, device=input_ids_BL.device)[None]
        is_text = pos < lens[:, None]
        is_slot = (pos >= lens[:, None]) & (pos < lens[:, None] + S)
        pad = embed(input_ids_BL.new_tensor([c.pad_token_id]))[0]
        ext = pad.expand(B, L + S, -1).clone()
        ext[is_text] = text_BLD[attention_mask_BL.bool()]
        ext[is_slot] = self.action_slots.to(ext.dtype).expand(B, S, -1).reshape(B * S, -1)
        prefix, prefix_mask = self._prefix(pixel_values_BCHW, proprio_BP, image_mask_BN, ext.dtype)
        emb = torch.cat([ext[:, :1], prefix, ext[:, 1:]], dim=1)
        no = prefix_mask.new_zeros(prefix_mask.shape)
        valid = torch.cat([is_text[:, :1], prefix_mask, (is_text | is_slot)[:, 1:]], dim=1)
        slot = torch.cat([is_slot[:, :1], no, is_slot[:, 1:]], dim=1)
        mask = self._attention_mask_4d(l1_parallel_mask(valid, slot), emb.dtype)
        hidden = self.language_model.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        slots_BSD = hidden[slot].reshape(B, S, -1)
        return self.action_head(slots_BSD.to(self.action_head.model.fc1.weight.dtype)).float()

    def _check_context(self, prompt_len: int) -> None:
        c = self.config
        if prompt_len + c.num_prefix_tokens + c.num_action_slots > c.llm_max_length:
            raise ValueError(
                f"a prompt of {prompt_len} tokens + {c.num_prefix_tokens} image/proprio tokens + "
                f"{c.num_action_slots} action tokens exceeds the model's context of {c.llm_max_length}; "
                "shorten the instruction"
            )

    @torch.no_grad()
    def predict_actions(
        self,
        prompt_ids: list[list[int]],
        pixel_values_BCHW: torch.Tensor,
        proprio_BP=None,
        image_mask_BN=None,
    ) -> torch.Tensor:
        """l1_parallel: normalized actions [B, chunk_size, action_dim] of a batch of prompts (each BOS +
        prompt + empty piece), in one forward pass."""
        if self.config.action_head != "l1_parallel":
            raise ValueError(
                "predict_actions is the l1_parallel head's; the token head decodes: predict_action_tokens"
            )
        self._check_context(max(len(p) for p in prompt_ids))
        ids, mask = pad_prompts(prompt_ids, self.config.pad_token_id, device=pixel_values_BCHW.device)
        return self._l1_parallel(ids, mask, pixel_values_BCHW, proprio_BP, image_mask_BN)

    @torch.no_grad()
    def predict_action_tokens(
        self,
        prompt_ids: list[list[int]],
        pixel_values_BCHW: torch.Tensor,
        proprio_BP=None,
        image_mask_BN=None,
    ) -> torch.Tensor:
        """Greedy decoding of chunk_size x action_dim tokens for a batch of prompts (each BOS + prompt +
        empty piece).

        Prompts of different lengths are left-padded so that every row's next token is at the end.
        Returns [B, chunk_size * action_dim] token ids.
        """
        device = pixel_values_BCHW.device
        B, L = len(prompt_ids), max(len(p) for p in prompt_ids)
        self._check_context(L)
        pad = self.config.pad_token_id
        ids, mask = pad_prompts(prompt_ids, pad, left=True, device=device)
        # Left padding puts BOS at a different column per row; build the sequence row-wise instead.
        text_BLD = self.language_model.get_input_embeddings()(ids)
        prefix_BPD, prefix_mask = self._prefix(pixel_values_BCHW, proprio_BP, image_mask_BN, text_BLD.dtype)
        P = prefix_BPD.shape[1]
        emb = text_BLD.new_zeros((B, L + P, text_BLD.shape[-1]))
        full_mask = mask.new_zeros((B, L + P))
        occupied = mask.new_zeros((B, L + P))  # incl. a missing camera's (masked) patches, as in training
        for b, p in enumerate(prompt_ids):
            start = L - len(p)
            row = torch.cat([text_BLD[b, start : start + 1], prefix_BPD[b], text_BLD[b, start + 1 :]])
            row_mask = torch.cat([mask.new_ones(1), prefix_mask[b].to(mask.dtype), mask.new_ones(len(p) - 1)])
            emb[b, L + P - row.shape[0] :] = row
            full_mask[b, L + P - row.shape[0] :] = row_mask
            occupied[b, L + P - row.shape[0] :] = 1
        emb[occupied == 0] = self.language_model.get_input_embeddings()(ids.new_tensor([pad]))[0].to(
            emb.dtype
        )
        position_ids = (occupied.cumsum(-1) - 1).clamp(min=0)
        out = self.language_model(
            inputs_embeds=emb, attention_mask=full_mask, position_ids=position_ids, use_cache=True
        )
        tokens = []
        n = self.config.num_action_slots
        next_tok = out.logits[:, -1].argmax(-1)
        for step in range(n):
            tokens.append(next_tok)
            if step == n - 1:
                break
            full_mask = torch.cat([full_mask, full_mask.new_ones((B, 1))], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = self.language_model(
                input_ids=next_tok[:, None],
                attention_mask=full_mask,
                position_ids=position_ids,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            next_tok = out.logits[:, -1].argmax(-1)
        return torch.stack(tokens, dim=1)
