"""The global batch (as presets and papers state it) -> per-rank micro-batch and accumulation."""
import pytest

from randsac_fast import config
from randsac_fast.runtime.batch import plan_batch
from randsac_fast.train import trainer


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_global_batch_is_the_same_at_any_world_size(world):
    plan = plan_batch(2048, world)
    assert (plan.per_rank * plan.accum * world, plan.accum) == (2048, 1)


def test_micro_batch_cap_derives_the_accumulation():
    assert plan_batch(2048, 8, micro_batch=128) == plan_batch(2048, 8, accum=2)          # SAIM on 8 GPUs
    assert (plan_batch(2048, 8, micro_batch=100).per_rank, plan_batch(2048, 8, micro_batch=100).accum) == (64, 4)


@pytest.mark.parametrize("args, message", [
    ((100, 3), "global batch 100 (--batch-size) is not divisible by the 3 processes; choose --batch-size a multiple of 3"),
    ((128, 2, 3), "not divisible into --accum 3 micro-batches; choose --batch-size a multiple of 6"),
    ((128, 2, 2, 16), "--accum 2 gives 32 images per rank, more than --micro-batch 16"),
    ((0, 1), "--batch-size must be >= 1; got 0"),
])
def test_a_batch_that_does_not_divide_is_one_clear_error(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_batch(*args)


def test_paper_presets_state_global_batches():
    assert config.parse_args(["--preset", "saim_in1k_vitb"]).train.batch_size == 2048       # SAIM Table 6
    assert config.parse_args(["--preset", "randsac_cifar10_square"]).train.batch_size == 512  # RandSAC Table 14


def test_trainer_refuses_an_indivisible_batch_before_starting(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert trainer.main(["--batch-size", "128", "--out", str(tmp_path / "run")]) == 1
    assert "error: global batch 128 (--batch-size) is not divisible by the 3 processes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()      # nothing was started or written
