"""Quick linear probe: logistic regression on frozen, average-pooled encoder features.

As in the papers' linear evaluation (RandSAC App. D, MAE): the encoder runs without masks, the patch
tokens of its last (normed) layer are averaged into one vector per image, and only a linear
classifier is trained on top. Here the classifier is scikit-learn's L2 logistic regression on
standardised features, which is quick and deterministic for small data sets like digits.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["pooled_features", "linear_probe_accuracy"]


@torch.no_grad()
def pooled_features(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """images [N, C, H, W] -> [N, D]: mean over the patch tokens of ``model.forward_features``."""
    model.eval()
    prefix = getattr(model, "num_prefix_tokens", 0)
    feats = [model.forward_features(images[i:i + batch_size])[:, prefix:].mean(dim=1).float()
             for i in range(0, images.shape[0], batch_size)]
    return torch.cat(feats)


def linear_probe_accuracy(model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> float:
    """Fit on ``train`` (images, labels), return accuracy on ``test``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test = pooled_features(model, train[0]).numpy(), pooled_features(model, test[0]).numpy()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    clf.fit(x_train, train[1].numpy())
    return float(clf.score(x_test, test[1].numpy()))
