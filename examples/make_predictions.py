"""Write ``examples/breast_cancer_predictions.parquet``: out-of-fold predictions of two classifiers.

The file is what ``bcekit score`` is shown on in the README. Its rows are the 569 samples of
scikit-learn's breast-cancer data (shipped with scikit-learn, no download); each sample's predictions come
from models that never saw it (stratified 5-fold cross-validation, features standardised with the training
folds' statistics). Columns:

* ``malignant``: the target, 1.0 for malignant (sklearn's class 0), else 0.0;
* ``mlp_logit``: the logit of the small MLP of ``train_breast_cancer.py``, trained with
  ``bcekit.torch.BCEWithLogitsLoss(pos_weight=#benign / #malignant)``;
* ``logreg_logit``: the decision function of scikit-learn's ``LogisticRegression`` (its logit);
* ``mlp_probability``: ``sigmoid(mlp_logit)``, for scoring probabilities;
* ``fold``: the fold that held the sample out.

Seeded throughout (the folds, torch's initial weights and batch order), so a rerun writes the same numbers::

    python examples/make_predictions.py [--epochs 25] [--seed 0] [--output PATH]
    bcekit score examples/breast_cancer_predictions.parquet --target malignant malignant \\
        --pred mlp_logit logreg_logit --logits
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from bcekit.torch import BCEWithLogitsLoss
from train_breast_cancer import make_model, train

OUTPUT = Path(__file__).resolve().parent / "breast_cancer_predictions.parquet"


def out_of_fold(epochs: int, seed: int) -> dict[str, np.ndarray]:
    features, classes = load_breast_cancer(return_X_y=True)
    malignant = (classes == 0).astype(np.float64)
    columns = {name: np.zeros(len(malignant)) for name in ("mlp_logit", "logreg_logit")}
    fold_of = np.zeros(len(malignant), dtype=np.int64)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed).split(features, malignant)
    for fold, (train_rows, test_rows) in enumerate(folds):
        scaler = StandardScaler().fit(features[train_rows])
        x_train = scaler.transform(features[train_rows]).astype(np.float32)
        x_test = scaler.transform(features[test_rows]).astype(np.float32)
        y_train = malignant[train_rows].astype(np.float32)
        positives = float(y_train.sum())
        torch.manual_seed(seed + fold)
        model = make_model(x_train.shape[1])
        criterion = BCEWithLogitsLoss(pos_weight=torch.tensor([(len(y_train) - positives) / positives]))
        train(model, torch.from_numpy(x_train), torch.from_numpy(y_train), criterion, epochs, verbose=False)
        model.eval()
        with torch.no_grad():
            columns["mlp_logit"][test_rows] = model(torch.from_numpy(x_test)).squeeze(-1).double().numpy()
        logreg = LogisticRegression(max_iter=1000).fit(x_train, y_train)
        columns["logreg_logit"][test_rows] = logreg.decision_function(x_test)
        fold_of[test_rows] = fold
    probability = 1.0 / (1.0 + np.exp(-columns["mlp_logit"]))
    return {"malignant": malignant, **columns, "mlp_probability": probability, "fold": fold_of}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25, help="training epochs per fold (default: 25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and of torch (default: 0)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"where to write (default: {OUTPUT})")
    args = parser.parse_args()
    columns = out_of_fold(args.epochs, args.seed)
    pq.write_table(pa.table(columns), args.output)
    print(f"wrote {len(columns['malignant'])} rows to {args.output}")


if __name__ == "__main__":
    main()
