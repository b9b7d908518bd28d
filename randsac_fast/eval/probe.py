"""Quick linear probe: logistic regression on frozen, average-pooled encoder features.

As in the papers' linear evaluation (RandSAC App. D, MAE): the encoder runs without masks, the patch
tokens of its last (normed) layer are averaged into one vector per image, and only a linear
classifier is trained on top. Here the classifier is scikit-learn's L2 logistic regression on
standardised features, which is quick and deterministic for small data sets like digits.

:func:`digits_probe` is the trainer's end-of-run check: the pre-trained encoder, the same encoder at
its random initialisation, and the raw pixels, all through the same classifier.
"""
from __future__ import annotations

import functools
import json

import torch
from torch import Tensor, nn

__all__ = ["pooled_features", "linear_probe_accuracy", "pixel_probe_accuracy", "digits_probe", "save_json"]


@torch.no_grad()
def pooled_features(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """images [N, C, H, W] -> [N, D]: mean over the patch tokens of ``model.forward_features``."""
    model.eval()
    prefix = getattr(model, "num_prefix_tokens", 0)
    feats = [model.forward_features(images[i:i + batch_size])[:, prefix:].mean(dim=1).float()
             for i in range(0, images.shape[0], batch_size)]
    return torch.cat(feats)


def _fit_score(x_train, y_train, x_test, y_test) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    clf.fit(x_train, y_train)
    return float(clf.score(x_test, y_test))


def linear_probe_accuracy(model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> float:
    """Fit on ``train`` (images, labels), return accuracy on ``test``."""
    x_train, x_test = pooled_features(model, train[0]).numpy(), pooled_features(model, test[0]).numpy()
    return _fit_score(x_train, train[1].numpy(), x_test, test[1].numpy())


def pixel_probe_accuracy(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> float:
    """The same classifier on the flattened (normalised) pixels: the baseline an encoder must beat."""
    return _fit_score(train[0].flatten(1).numpy(), train[1].numpy(), test[0].flatten(1).numpy(), test[1].numpy())


def digits_probe(fresh: nn.Module, trained_state: dict, img_size: int, mean, std) -> dict:
    """Probe on digits' fixed train / test split: ``fresh`` (the random initialisation; loaded with
    ``trained_state`` afterwards), the pre-trained encoder, and raw pixels. -> a JSON-able dict."""
    key = (img_size, tuple(mean), tuple(std))
    train, test = _digits_splits(*key)
    random_init = linear_probe_accuracy(fresh, train, test)
    fresh.load_state_dict(trained_state)
    return {"pretrained": linear_probe_accuracy(fresh, train, test), "random_init": random_init,
            "raw_pixels": _digits_pixel_accuracy(*key), "data": "digits", "features": "avg-pooled final encoder tokens",
            "train_images": int(train[1].numel()), "test_images": int(test[1].numel()),
            "classifier": "standardise + L2 logistic regression (C=1)"}


@functools.lru_cache(maxsize=4)
def _digits_splits(img_size: int, mean: tuple, std: tuple):
    from .. import data as data_mod
    return tuple(data_mod.eval_images(data_mod.digits(split), img_size, mean, std) for split in ("train", "test"))


@functools.lru_cache(maxsize=4)
def _digits_pixel_accuracy(img_size: int, mean: tuple, std: tuple) -> float:
    """Deterministic for given inputs: computed once per process (the ablation probes many encoders)."""
    return pixel_probe_accuracy(*_digits_splits(img_size, mean, std))


def save_json(obj: dict, path: str) -> None:
    """Write ``path`` atomically (a reader never sees half a file) and durably."""
    from ..outputs import atomic_text
    atomic_text(path, json.dumps(obj, indent=2))
