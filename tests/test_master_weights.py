"""World size 1 with bf16 compute: ``MasterWeights`` (a bf16 compute copy, fp32 masters, no FSDP)
computes what FSDP2's mixed-precision policy computes, and the trainer uses and resumes it.

Runs on the CPU in bf16 (the policy is forced on; on CUDA it is the default)."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from helpers import step_losses

from randsac_fast import models, orders
from randsac_fast.runtime.parallel import init_distributed, parallelize

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def _pair(name, extra):
    torch.manual_seed(0)
    base = models.build(name, backend="sdpa", **TINY, **extra)
    d = init_distributed("cpu")
    fsdp = parallelize(copy.deepcopy(base), d, shard=True, mixed_precision=True, per_block=True)
    master = parallelize(copy.deepcopy(base), d, mixed_precision=True, master_weights=True)
    return base, fsdp, master


@pytest.mark.parametrize("name, extra, spec, steps", [
    ("randsac_vit_tiny", dict(decoder_depth=1), "square:4", 3),
    ("saim_vit_tiny", dict(query_depth=1, blur_kernel=3), "random", 3),
    # With skip memory an encoder state's gradient sums three bf16 contributions, in an order that
    # FSDP's block hooks change: bitwise equal on the first step only (then within bf16 rounding).
    ("randsac_vit_tiny", dict(decoder_depth=1, skip_memory=True), "square:4", 1),
])
def test_master_weights_equal_fsdp_mixed_precision_bitwise(group, name, extra, spec, steps):
    from torch.distributed.fsdp import FSDPModule
    base, fsdp, master = _pair(name, extra)
    assert isinstance(fsdp, FSDPModule) and not isinstance(master, FSDPModule)
    mixed = master.master_weights
    assert all(p.dtype == torch.float32 for p in master.parameters())
    assert all(p.dtype == torch.bfloat16 for p in mixed.compute.parameters())
    opt_f = torch.optim.AdamW(fsdp.parameters(), lr=1e-2)
    opt_m = torch.optim.AdamW(master.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for micro in range(2):                         # gradient accumulation: no sync on the first
            x = torch.randn(4, 3, 16, 16, generator=g)
            order = orders.sample(spec, 4, base.grid, generator=g)
            fsdp.set_requires_gradient_sync(micro == 1)
            loss_f, loss_m = fsdp(x, order), master(x, order)
            assert torch.equal(loss_f, loss_m)
            (loss_f / 2).backward()
            (loss_m / 2).backward()
            mixed.grads_to_master()
        for (n, pf), pm in zip(fsdp.named_parameters(), master.parameters()):
            assert pm.grad.dtype == torch.float32 and torch.equal(pf.grad.full_tensor(), pm.grad), n
        opt_f.step()
        opt_m.step()
        mixed.params_to_compute()
        opt_f.zero_grad()
        opt_m.zero_grad()
        for (n, pf), pm, pc in zip(fsdp.named_parameters(), master.parameters(), mixed.compute.parameters()):
            assert torch.equal(pf.full_tensor(), pm), n
            assert torch.equal(pc, pm.to(torch.bfloat16)), n     # the compute copy is the rounded master
    # evaluation runs the bf16 copy too
    with torch.no_grad():
        assert torch.equal(master.forward_features(x), fsdp.forward_features(x))


def test_trainer_runs_master_weights_and_resumes_bitwise(tmp_path, monkeypatch):
    """The trainer at world size 1 with bf16 compute (forced on, as on CUDA): no FSDP, the step
    moves gradients and weights between the copies, and a resume from a checkpoint reproduces the
    uninterrupted run's losses exactly (the compute copy is rebuilt from the loaded masters)."""
    from torch.distributed.fsdp import FSDPModule

    from randsac_fast import train
    from randsac_fast.train import trainer as trainer_mod
    built = []

    def forced(model, dist_info, **kw):
        out = parallelize(model, dist_info, mixed_precision=True, **kw)
        built.append(out)
        return out
    monkeypatch.setattr(trainer_mod, "parallelize", forced)
    args = ["--embed-dim", "16", "--depth", "1", "--num-heads", "2", "--decoder-depth", "1", "--decoder-num-heads",
            "2", "--batch-size", "16", "--accum", "2", "--steps", "4", "--ckpt-every", "2", "--keep", "5",
            "--log-every", "1", "--no-probe", "--blr", "1e-2"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert train.main([*args, "--out", str(ref)]) == 0
    assert hasattr(built[-1], "master_weights") and not isinstance(built[-1], FSDPModule)
    # the same run cut after its step-2 checkpoint: later checkpoints and log lines removed
    shutil.copytree(ref, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000004")
    lines = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "metrics.jsonl").write_text("".join(l for l in lines if json.loads(l)["step"] <= 2))
    assert sorted(step_losses(cut)) == [1, 2]
    assert train.main([*args, "--out", str(cut), "--resume", "latest"]) == 0
    expected, got = step_losses(ref), step_losses(cut)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    assert got == expected                       # bitwise: JSON round-trips floats exactly
    assert len(set(expected.values())) == 4      # it trains: every step's loss differs
    # --no-master-weights keeps FSDP2 at world size 1
    assert train.main([*args, "--steps", "1", "--out", str(tmp_path / "fsdp"), "--no-master-weights"]) == 0
    assert isinstance(built[-1], FSDPModule)


def test_fsdp_mixed_precision_blocks_share_one_dense_mask(group, monkeypatch):
    """FSDP2's policy rebuilds each block's bounds argument (``dataclasses.replace``) to cast it;
    the copies share the derived-mask cache, so the SDPA path builds each pattern's mask once per
    forward (3 patterns here: encoder, decoder, cross), not once per block."""
    from randsac_fast.ops.attention_bounds import SegmentBounds
    _, fsdp, _ = _pair("randsac_vit_tiny", dict(decoder_depth=2))
    builds = []
    real = SegmentBounds.mask
    monkeypatch.setattr(SegmentBounds, "mask", lambda self: builds.append(self.shape) or real(self))
    g = torch.Generator().manual_seed(2)
    fsdp(torch.randn(2, 3, 16, 16, generator=g), orders.sample("square:4", 2, fsdp.grid, generator=g))
    assert len(builds) == 3, builds
