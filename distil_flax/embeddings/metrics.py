"""Sentence-embedding metrics, in float64 numpy / scipy: STS Spearman, agreement with a teacher
(pairwise-cosine Spearman, neighbour recall), and a linear probe with scikit-learn's objective.
"""

import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.stats

MAX_PAIRS = 2_000_000  # Pairs for text_cosine_spearman: all of them up to ~2000 sentences.
PROBE_C = 1.0  # Inverse L2 strength of the probe, scikit-learn's default.
PROBE_MAX_ITER = 1000
PROBE_TOL = 1e-4  # scikit-learn's tol: max |gradient| of the scaled objective.


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho; NaN when either side is constant (a collapsed model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        return float(scipy.stats.spearmanr(a, b).statistic)


def sts_spearman(embeddings1: np.ndarray, embeddings2: np.ndarray, gold: np.ndarray) -> float:
    """Spearman of cosine(embeddings1[i], embeddings2[i]) against gold[i]."""
    cosines = np.sum(_normalise(embeddings1) * _normalise(embeddings2), axis=-1)
    return spearman(cosines, gold)


def _pair_cosines(x: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 1 << 16
                  ) -> np.ndarray:
    """cosine(x[i], x[j]) of each pair: one matmul while n × n fits in 128 MB, else row pairs
    in chunks (a sample of a large file)."""
    xn = _normalise(x)
    if len(xn) <= 4096:
        return (xn @ xn.T)[i, j]
    return np.concatenate([np.einsum("nd,nd->n", xn[i[s:s + chunk]], xn[j[s:s + chunk]])
                           for s in range(0, len(i), chunk)])


def pair_indices(n: int, max_pairs: int = MAX_PAIRS, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Every pair i < j of n items, or a seeded sample of `max_pairs` pairs (i ≠ j) when there
    are more; returns (i, j, sampled)."""
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, 1)
        return i, j, False
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, max_pairs)
    j = rng.integers(0, n - 1, max_pairs)
    return i, j + (j >= i), True


def pairwise_agreement(student: np.ndarray, teacher: np.ndarray, *, max_pairs: int = MAX_PAIRS,
                       seed: int = 0) -> float:
    """Spearman between student and teacher cosine similarities of the same sentence pairs
    (the upper triangle, or a sample of it: `pair_indices`)."""
    i, j, _ = pair_indices(len(teacher), max_pairs, seed)
    return spearman(_pair_cosines(student, i, j), _pair_cosines(teacher, i, j))


def _nearest(xn: np.ndarray, start: int, stop: int, k: int) -> np.ndarray:
    """Indices of the k most cosine-similar rows to rows start..stop of xn (self excluded)."""
    sims = xn[start:stop] @ xn.T
    sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
    return np.argpartition(-sims, k - 1, axis=1)[:, :k]


def neighbour_recall(student: np.ndarray, teacher: np.ndarray, k: int = 10,
                     block: int = 1024) -> float:
    """Mean over sentences of |teacher's k nearest ∩ student's k nearest| / k (self excluded).

    Computed `block` rows at a time, so memory is block × n, not n × n.

    Raises:
      ValueError: k < 1, or not more than k sentences.
    """
    n = len(teacher)
    if k < 1 or n <= k:
        raise ValueError(f"recall@{k} needs more than {k} sentences, got {n}")
    sn, tn = _normalise(student), _normalise(teacher)
    hits = 0
    for start in range(0, n, block):
        stop = min(start + block, n)
        t, s = _nearest(tn, start, stop, k), _nearest(sn, start, stop, k)
        hits += int((t[:, :, None] == s[:, None, :]).any(-1).sum())
    return hits / (n * k)


def _logistic_objective(theta: jax.Array, x: jax.Array, onehot: jax.Array, c: float
                        ) -> jax.Array:
    """scikit-learn's multinomial objective, scaled as it scales it: mean cross-entropy +
    ‖W‖² / (2·C·n); the bias is not penalised. theta = [W (d × k, row-major), b (k)]."""
    (n, d), k = x.shape, onehot.shape[1]
    w, b = theta[:d * k].reshape(d, k), theta[d * k:]
    logits = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST) + b
    cross_entropy = -jnp.sum(onehot * jax.nn.log_softmax(logits))
    return cross_entropy / n + jnp.sum(w * w) / (2 * c * n)


_logistic_value_and_grad = jax.jit(jax.value_and_grad(_logistic_objective))


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, *, c: float = PROBE_C,
                 max_iter: int = PROBE_MAX_ITER, tol: float = PROBE_TOL
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression with L2, as scikit-learn's LogisticRegression(C=c).

    The same objective, solver and stopping rule as scikit-learn's lbfgs: scipy's L-BFGS-B in
    float64 until max |gradient| < tol, the gradient from one jitted JAX function (numpy's
    threaded BLAS, sharing the cores with XLA's threads, was 10–100× slower per call here).

    Args:
      x: [n, d] features; y: [n] labels in 0..num_classes-1.
      c, max_iter, tol: inverse L2 strength, iteration cap, and gradient tolerance.

    Returns:
      (W [d, num_classes], b [num_classes]) float64: predict argmax(x @ W + b). A class without
      examples gets a very negative bias (never predicted).
    """
    d = x.shape[1]
    with jax.enable_x64(True):  # The optimum to float64 precision, as scikit-learn finds it.
        x_device = jnp.asarray(x, jnp.float64)
        onehot = jnp.asarray(np.eye(num_classes)[np.asarray(y)])

        def value_and_grad(theta):
            value, grad = _logistic_value_and_grad(theta, x_device, onehot, c)
            return float(value), np.asarray(grad)

        result = scipy.optimize.minimize(
            value_and_grad, np.zeros(d * num_classes + num_classes), jac=True,
            method="L-BFGS-B", options={"maxiter": max_iter, "maxls": 50, "gtol": tol,
                                        "ftol": 64 * np.finfo(float).eps})
    theta = result.x
    return theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """The fold of each example: each class shuffled, then dealt round-robin, continuing where
    the previous class stopped (so every fold gets ⌊n / folds⌋ or more examples)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), np.int64)
    dealt = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return fold


def probe_accuracy(features: np.ndarray, labels: Sequence[str], *, folds: int = 5,
                   seed: int = 0) -> list[float]:
    """Test accuracy of each fold of a logistic-regression probe on frozen features.

    Features are standardised with the training folds' mean and deviation, so that the probe's
    fixed L2 strength means the same for models whose embeddings differ in scale.

    Raises:
      ValueError: fewer than 2 folds, or fewer examples than folds.
    """
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    if folds < 2 or len(y) < folds:
        raise ValueError(f"--folds={folds}: need at least 2 folds and as many examples "
                         f"({len(y)} given)")
    fold = stratified_folds(y, folds, seed)
    features = np.asarray(features, np.float64)
    accuracy = []
    for f in range(folds):
        train, test = fold != f, fold == f
        mean, std = features[train].mean(0), features[train].std(0)
        std[std == 0] = 1.0
        w, b = fit_logistic((features[train] - mean) / std, y[train], len(classes))
        predicted = np.argmax(((features[test] - mean) / std) @ w + b, axis=1)
        accuracy.append(float(np.mean(predicted == y[test])))
    return accuracy
