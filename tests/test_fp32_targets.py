"""Under bf16 mixed precision (master weights, FSDP2) the images stay fp32 into the target
computation (norm-pix / blur targets from fp32 pixels, as MAE), while the encoder computes in bf16."""
import copy

import pytest
import torch

from randsac_fast import models, ops, orders
from randsac_fast.runtime.parallel import init_distributed, parallelize

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize("wrap", ["master_weights", "fsdp"])
@pytest.mark.parametrize("name, extra, spec", [("randsac_vit_tiny", dict(decoder_depth=1), "square:4"),
                                               ("saim_vit_tiny", dict(query_depth=1, blur_kernel=3), "random")])
def test_targets_see_fp32_pixels_and_the_encoder_bf16(group, monkeypatch, wrap, name, extra, spec):
    torch.manual_seed(0)
    base = models.build(name, backend="sdpa", **TINY, **extra)
    d = init_distributed("cpu")
    model = (parallelize(copy.deepcopy(base), d, mixed_precision=True, master_weights=True) if wrap == "master_weights"
             else parallelize(copy.deepcopy(base), d, shard=True, mixed_precision=True, per_block=True))
    seen = {}
    real_loss = ops.patch_loss

    def spy(pred, images, *args, **kwargs):
        seen.update(pred=pred, images=images, args=args, kwargs=kwargs)
        return real_loss(pred, images, *args, **kwargs)
    monkeypatch.setattr(ops, "patch_loss", spy)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g)
    order = orders.sample(spec, 4, base.grid, generator=g)
    loss = model(x, order)
    assert seen["pred"].dtype == torch.bfloat16                       # the model computed in bf16
    assert seen["images"].dtype == torch.float32 and torch.equal(seen["images"], x)
    # The same loss from bf16 pixels differs: the targets depend on the pixels' precision.
    with torch.no_grad():
        from_bf16 = real_loss(seen["pred"], x.bfloat16(), *seen["args"], **seen["kwargs"])
        from_fp32 = real_loss(seen["pred"], x, *seen["args"], **seen["kwargs"])
    assert torch.equal(loss.detach(), from_fp32) and not torch.equal(from_fp32, from_bf16)
