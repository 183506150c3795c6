"""Issue 14: several cameras, proprio, action chunks at inference and the l1_parallel head (OpenVLA-OFT's
parallel decoding with an L1 regression head): the attention mask, the shapes every path returns, a
pretrained token model turned into an l1_parallel one, chunks executed in closed loop, and a full run
(LoRA, chunks, proprio, two cameras: train, resume, export, reload) through the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_model import INSTRUCTIONS, TINY
from test_trainer import tiny_args, train_losses

LAYOUT = {"chunk_size": 4, "cameras": ["primary", "wrist"], "proprio_dim": 3}
STATS = {
    "d": {
        "action": {
            "q01": [-1.0] * 7,
            "q99": [1.0] * 7,
            "min": [-1.0] * 7,
            "max": [1.0] * 7,
            "mask": [True] * 6 + [False],
        },
        "proprio": {"q01": [-2.0] * 3, "q99": [2.0] * 3, "min": [-2.0] * 3, "max": [2.0] * 3},
        "normalization": "bounds_q99",
    }
}


def tiny(head: str, layout=LAYOUT, attn: str = "sdpa"):
    from vla_train.models.load import build_from_config

    model, processor = build_from_config(
        replace(TINY, action_head=head, attn_implementation=attn), INSTRUCTIONS, 0, layout
    )
    model.config.norm_stats = STATS
    return model.eval(), processor


def frames(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    s = TINY.image_size
    return {
        "primary": rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
        "wrist": rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
    }


def test_the_l1_parallel_mask_is_causal_over_the_prompt_and_bidirectional_among_the_slots():
    from vla_train.models.vla import l1_parallel_mask

    # BOS, 2 prefix tokens, 1 text token, 3 slots, 1 pad
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    slot = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    allowed = l1_parallel_mask(valid, slot)[0, 0]
    for q in range(4):  # the prompt: causal, never a slot
        assert allowed[q].tolist() == [k <= q for k in range(8)]
    for q in range(4, 7):  # a slot: every prompt token and every slot, before and after it, no pad
        assert allowed[q].tolist() == [True] * 7 + [False]
    assert allowed[5, 6] and allowed[4, 6]  # placeholder i attends to placeholder j > i
    assert not allowed[:7, 7].any()  # nobody attends to the pad


def test_slots_see_each_other_and_the_prompt_never_sees_them():
    """The behaviour behind the mask: changing the last slot's embedding moves the first chunk step's
    prediction (slots attend forward), and leaves every prompt hidden state bit for bit as it was."""
    model, processor = tiny("l1_parallel")
    x = processor.collate(
        frames(2), INSTRUCTIONS[:2], np.zeros((2, 4, 7), np.float32), proprio_BP=np.zeros((2, 3))
    )
    hidden = {}

    def keep(_, __, output):
        hidden["last"] = output.last_hidden_state.clone()

    handle = model.language_model.model.register_forward_hook(keep)
    with torch.no_grad():
        before = model(**x).actions_pred_BKA
        prompt_before = hidden["last"]
        model.action_slots[-1] += 1.0  # the last slot: chunk step 3, last dimension
        after = model(**x).actions_pred_BKA
        prompt_after = hidden["last"]
    handle.remove()
    assert not torch.equal(before[:, 0], after[:, 0])
    n_prompt = model.config.num_prefix_tokens + x["attention_mask_BL"].sum(1).min().item()
    assert torch.equal(prompt_before[:, :n_prompt], prompt_after[:, :n_prompt])


def test_sdpa_and_eager_take_the_same_mask():
    model, processor = tiny("l1_parallel", attn="eager")
    torch.manual_seed(0)
    reference, _ = tiny("l1_parallel", attn="sdpa")
    x = processor.collate(
        frames(2), INSTRUCTIONS[:2], np.zeros((2, 4, 7), np.float32), proprio_BP=np.zeros((2, 3))
    )
    with torch.no_grad():
        got, want = model(**x).actions_pred_BKA, reference(**x).actions_pred_BKA
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["tokens", "l1_parallel"])
def test_predict_action_returns_the_whole_chunk_for_either_head(head):
    from vla_train.models.policy import VLAPolicy

    model, processor = tiny(head)
    policy = VLAPolicy(model, processor)
    images = frames(3)
    masks = {"wrist": np.array([True, False, True])}
    batch = policy.predict_action_batch(images, INSTRUCTIONS[:3], proprio=np.ones((3, 3)), image_masks=masks)
    assert batch.shape == (3, 4, 7) and np.isfinite(batch).all()
    one = policy.predict_action({r: f[0] for r, f in images.items()}, INSTRUCTIONS[0], proprio=np.ones(3))
    assert one.shape == (4, 7)
    np.testing.assert_allclose(one, batch[0], atol=1e-5)  # batching does not change a frame's chunk
    # a masked camera's frames are not looked at
    other = {"primary": images["primary"], "wrist": frames(3, seed=9)["wrist"]}
    again = policy.predict_action_batch(other, INSTRUCTIONS[:3], proprio=np.ones((3, 3)), image_masks=masks)
    np.testing.assert_allclose(again[1], batch[1], atol=1e-5)
    with pytest.raises(ValueError, match="proprio"):
        policy.predict_action_batch(images, INSTRUCTIONS[:3])
    with pytest.raises(ValueError, match="wrist"):
        policy.predict_action_batch(images["primary"], INSTRUCTIONS[:3], proprio=np.ones((3, 3)))


def test_a_token_model_keeps_its_one_action_output_and_a_chunk_model_decodes_the_chunk():
    from vla_train.models.policy import VLAPolicy

    single, processor = tiny("tokens", layout=None)
    assert VLAPolicy(single, processor).predict_action_batch(
        frames(2)["primary"], INSTRUCTIONS[:2], "d"
    ).shape == (2, 7)
    chunked, processor = tiny("tokens", layout={"chunk_size": 3, "cameras": ["primary"], "proprio_dim": 0})
    tokens = VLAPolicy(chunked, processor).predict_tokens(frames(2)["primary"], INSTRUCTIONS[:2])
    assert tokens.shape == (2, 21)


def test_a_pretrained_token_model_becomes_an_l1_parallel_one(tmp_path):
    """Fine-tuning a token model (e.g. openvla-7b) with l1_parallel, chunks and proprio: its weights are
    kept, the new modules are created from the seed (the same on every rank), the rest stays."""
    from vla_train.models.load import load_with_layout, save_model_dir, stored_layout

    base, processor = tiny("tokens", layout=None)
    save_model_dir(tmp_path / "base", base, processor, STATS)
    layout = {"action_head": "l1_parallel", "head_hidden_size": 0, **LAYOUT}
    a, proc_a, added = load_with_layout(tmp_path / "base", layout, seed=5)
    b, _, _ = load_with_layout(tmp_path / "base", layout, seed=5)
    assert added == ["proprio_projector", "action_slots", "action_head"]
    assert proc_a.action_head == "l1_parallel" and proc_a.cameras == ("primary", "wrist")
    for name, p in base.state_dict().items():
        assert torch.equal(a.state_dict()[name], p), name
    for name, p in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], p), name
    assert stored_layout(tmp_path / "base")["action_head"] == "tokens"
    wrist = {**layout, "action_head": "tokens", "proprio_dim": 0}
    c, proc_c, added = load_with_layout(tmp_path / "base", wrist, seed=5)  # no new module, new inputs
    assert added == [] and proc_c.cameras == ("primary", "wrist") and c.config.chunk_size == 4
    with pytest.raises(ValueError, match="l1_parallel head predicts chunks of 4"):
        a.set_layout({**layout, "chunk_size": 8})


def test_a_chunk_is_executed_open_loop_then_the_model_is_asked_again():
    from vla_train.eval.policies import ModelPolicy

    calls = []

    class Fake:
        model = SimpleNamespace(config=SimpleNamespace(norm_stats={"d": {}}, action_dim=7, chunk_size=4))
        processor = SimpleNamespace(
            settings=SimpleNamespace(image_size=8), cameras=("primary",), proprio_dim=0
        )

        def predict_action_batch(self, images, instructions, key, proprio=None):
            calls.append(len(images))
            step = np.arange(4, dtype=np.float32)[None, :, None]
            return np.broadcast_to(step + 10 * len(calls), (len(images), 4, 7)).copy()

    obs = {"frames": {"image": np.zeros((8, 8, 3), np.uint8)}, "state": np.zeros(4)}
    trial = SimpleNamespace(task="reach-v3", seed=0, index=0)
    for execute, expected_calls in ((0, 3), (2, 5)):
        calls.clear()
        policy = ModelPolicy(Fake(), "d", execute_steps=execute)
        got = [policy.act([obs], ["x"], [trial], [t])[0][0] for t in range(10)]
        assert len(calls) == expected_calls
        per = execute or 4
        assert got[:per] == [10 + i for i in range(per)]  # the first chunk, step by step
        assert got[per] == 20  # then the next query's first action
        policy.act([obs], ["x"], [trial], [10])
        assert policy.last_query_size == (1 if 10 % per == 0 else 0)  # the model is asked only when due
    with pytest.raises(ValueError, match="execute_steps: 5 is more than the 4 actions"):
        ModelPolicy(Fake(), "d", execute_steps=5)


def test_lora_leaves_the_new_modules_whole():
    from vla_train.config import LoraConfig
    from vla_train.models.peft import apply_lora, lora_targets

    model, _ = tiny("l1_parallel")
    named = lora_targets(model, LoraConfig(enabled=True, target_modules=["all-linear", "fc1", "fc2"]))
    assert named and not [t for t in named if t.startswith(("action_head", "proprio_projector"))]
    with pytest.raises(ValueError, match="already train whole under LoRA"):
        lora_targets(model, LoraConfig(enabled=True, modules_to_save=["action_head"]))
    peft_model = apply_lora(model, LoraConfig(enabled=True, rank=4), "cpu")
    trainable = {
        n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters() if p.requires_grad
    }
    assert {"action_slots", "action_head.model.fc1.weight", "proprio_projector.fc2.bias"} <= trainable
    assert not [n for n in trainable if "lm_head" in n]  # unused by the l1 head: frozen (DDP needs it)


@pytest.mark.slow
def test_l1_parallel_with_lora_chunks_proprio_and_two_cameras_trains_resumes_and_exports(
    small_synthetic, tmp_path
):
    """Through the CLI: LoRA with the l1_parallel head (trained whole), chunks of 4, proprio, a wrist
    camera the dataset lacks (masked). The loss falls, the metrics have the normalized and physical L1
    and the bin agreement, a resumed run continues to the same losses as an uninterrupted one, the export
    reproduces the trained model and predicts chunks from the exported directory."""
    from vla_test_utils import run_cli
    from vla_train.models.policy import VLAPolicy

    root, _ = small_synthetic
    extra = [
        "--model.action_head", "l1_parallel", "--model.use_proprio", "true", "--model.attn_implementation", "sdpa",
        "--data.future_action_window_size", "3", "--data.cameras", "[primary, wrist]",
        "--lora.enabled", "true", "--lora.rank", "4", "--training.learning_rate", "0.003",
        "--training.checkpoint_every", "6",
    ]  # fmt: skip
    whole = tmp_path / "runs"

    def cli(entry, *args):
        proc = run_cli(entry, *args, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    cli("train_main", *tiny_args(root, whole, "whole", "--training.max_steps", "12", *extra))
    cli("train_main", *tiny_args(root, whole, "split", "--training.max_steps", "6", *extra))
    cli("train_main", *tiny_args(root, whole, "split", "--training.max_steps", "12", *extra))
    losses = train_losses(whole / "whole")
    assert losses[12] < losses[1]
    assert train_losses(whole / "split") == losses  # the resumed run continues bit for bit
    val = [m for m in json_lines(whole / "whole" / "metrics.jsonl") if "val/action_l1" in m][-1]
    for key in (
        "val/action_l1",
        "val/action_l1_physical",
        "val/action_token_accuracy",
        "val/generated_action_l1",
    ):
        assert key in val, key
    printed = cli("export_main", "--run_dir", str(whole / "whole"), "--predict_samples", "2").stdout
    assert "the first of its chunk" in printed
    exported = whole / "whole" / "export"
    config = json.loads((exported / "config.json").read_text())
    assert (config["action_head"], config["chunk_size"], config["cameras"], config["proprio_dim"]) == (
        "l1_parallel",
        4,
        ["primary", "wrist"],
        8,
    )  # fmt: skip (the synthetic data's proprio is 8 wide)
    policy = VLAPolicy.from_dir(exported)
    s = policy.processor.settings.image_size
    images = {"primary": np.zeros((2, s, s, 3), np.uint8), "wrist": np.zeros((2, s, s, 3), np.uint8)}
    actions = policy.predict_action_batch(images, ["x", "y"], proprio=np.zeros((2, 8)))
    assert actions.shape == (2, 4, 7) and np.isfinite(actions).all()


def json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_ddp_and_fsdp_turn_a_pretrained_token_model_into_l1_parallel_as_one_process_does(
    small_synthetic, tmp_path
):
    """model.pretrained_dir = a token model, model.action_head l1_parallel with chunks and proprio: the
    new modules are made from the seed on every rank, the model is loaded whole and sharded (FSDP2, 2
    processes on gloo), and the losses match a one-process run of the same global batch."""
    from test_distributed import LOSS_ATOL, ok

    from vla_test_utils import run_cli
    from vla_test_utils import torchrun as launch
    from vla_train.models.load import save_model_dir

    root, _ = small_synthetic
    base, processor = tiny("tokens", layout=None)
    save_model_dir(tmp_path / "base", base, processor, STATS)
    extra = [
        "--model.pretrained_dir", str(tmp_path / "base"), "--model.action_head", "l1_parallel",
        "--model.use_proprio", "true", "--model.attn_implementation", "sdpa",
        "--data.future_action_window_size", "3", "--lora.enabled", "false", "--training.max_steps", "6",
        "--training.data_sharding", "batch_slice", "--training.num_val_frames", "8",
    ]  # fmt: skip
    ok(run_cli("train_main", *tiny_args(root, tmp_path, "single", *extra), timeout=300))
    single = train_losses(tmp_path / "single")
    assert sorted(single) == list(range(1, 7)) and single[6] < single[1]
    for strategy in ("ddp", "fsdp"):  # DDP: the unused LM head is frozen, or DDP would refuse the step
        proc = ok(
            launch(
                "-m",
                "vla_train.cli",
                *tiny_args(root, tmp_path, strategy, *extra, "--distributed.strategy", strategy),
                nproc=2,
                timeout=300,
            )  # fmt: skip
        )
        if strategy == "fsdp":
            assert "a model of another layout: every rank loads it whole, then shards it" in proc.stdout
        losses = train_losses(tmp_path / strategy)
        assert sorted(losses) == sorted(single)
        assert max(abs(single[s] - losses[s]) for s in single) <= LOSS_ATOL, (strategy, single, losses)


def test_vla_serve_refuses_a_chunk_model_with_what_it_has():
    from vla_train.config import ServeConfig
    from vla_train.models.policy import VLAPolicy
    from vla_train.serving.server import PolicyService

    model, processor = tiny("l1_parallel")
    with pytest.raises(
        ValueError, match=r"chunks of 4, cameras \['primary', 'wrist'\], proprio \(3 values\)"
    ):
        PolicyService(VLAPolicy(model, processor), ServeConfig(policy="unused"))
