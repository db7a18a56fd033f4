"""Train a small classifier on scikit-learn's breast-cancer data with bcekit's BCE loss.

What this shows:

* ``bcekit.torch.BCEWithLogitsLoss`` is a drop-in for ``torch.nn.BCEWithLogitsLoss``: same constructor
  (here with ``pos_weight``), same autograd, so an ordinary training loop uses it unchanged;
* ``pos_weight = #negatives / #positives`` (from the training set) rebalances the classes; the positive
  class is *malignant*, the minority (about 37% of the samples);
* ``bcekit.numpy.binary_cross_entropy_with_logits`` evaluates the test log-loss straight from the logits,
  without torch, and agrees with ``sklearn.metrics.log_loss`` on the sigmoid probabilities.

The data ships with scikit-learn (no download). Features are standardised with statistics of the training
split only; the split is stratified and seeded, and ``torch.manual_seed`` fixes the initial weights and the
batch order, so every run with the same ``--seed`` prints the same numbers. It runs in a few seconds on CPU::

    python examples/train_breast_cancer.py [--epochs 25] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

import bcekit.numpy as bce_np
from bcekit.torch import BCEWithLogitsLoss


def load_data(
    seed: int, test_size: float = 0.25
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """Standardised, stratified train/test split; label 1 is malignant (sklearn's target 0)."""
    features, target = load_breast_cancer(return_X_y=True)
    labels = (target == 0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=test_size, stratify=labels, random_state=seed
    )
    scaler = StandardScaler().fit(x_train)
    return (
        scaler.transform(x_train).astype(np.float32),
        scaler.transform(x_test).astype(np.float32),
        y_train,
        y_test,
    )


def make_model(n_features: int, hidden: int = 16) -> nn.Module:
    """A two-layer MLP producing one logit per sample."""
    return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    epochs: int,
    batch_size: int = 32,
    lr: float = 1e-2,
    verbose: bool = True,
) -> list[float]:
    """Mini-batch Adam; returns (and, when ``verbose``, prints) the mean training loss of each epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history: list[float] = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x))
        total = 0.0
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = criterion(model(x[batch]).squeeze(-1), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        history.append(total / len(x))
        if verbose:
            print(f"epoch {epoch:3d}  train loss {history[-1]:.6f}")
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25, help="number of training epochs (default: 25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of torch (default: 0)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x_train, x_test, y_train, y_test = load_data(args.seed)
    n_pos = int(y_train.sum())
    n_neg = len(y_train) - n_pos
    pos_weight = torch.tensor([n_neg / n_pos])
    print(
        f"train: {len(y_train)} samples ({n_pos} malignant, {n_neg} benign), test: {len(y_test)} samples; "
        f"pos_weight = {n_neg}/{n_pos} = {pos_weight.item():.4f}"
    )

    model = make_model(x_train.shape[1])
    criterion = BCEWithLogitsLoss(pos_weight=pos_weight)
    train(model, torch.from_numpy(x_train), torch.from_numpy(y_train), criterion, args.epochs)

    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x_test)).squeeze(-1).double().numpy()
    y_test64 = y_test.astype(np.float64)
    # Unweighted log-loss on the test set, computed from the logits by the NumPy backend.
    test_loss = float(bce_np.binary_cross_entropy_with_logits(logits, y_test64))
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    accuracy = float(np.mean((logits > 0) == (y_test64 == 1)))
    reference = log_loss(y_test64, probabilities, labels=[0.0, 1.0])
    print(f"test log-loss (bcekit.numpy, from logits): {test_loss:.6f}")
    print(f"test accuracy: {accuracy:.4f} ({round(accuracy * len(y_test))}/{len(y_test)})")
    print(
        f"sanity: sklearn.metrics.log_loss on sigmoid(logits) = {reference:.6f} "
        f"(difference {test_loss - reference:+.1e})"
    )


if __name__ == "__main__":
    main()
