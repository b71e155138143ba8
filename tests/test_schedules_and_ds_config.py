import math

import pytest

from tessera.parallel.deepspeed_config import build_deepspeed_config
from tessera.training.schedules import cosine, kl_weight, lr_factor, temperature


def test_temperature_anneals_one_to_one_sixteenth():
    assert temperature(0, steps=1000) == pytest.approx(1.0)
    assert temperature(500, steps=1000) == pytest.approx((1 + 1 / 16) / 2)
    assert temperature(1000, steps=1000) == pytest.approx(1 / 16)
    assert temperature(5000, steps=1000) == pytest.approx(1 / 16)  # flat after the anneal
    assert temperature(250, steps=1000) > temperature(500, steps=1000) > temperature(750, steps=1000)


def test_kl_weight_ramps_zero_to_six_point_six():
    assert kl_weight(0, steps=5000) == 0.0
    assert kl_weight(2500, steps=5000) == pytest.approx(3.3)
    assert kl_weight(5000, steps=5000) == pytest.approx(6.6)
    assert kl_weight(9000, steps=5000) == pytest.approx(6.6)


def test_lr_warmup_then_cosine():
    assert lr_factor(0, warmup=10, total=110) == pytest.approx(0.1)
    assert lr_factor(9, warmup=10, total=110) == pytest.approx(1.0)
    assert lr_factor(10, warmup=10, total=110) == pytest.approx(1.0)
    assert lr_factor(60, warmup=10, total=110, min_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(110, warmup=10, total=110, min_ratio=0.1) == pytest.approx(0.1)
    assert cosine(3, start=2.0, end=2.0, steps=0) == 2.0
    assert math.isclose(cosine(-5, start=1.0, end=0.0, steps=10), 1.0)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("world, micro, accum", [(1, 8, 1), (2, 4, 3), (16, 2, 4)])
def test_deepspeed_batch_identity_and_stage(stage, world, micro, accum):
    cfg = build_deepspeed_config(micro_batch=micro, grad_accum=accum, world_size=world, zero_stage=stage)
    assert cfg["train_batch_size"] == micro * accum * world
    assert cfg["train_micro_batch_size_per_gpu"] == micro and cfg["gradient_accumulation_steps"] == accum
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["zero_allow_untested_optimizer"] is True
    assert ("stage3_gather_16bit_weights_on_model_save" in cfg["zero_optimization"]) == (stage == 3)


def test_deepspeed_precision_and_zeropp_keys():
    assert build_deepspeed_config(micro_batch=1, grad_accum=1, world_size=1, zero_stage=2,
                                  precision="bf16")["bf16"] == {"enabled": True}
    fp16 = build_deepspeed_config(micro_batch=1, grad_accum=1, world_size=1, zero_stage=2,
                                  precision="fp16")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling
    fp32 = build_deepspeed_config(micro_batch=1, grad_accum=1, world_size=1, zero_stage=2, grad_clip=None)
    assert "bf16" not in fp32 and "fp16" not in fp32 and "gradient_clipping" not in fp32
    hpz = build_deepspeed_config(micro_batch=1, grad_accum=1, world_size=16, zero_stage=3,
                                 hpz_partition_size=8)
    assert hpz["zero_optimization"]["zero_hpz_partition_size"] == 8
    with pytest.raises(ValueError, match="needs zero_stage 3"):
        build_deepspeed_config(micro_batch=1, grad_accum=1, world_size=16, zero_stage=2, hpz_partition_size=8)
    with pytest.raises(ValueError, match="not a multiple"):
        build_deepspeed_config(micro_batch=1, grad_accum=1, world_size=12, zero_stage=3, hpz_partition_size=8)
    with pytest.raises(ValueError):
        build_deepspeed_config(micro_batch=0, grad_accum=1, world_size=1, zero_stage=2)
