"""The memory preflight (training/preflight.py): its estimate against the measured peak RSS of real
training steps on CPU (full fine-tune, LoRA and nf4 QLoRA of a 120 M-parameter model), its parameter
inventory against the trainer's own LoRA/QLoRA, the refusal of an impossible 7B config before any weight
is read, warn/off, and `vla-train --preflight-only`."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from vla_test_utils import REPO, run_cli
from vla_train.config import ConfigError, LoraConfig, ModelConfig, TrainConfig, TrainingConfig
from vla_train.config_cli import parse_config
from vla_train.training.preflight import check_before_loading, estimate, format_table
from vla_train.training.preflight_measure import measured_peak_bytes, measurement_prompt_tokens

# 120 M parameters (8 Llama layers of width 1024), small towers: big enough that weights, optimizer
# states and activations are each hundreds of MB, small enough for three CPU runs in a minute or two.
MEASURED_MODEL = ModelConfig(
    image_size=64, patch_size=16,
    dino_hidden_size=256, dino_num_layers=3, dino_num_heads=4,
    siglip_hidden_size=256, siglip_num_layers=3, siglip_num_heads=4,
    llm_hidden_size=1024, llm_num_layers=8, llm_num_heads=16, llm_intermediate_size=2816,
    text_vocab_size=4096, max_length=512,
)  # fmt: skip


def _measured_config(mode: str) -> TrainConfig:
    lora = LoraConfig(enabled=mode != "full", quantization="nf4" if mode == "nf4" else "none")
    return TrainConfig(model=MEASURED_MODEL, lora=lora, training=TrainingConfig(batch_size=4))


def _7b_full_finetune_on_24gb(*extra: str) -> TrainConfig:
    """Full fine-tune of the openvla-7b shape, one process, planned for a 24 GiB device."""
    recipe = str(REPO / "configs/finetune_full_fsdp.yaml")
    args = [
        "--config_path",
        recipe,
        "--distributed.strategy",
        "single",
        "--training.preflight_device_memory_gb",
        "24",
    ]
    return parse_config(TrainConfig, [*args, *extra], validate=False)


@pytest.mark.slow
def test_estimate_is_within_15_percent_of_the_measured_peak_on_cpu():
    configs = {mode: _measured_config(mode) for mode in ("full", "lora", "nf4")}
    with ThreadPoolExecutor(len(configs)) as pool:  # three fresh processes side by side
        measured = dict(zip(configs, pool.map(measured_peak_bytes, configs.values()), strict=True))
    errors = {}
    for mode, cfg in configs.items():
        est = estimate(cfg, 1, "cpu", prompt_tokens=measurement_prompt_tokens(cfg))
        assert est.num_params >= 100e6, est.num_params
        errors[mode] = 100 * (est.peak_bytes - measured[mode]) / measured[mode]
        print(
            f"{mode}: estimated {est.peak_bytes / 2**20:.1f} MiB, measured {measured[mode] / 2**20:.1f} MiB, "
            f"error {errors[mode]:+.1f}%\n{format_table(est)}"
        )
    assert all(abs(e) < 15 for e in errors.values()), errors


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_inventory_matches_the_trainers_lora(quantization):
    """The estimate's trainable parameters and weight bytes are those of the model apply_lora makes."""
    import bitsandbytes as bnb

    from vla_train.models.load import build_from_config
    from vla_train.models.peft import apply_lora

    lora = LoraConfig(rank=8, target_modules=["all-linear", "lm_head"], modules_to_save=["projector"])
    cfg = TrainConfig(model=ModelConfig(), lora=dataclasses.replace(lora, quantization=quantization))
    est = estimate(cfg, 1, "cpu")

    model, _ = build_from_config(cfg.model, ["pick up the block"], seed=0)
    vla = apply_lora(model, cfg.lora, "cpu").get_base_model()
    assert est.num_trainable == sum(p.numel() for p in vla.parameters() if p.requires_grad)
    stored, seen = 0, set()
    for p in vla.parameters():
        tensors = [p]
        if isinstance(p, bnb.nn.Params4bit):
            qs = p.quant_state
            tensors += [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
        for t in tensors:
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                stored += t.untyped_storage().nbytes()
    rows = {r.name: r.num_bytes for r in est.rows}
    assert rows["base weights"] + rows["trainable weights"] == pytest.approx(stored, rel=0.01)


def test_full_finetune_of_7b_on_one_24gb_device_is_refused_before_any_weight_is_read(monkeypatch):
    import safetensors
    import safetensors.torch

    def no_weights(*args, **kwargs):
        raise AssertionError("the preflight read weights")

    monkeypatch.setattr(safetensors.torch, "load_file", no_weights)
    monkeypatch.setattr(safetensors, "safe_open", no_weights)
    monkeypatch.setattr(torch, "load", no_weights)
    cfg = _7b_full_finetune_on_24gb()
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        check_before_loading(cfg, world_size=1, local_world_size=1)
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert message.startswith("training.preflight:")
    for fix in (
        "training.grad_accum_steps",
        "lora.enabled true",
        "lora.quantization nf4",
        "distributed.strategy fsdp",
    ):
        assert fix in message, message
    assert "GiB, fits" in message, message  # at least one fix is estimated to fit
    # seconds, not the minutes (and 30 GB) a real build of 7.5 B parameters would take
    assert elapsed < 30, elapsed


def test_warn_goes_on_and_off_does_nothing(capsys):
    cfg = _7b_full_finetune_on_24gb("--training.preflight", "warn")
    est = check_before_loading(cfg, world_size=1, local_world_size=1)
    out = capsys.readouterr().out
    assert est is not None and not est.fits
    assert (
        "memory preflight" in out
        and "DOES NOT FIT" in out
        and "warning:" in out
        and "lora.enabled true" in out
    )

    assert check_before_loading(cfg, world_size=1, local_world_size=1, is_main=False) is not None
    assert capsys.readouterr().out == ""  # other ranks print nothing

    off = _7b_full_finetune_on_24gb("--training.preflight", "off")
    assert check_before_loading(off, world_size=1, local_world_size=1) is None
    assert capsys.readouterr().out == ""


def test_preflight_only_prints_the_table_and_exits(tmp_path):
    data = tmp_path / "data"
    (data / "vla_synthetic").mkdir(parents=True)
    common = ["--data.data_root_dir", str(data), "--logging.output_dir", str(tmp_path / "runs")]
    proc = run_cli(
        "train_main", "--preflight-only", "--config_path", "configs/finetune_lora.yaml",
        "--training.preflight_device_memory_gb", "80", "--training.grad_accum_steps", "2", *common,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for part in (
        "memory preflight",
        "base weights",
        "activations",
        "total",
        "device capacity",
        "headroom",
        "fits",
    ):
        assert part in proc.stdout, proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing was started

    # nothing of the data side (TensorFlow) is imported, and no weight is read
    code = (
        "import sys, safetensors.torch\n"
        "safetensors.torch.load_file = None\n"
        "from vla_train.cli import train_main\n"
        "train_main(sys.argv[1:])\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    args = [
        "--preflight-only",
        "--config_path",
        "configs/demo.yaml",
        "--data.build_synthetic",
        "false",
        *common,
    ]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "memory preflight" in proc.stdout


def test_pretrained_dirs_are_estimated_from_their_config_and_weights_header(tmp_path, tokenizer):
    """An OpenVLA-format directory (bf16, converted on load) and a vla_train one: the parameter count of
    the model they load, and the stored dtype as the frozen base's under LoRA."""
    from test_openvla_format import TINY as OPENVLA_TINY
    from test_openvla_format import openvla_config_json, openvla_shapes, random_state, write_openvla_dir

    from vla_train.models.load import load_model_dir

    vocab = (len(tokenizer) + 63) // 64 * 64
    state = {k: v.to(torch.bfloat16) for k, v in random_state(openvla_shapes(OPENVLA_TINY, vocab)).items()}
    d = write_openvla_dir(
        tmp_path / "openvla", state, openvla_config_json(OPENVLA_TINY, tokenizer), tokenizer
    )
    model, _ = load_model_dir(d)
    cfg = TrainConfig(model=ModelConfig(pretrained_dir=str(d)))
    est = estimate(cfg, 1, "cpu")
    assert "OpenVLA-format" in est.summary[0] and "sizes from the model section" not in est.summary[0]
    assert est.num_params == sum(p.numel() for p in model.parameters())
    rows = {r.name: r for r in est.rows}
    assert "bf16" in rows["base weights"].detail
    assert rows["base weights"].num_bytes == pytest.approx(2 * est.num_params, rel=0.05)

    from vla_train.models.load import build_from_config, save_model_dir

    built, processor = build_from_config(ModelConfig(), ["pick up the block"], seed=0)
    ours = save_model_dir(tmp_path / "ours", built.to(torch.bfloat16), processor)
    est = estimate(TrainConfig(model=ModelConfig(pretrained_dir=str(ours))), 1, "cpu")
    assert est.num_params == sum(p.numel() for p in built.parameters())
    assert "bf16" in next(r.detail for r in est.rows if r.name == "base weights")


@pytest.fixture(scope="module")
def tokenizer():
    from test_openvla_format import INSTRUCTIONS

    from vla_train.models.tokenizer import build_local_tokenizer

    return build_local_tokenizer(INSTRUCTIONS, 200, 256)
