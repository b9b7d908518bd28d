"""Fine-tuning's RandAugment (timm) with the Pillow that is installed.

timm's posterize ops ask for 0 bits at some magnitudes, which Pillow 13 refuses; the fine-tuning
augmentation computes 0 bits itself (a black image, what Pillow < 13 and TensorFlow compute). These
tests need timm (the ``[timm]`` extra; CI's timm leg installs it) and fail on Pillow 13 without the fix.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from randsac_fast.eval import finetune

timm_aa = pytest.importorskip("timm.data.auto_augment", reason="needs timm (pip install '.[timm]')")
PIL = pytest.importorskip("PIL", reason="needs Pillow")
from PIL import Image, ImageOps  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _image(seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (16, 16, 3) if mode == "RGB" else (16, 16)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _posterize_ops(augment: finetune.FinetuneAugment):
    ops = [op for op in augment.randaug.ops if op.name.startswith("Posterize")]
    assert ops, "the RandAugment recipe has no posterize op"
    return ops


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-m9-mstd0.5-inc1-mmax20"])
def test_posterize_at_every_magnitude(spec):
    """Every magnitude the recipe can reach (0 .. 10, or mmax): no error, and the bits timm asks
    for are kept exactly — 0 bits (or fewer) is a black image, 8 or more the image itself."""
    augment = finetune.FinetuneAugment(16, MEAN, STD, randaug=spec)
    top = 20 if "mmax20" in spec else 10
    seen = set()
    for op in _posterize_ops(augment):
        op.prob, op.magnitude_std = 1.0, 0.0          # apply it, at exactly this magnitude
        for magnitude in np.linspace(0, top, 4 * top + 1):
            op.magnitude = float(magnitude)
            for mode in ("RGB", "L"):
                img = _image(int(magnitude * 4), mode)
                bits = op.level_fn(float(magnitude), op.hparams)[0]
                seen.add(max(min(bits, 8), 0))
                got = np.asarray(op(img))
                want = (np.zeros_like(np.asarray(img)) if bits <= 0 else np.asarray(img) if bits >= 8
                        else np.asarray(ImageOps.posterize(img, bits)))
                assert np.array_equal(got, want), f"{op.name} at magnitude {magnitude}: {bits} bits"
    assert 0 in seen, "the sweep never reached the 0-bit case it is meant to check"


def test_default_recipe_survives_a_stream_of_samples():
    """The fine-tuning default (MAE's rand-m9-mstd0.5-inc1) over seeded samples, as the training
    loop draws them; the stream includes posterize draws with 0 bits (counted, so the test knows it
    exercised them)."""
    augment = finetune.FinetuneAugment(16, MEAN, STD)
    zero_bit = []
    for op in _posterize_ops(augment):
        level_fn = op.level_fn

        def counting(magnitude, hparams, level_fn=level_fn):
            bits = level_fn(magnitude, hparams)
            zero_bit.append(bits[0] <= 0)
            return bits
        op.level_fn = counting
    images = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    for i in range(200):              # sample 61 of this stream posterizes with 0 bits
        out = augment(images, torch.Generator().manual_seed(i))
        assert out.shape == (3, 16, 16) and torch.isfinite(out).all()
    assert any(zero_bit), f"no 0-bit posterize in {len(zero_bit)} posterize draws; raise the sample count"


def test_augmentation_repeats_for_the_same_generator():
    augment = finetune.FinetuneAugment(16, MEAN, STD)
    images = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    a = torch.stack([augment(images, torch.Generator().manual_seed(i)) for i in range(20)])
    b = torch.stack([augment(images, torch.Generator().manual_seed(i)) for i in range(20)])
    assert torch.equal(a, b)


def test_posterize_keep_bits_matches_pillow_where_pillow_accepts():
    img = _image(3)
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(finetune.posterize_keep_bits(img, bits)),
                              np.asarray(ImageOps.posterize(img, bits)))
    assert np.array_equal(np.asarray(finetune.posterize_keep_bits(img, 8)), np.asarray(img))
    for bits in (0, -2):
        black = finetune.posterize_keep_bits(img, bits)
        assert black.mode == img.mode and black.size == img.size and not np.asarray(black).any()
