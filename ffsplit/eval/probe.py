"""Frozen-feature linear probe: the quality measure for encoders (MiniLM, BERT) that have no head.

Sentence embeddings are the mean of the last hidden states over real (unmasked) tokens; a
logistic regression on standardised embeddings is fitted on the training texts and scored on the
test texts. Everything is seeded and single-solver (lbfgs), so the accuracy is reproducible.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ffsplit.errors import FFSplitError
from ffsplit.eval.perplexity import model_device

# lbfgs on standardised features converges in a few hundred iterations on 384-768-d embeddings;
# the ceiling is generous so that the probe, not the optimiser, limits accuracy.
PROBE_MAX_ITER = 5000


@dataclass(frozen=True)
class ProbeResult:
    """Test accuracy of the probe; seconds covers what the call did (fit, or embed + fit)."""

    accuracy: float
    n_train: int
    n_test: int
    n_classes: int
    seconds: float
    converged: bool

    def __post_init__(self) -> None:
        if not 0.0 <= self.accuracy <= 1.0:
            raise FFSplitError(f"ProbeResult.accuracy must be in [0, 1], got {self.accuracy}")

    def to_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def embed(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
) -> torch.Tensor:
    """Mean-pooled last hidden states [n, d] (float32, CPU), in the order of texts.

    Texts are batched by token length to save padding work; pooling ignores padding, so the result
    does not depend on which texts share a batch beyond float rounding.
    """
    texts = list(texts)
    if not texts:
        raise FFSplitError("embed: no texts given")
    if not all(isinstance(t, str) for t in texts):
        raise FFSplitError("embed: texts must be strings")
    if batch_size < 1 or max_length < 1:
        raise FFSplitError(
            f"embed: batch_size and max_length must be >= 1, got {batch_size}, {max_length}"
        )
    if getattr(tokenizer, "pad_token", None) is None:
        raise FFSplitError("embed: the tokenizer has no pad token; set tokenizer.pad_token first")

    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    features = [
        {key: encoded[key][i] for key in encoded.keys() if key != "offset_mapping"}
        for i in range(len(texts))
    ]
    order = sorted(range(len(texts)), key=lambda i: (len(features[i]["input_ids"]), i))

    device = model_device(model)
    was_training = model.training
    model.eval()
    pooled: list[torch.Tensor | None] = [None] * len(texts)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                batch = tokenizer.pad([features[i] for i in index], return_tensors="pt")
                batch = {key: value.to(device) for key, value in batch.items()}
                output = model(**batch)
                hidden = (
                    output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
                )
                mask = batch["attention_mask"].to(torch.float32).unsqueeze(-1)
                summed = (hidden.float() * mask).sum(dim=1)
                means = summed / mask.sum(dim=1).clamp_min(1.0)
                for row, i in enumerate(index):
                    pooled[i] = means[row].cpu()
    finally:
        model.train(was_training)
    return torch.stack([p for p in pooled if p is not None])


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def linear_probe(
    train_x: torch.Tensor | np.ndarray,
    train_y: Any,
    test_x: torch.Tensor | np.ndarray,
    test_y: Any,
    seed: int = 0,
    regularization: float = 1.0,
) -> ProbeResult:
    """Fit StandardScaler + LogisticRegression on train features, report test accuracy.

    regularization is scikit-learn's C (inverse L2 strength).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train = _as_numpy(train_x).astype(np.float64)
    x_test = _as_numpy(test_x).astype(np.float64)
    y_train = _as_numpy(train_y)
    y_test = _as_numpy(test_y)
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise FFSplitError(
            f"linear_probe: features must be [n, d] with equal d, got {x_train.shape} and {x_test.shape}"
        )
    if y_train.shape != (x_train.shape[0],) or y_test.shape != (x_test.shape[0],):
        raise FFSplitError(
            f"linear_probe: labels {y_train.shape}, {y_test.shape} do not match features "
            f"{x_train.shape[0]}, {x_test.shape[0]}"
        )
    if x_test.shape[0] == 0:
        raise FFSplitError("linear_probe: the test set is empty")
    classes = np.unique(y_train)
    if classes.size < 2:
        raise FFSplitError("linear_probe: the training labels hold fewer than 2 classes")
    if not (np.isfinite(x_train).all() and np.isfinite(x_test).all()):
        raise FFSplitError("linear_probe: features contain NaN or inf (a broken model?)")
    if regularization <= 0:
        raise FFSplitError(f"linear_probe: regularization must be > 0, got {regularization}")

    start = time.perf_counter()
    classifier = LogisticRegression(C=regularization, max_iter=PROBE_MAX_ITER, random_state=seed)
    pipeline = make_pipeline(StandardScaler(), classifier)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        pipeline.fit(x_train, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    accuracy = float((pipeline.predict(x_test) == y_test).mean())
    return ProbeResult(
        accuracy=accuracy,
        n_train=int(x_train.shape[0]),
        n_test=int(x_test.shape[0]),
        n_classes=int(classes.size),
        seconds=time.perf_counter() - start,
        converged=converged,
    )


def probe_accuracy(
    model: nn.Module,
    tokenizer: Any,
    train_texts: Sequence[str],
    train_labels: Any,
    test_texts: Sequence[str],
    test_labels: Any,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
) -> ProbeResult:
    """Embed both text sets with the frozen model and run linear_probe; seconds includes embedding."""
    start = time.perf_counter()
    train_x = embed(model, tokenizer, train_texts, batch_size=batch_size, max_length=max_length)
    test_x = embed(model, tokenizer, test_texts, batch_size=batch_size, max_length=max_length)
    result = linear_probe(train_x, train_labels, test_x, test_labels, seed=seed)
    return ProbeResult(
        accuracy=result.accuracy,
        n_train=result.n_train,
        n_test=result.n_test,
        n_classes=result.n_classes,
        seconds=time.perf_counter() - start,
        converged=result.converged,
    )
