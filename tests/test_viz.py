"""Figures: written, non-empty PNGs (headless), and the un-normalisation of predictions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from randsac_fast import models, reference, viz

pytest.importorskip("matplotlib", reason="needs matplotlib").use("Agg")    # headless
import matplotlib.pyplot as plt  # noqa: E402


def _png(path) -> np.ndarray:
    img = plt.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.05, "the figure is blank"
    return img


@pytest.mark.parametrize("spec,grid", [("blob:11/5", "8"), ("square:4", "4"), ("random", "4 6")])
def test_orders_figure(tmp_path, spec, grid, capsys):
    out = tmp_path / "orders.png"
    assert viz.main(["orders", "--spec", spec, "--grid", *grid.split(), "--n", "3", "--out", str(out)]) == 0
    _png(out)
    assert str(out) in capsys.readouterr().out


def test_orders_figure_bad_spec(tmp_path, capsys):
    assert viz.main(["orders", "--spec", "square:5", "--grid", "8", "--out", str(tmp_path / "x.png")]) == 1
    assert "square counts that fit" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_draw_order_colours_follow_the_order():
    """Within one partition the shade gets darker along the order (the figure's legend)."""
    from randsac_fast import orders
    levels = orders.sample_levels("square:16/4", 1, 8, generator=torch.Generator().manual_seed(0))
    colours = viz._segment_colours(levels, 0)
    seg, part = levels.ranks[0][0].numpy(), levels.ranks[1][0].numpy()
    lum = colours @ np.array([0.299, 0.587, 0.114])
    for p in range(4):
        ranks = np.unique(seg[part == p])
        assert np.all(np.diff(lum[ranks]) < 0), f"partition {p}: shades not light -> dark"


@pytest.mark.parametrize("blur,norm_pix", [(0, True), (3, True), (0, False)])
def test_unnormalize_prediction_inverts_the_targets(blur, norm_pix):
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = reference.patch_targets(images, 4, blur_kernel=blur, blur_sigma=1.0, norm_pix=norm_pix)
    pixels = viz.unnormalize_prediction(target, images, 4, blur_kernel=blur, blur_sigma=1.0, norm_pix=norm_pix)
    blurred = reference.gaussian_blur(images, blur, 1.0) if blur else images
    assert torch.allclose(pixels, reference.patchify(blurred, 4), atol=1e-10)


@pytest.mark.parametrize("name,order", [("randsac_vit_tiny", "square:4"), ("saim_vit_tiny", "random")])
def test_recon_figure(tmp_path, name, order, capsys):
    torch.manual_seed(0)
    extra = dict(decoder_depth=1) if name.startswith("randsac") else dict(blur_kernel=3)
    model = models.build(name, img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, **extra)
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "recon.png"
    common = ["recon", "--ckpt", str(ckpt), "--model", name, "--set", "num_heads=2", "--set", "img_size=16",
              "--n", "2", "--order", order, "--out", str(out)]
    assert viz.main(common + ["--images", "digits"]) == 0, capsys.readouterr().err
    _png(out)
    # images of the wrong kind (3 channels for a 1-channel model): a clear error
    assert viz.main(common + ["--images", "synthetic"]) == 1
    assert "3 channel(s) but the model takes 1" in capsys.readouterr().err


def test_across_classes_takes_each_class_in_turn():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert viz.across_classes(labels, 3) == [0, 3, 5]
    assert viz.across_classes(labels, 5) == [0, 3, 5, 1, 4]
    assert viz.across_classes(labels, 20) == [0, 3, 5, 1, 4, 6, 2, 7, 8]     # all there is
    assert viz.across_classes([4, 4, 1], 2) == [2, 0]                          # class order


def _image_folder(root, classes: int = 3, per_class: int = 4):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(per_class):
            arr = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"{k:02d}.png")
    return root


def test_load_images_from_a_folder_spans_the_classes(tmp_path):
    pytest.importorskip("PIL", reason="needs Pillow")
    root = _image_folder(tmp_path / "folder")
    images, mean, std, labels = viz.load_images([str(root)], 8, 3, 3, with_labels=True)
    assert images.shape == (3, 3, 8, 8) and labels == ["class0", "class1", "class2"]   # folder names, across classes
    _, _, _, labels = viz.load_images(["digits"], 8, 1, 10, with_labels=True)
    assert sorted(labels.tolist()) == list(range(10))


def _captured_recon(monkeypatch, tmp_path, norm_pix: bool):
    figs = []
    monkeypatch.setattr(viz, "_save", lambda fig, out: figs.append(fig) or out)
    torch.manual_seed(0)
    model = models.build("randsac_vit_tiny", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                         num_heads=2, decoder_depth=1, norm_pix=norm_pix)
    images = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    viz.plot_recon(model, images, str(tmp_path / "r.png"), spec="square:4", mean=(0.5,), std=(0.25,), seed=0)
    return model, images, figs[0]


@pytest.mark.parametrize("norm_pix", [True, False])
def test_recon_title_and_context_patches(monkeypatch, tmp_path, norm_pix):
    """The title says how the prediction was brought to pixels (norm-pix or not), and the context
    tokens of the prediction panel are the input's own pixels, not a dimmed grey."""
    model, images, fig = _captured_recon(monkeypatch, tmp_path, norm_pix)
    title = fig._suptitle.get_text()
    assert ("un-normalised" in title) == norm_pix and ("no norm-pix" in title) == (not norm_pix)
    from randsac_fast import orders
    levels = orders.sample_levels("square:4", 2, model.grid, generator=torch.Generator().manual_seed(0))
    _, valid = model.predict(images, levels.order)
    shown = (images * 0.25 + 0.5).clamp(0, 1)
    for i in range(2):
        input_panel = fig.axes[3 * i].get_images()[0].get_array()
        pred_panel = fig.axes[3 * i + 2].get_images()[0].get_array()
        assert np.allclose(input_panel, shown[i, 0].numpy())
        given = (~valid[i]).reshape(model.grid).repeat_interleave(4, 0).repeat_interleave(4, 1).numpy()
        assert given.any() and not given.all()
        assert np.array_equal(pred_panel[given], input_panel[given])          # the real patches
        assert not np.allclose(pred_panel[~given], input_panel[~given])       # the prediction elsewhere
        assert fig.axes[3 * i + 2].collections, "the given tokens are not outlined"
    plt.close(fig)
