"""Evaluates a student's sentence embeddings beside its teacher's, on files a user brings.

    python -m distil_flax.evaluate_embeddings --student=RUN_OR_HF --teacher=HF_OR_RUN \
        [--sts=pairs.tsv] [--labelled=labelled.tsv] [--text=sentences.txt] [--output=report.json]

Models: a distil_flax workdir (config.json + checkpoints; its latest params), a fine-tuning
workdir (its best encoder), or a Hugging Face BERT/DistilBERT folder. Sentences are packed
several to a row and pooled per segment (`embeddings.py`); --pooling=auto takes the teacher
folder's sentence-transformers `1_Pooling/config.json`, else mean pooling. The tokenizer is the
teacher's (its folder's vocab.txt / tokenizer.json, or its run's data.tokenizer) unless
--tokenizer names one.

Metrics, each on the files given:
  sts_spearman          --sts: lines `sentence1 <TAB> sentence2 <TAB> score` (a first line whose
                        score does not parse is a header; a GLUE STS-B header naming columns
                        sentence1, sentence2, score is read by name). Spearman of the pair's
                        cosine similarity against the gold score.
  probe_accuracy        --labelled: lines `label <TAB> text` (or a header naming columns label
                        and text / sentence, as GLUE SST-2). Accuracy of a multinomial logistic
                        regression on frozen, standardised embeddings, stratified --folds-fold
                        cross-validation (scikit-learn's LogisticRegression: its objective, L2
                        with C = 1, and its L-BFGS-B stopping rule).
  text_cosine_spearman  --text: one sentence a line. Agreement with the teacher: Spearman between
                        student and teacher cosine similarities of every pair of sentences (a
                        seeded sample of MAX_PAIRS pairs when there are more).
  text_recall@10        the fraction of each sentence's 10 nearest teacher neighbours (itself
                        excluded) that are among its 10 nearest student neighbours.

Rows: the teacher; the init-only student — the teacher with layers removed as the student run
started (`student_init.init_from_teacher` with the run's init.layer_map), when the student is a
distil_flax workdir as wide as its teacher — so that what distillation gained is visible; and the
student. The table goes to stdout and, with --output, the same numbers to JSON with what was
evaluated (files, sizes, pooling, tokenizer). A bad file or model ends in one `error:` line.
"""

import dataclasses
import functools
import json
import math
import os
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.optimize
import scipy.stats
from absl import app, flags, logging
from flax import traverse_util

from distil_flax import cli, embeddings, hf, partitioning, student_init
from distil_flax import config as config_lib
from distil_flax import model as model_lib
from distil_flax import pooling as pooling_lib
from distil_flax.checkpoint import restore_params
from distil_flax.data import load_tokenizer
from distil_flax.downstream import init as finetune_init
from distil_flax.model import make_encoder

ROLES = ("teacher", "init_only", "student")  # Table rows, in order.
ROLE_NAMES = {"teacher": "teacher", "init_only": "init-only student", "student": "student"}
MAX_PAIRS = 2_000_000  # Pairs for text_cosine_spearman: all of them up to ~2000 sentences.
PROBE_C = 1.0  # Inverse L2 strength of the probe, scikit-learn's default.
PROBE_MAX_ITER = 1000
PROBE_TOL = 1e-4  # scikit-learn's tol: max |gradient| of the scaled objective.


# ----------------------------------------------------------------------------------------------
# The user's files.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StsPairs:
    sentences1: list[str]
    sentences2: list[str]
    gold: np.ndarray  # float64 [pairs]
    header: bool  # A header line was skipped.


@dataclasses.dataclass
class Labelled:
    labels: list[str]
    texts: list[str]
    header: bool


def _read_lines(path: str, flag: str) -> list[tuple[int, str]]:
    """(line number from 1, line) of every non-blank line of a UTF-8 text file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--{flag}={path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"--{flag}={path} is a directory, not a file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # A BOM, as spreadsheets write, is not part of line 1.
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); is it "
                         f"the --{flag} file you meant?") from None
    # Split on newlines only: str.splitlines would also split at form feeds, \x1c, U+2028 …
    # inside a sentence, and line numbers in messages would no longer match an editor's.
    lines = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), start=1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise ValueError(f"{path} (--{flag}) is empty")
    return lines


def _header_columns(fields: Sequence[str], *names: Sequence[str]) -> list[int] | None:
    """Indices of columns named by a header line (one of each group of `names`), or None."""
    lowered = [f.strip().lower() for f in fields]
    found = []
    for group in names:
        index = next((lowered.index(n) for n in group if n in lowered), None)
        if index is None:
            return None
        found.append(index)
    return found


def _float(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def read_sts(path: str) -> StsPairs:
    """Reads sentence pairs with gold scores (see the module docstring for the format).

    Raises:
      FileNotFoundError / IsADirectoryError: no such file.
      ValueError: not UTF-8, empty, a line without enough fields or with a bad score (file and
        line named), or gold scores that are all equal (Spearman is undefined).
    """
    lines = _read_lines(path, "sts")
    first_no, first = lines[0]
    columns = _header_columns(first.split("\t"), ["sentence1"], ["sentence2"], ["score"])
    exact = columns is None  # Without a header naming them, a line is exactly three fields.
    header = not exact or (len(first.split("\t")) == 3 and _float(first.split("\t")[2]) is None)
    columns = columns or [0, 1, 2]
    s1, s2, gold = [], [], []
    for number, line in lines[1:] if header else lines:
        fields = line.split("\t")
        if (len(fields) != 3) if exact else (len(fields) <= max(columns)):
            need = "3 tab-separated fields (sentence1, sentence2, score)" if exact else (
                f"at least {max(columns) + 1} tab-separated fields (as the header on line "
                f"{first_no})")
            raise ValueError(f"{path}:{number}: expected {need}, found {len(fields)}")
        score = _float(fields[columns[2]])
        if score is None:
            raise ValueError(f"{path}:{number}: score {fields[columns[2]]!r} is not a number")
        s1.append(fields[columns[0]])
        s2.append(fields[columns[1]])
        gold.append(score)
    if not gold:
        raise ValueError(f"{path} (--sts) has a header but no sentence pairs")
    gold = np.asarray(gold, np.float64)
    if len(gold) < 2 or np.all(gold == gold[0]):
        raise ValueError(f"{path} (--sts): Spearman needs gold scores that differ; all "
                         f"{len(gold)} pair(s) score {gold[0]}")
    return StsPairs(s1, s2, gold, header)


def read_labelled(path: str) -> Labelled:
    """Reads labelled texts (see the module docstring for the format).

    Raises:
      FileNotFoundError / IsADirectoryError: no such file.
      ValueError: not UTF-8, empty, a line without a tab or with an empty label (file and line
        named), or fewer than two classes.
    """
    lines = _read_lines(path, "labelled")
    first_no, first = lines[0]
    columns = _header_columns(first.split("\t"), ["label"], ["text", "sentence"])
    labels, texts = [], []
    for number, line in lines[1:] if columns else lines:
        if columns:
            fields = line.split("\t")
            if len(fields) <= max(columns):
                raise ValueError(f"{path}:{number}: expected at least {max(columns) + 1} "
                                 f"tab-separated fields (as the header on line {first_no}), "
                                 f"found {len(fields)}")
            label, text = fields[columns[0]], fields[columns[1]]
        else:
            if "\t" not in line:
                raise ValueError(f"{path}:{number}: expected `label <TAB> text`, found no tab")
            label, text = line.split("\t", 1)  # The text may hold tabs of its own.
        if not label.strip():
            raise ValueError(f"{path}:{number}: the label is empty")
        labels.append(label.strip())
        texts.append(text)
    if len(set(labels)) < 2:
        raise ValueError(f"{path} (--labelled): a probe needs at least two labels, found "
                         f"{sorted(set(labels)) or 'none'}")
    return Labelled(labels, texts, columns is not None)


def read_text(path: str) -> list[str]:
    """One sentence per non-blank line."""
    return [line for _, line in _read_lines(path, "text")]


# ----------------------------------------------------------------------------------------------
# Metrics (numpy / scipy, float64).
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
    """An encoder to embed with: where it came from, its config and its full parameter tree."""

    role: str  # teacher | init_only | student
    path: str
    source: str  # hf | run | finetuned (see downstream.init.Pretrained) | init_only
    model_cfg: ml_collections.ConfigDict
    params: dict[str, Any]  # MLM head and pooler included where the checkpoint has them.
    step: int | None = None
    tokenizer: str = ""
    lowercase: bool = True
    run_config: ml_collections.ConfigDict | None = None  # A run workdir's config.json.

    def describe(self) -> dict[str, Any]:
        c = self.model_cfg
        return {"path": self.path, "source": self.source, "step": self.step,
                "layers": int(c.num_layers), "hidden_size": int(c.hidden_size),
                "vocab_size": int(c.vocab_size)}


def _one_device_mesh():
    return partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def load_model(role: str, path: str, mesh=None) -> Model:
    """A teacher or student from a distil_flax (fine-tuning) workdir or an HF folder.

    Raises:
      FileNotFoundError: nothing at `path`, or a workdir without checkpoints.
      ValueError: neither a workdir nor an HF folder, or a model we cannot read (named).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"--{role}={path}: no such directory")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"--{role}={path} is neither a distil_flax workdir nor a Hugging Face "
                         "model folder (no config.json)")
    try:
        with open(config_file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    if isinstance(raw, dict) and "model_type" in raw and not hf.is_hf_checkpoint(path):
        hf.load_hf_checkpoint(path)  # An HF folder without weights: let it say what is missing.
    mesh = mesh or _one_device_mesh()
    rules = partitioning.DEFAULT_RULES
    pretrained = finetune_init.load_pretrained(path)
    step, run_config = None, None
    if pretrained.source == "run":
        # The checkpoint's full tree (MLM head too): an init-only student is built from it.
        encoder = make_encoder(pretrained.model_cfg)
        params, step = restore_params(
            path, partitioning.abstract_params(model_lib.init_fn(encoder), mesh, rules))
        run_config = config_lib.load_json(config_file)
    else:
        params = traverse_util.unflatten_dict(
            finetune_init.encoder_params(pretrained, mesh, rules), sep="/")
        params = jax.device_put(params, mesh.devices.flat[0])
    logging.info("%s: %s (%s%s), %d layers × %d.", role, path, pretrained.source,
                 f", step {step}" if step is not None else "", pretrained.model_cfg.num_layers,
                 pretrained.model_cfg.hidden_size)
    return Model(role, path, pretrained.source, pretrained.model_cfg, params, step,
                 pretrained.tokenizer, pretrained.lowercase, run_config)


def init_only_model(student: Model, teacher: Model) -> tuple[Model | None, str]:
    """The student as its run started: the teacher's layers `init.layer_map` (the run's).

    Returns:
      (model, "") or (None, why there is none).
    """
    if student.source != "run" or student.run_config is None:
        return None, (f"the student is a {student.source} model, not a distil_flax "
                      "distillation workdir (no init.layer_map)")
    s, t = student.model_cfg, teacher.model_cfg
    if s.hidden_size != t.hidden_size:
        return None, (f"the student's hidden size {s.hidden_size} differs from the teacher's "
                      f"{t.hidden_size}: it did not start as teacher layers")
    if s.num_heads != t.num_heads:  # The same kernels split into other heads compute otherwise.
        return None, (f"the student's {s.num_heads} attention heads differ from the teacher's "
                      f"{t.num_heads}: it did not start as teacher layers")
    init = student.run_config.get("init") or {}
    if not init.get("from_teacher", True):
        return None, "the student's run started from random weights (init.from_teacher=False)"
    layer_map = tuple(int(i) for i in init.get("layer_map", ()))
    try:
        params = student_init.init_from_teacher(teacher.params, student.params, layer_map)
    except ValueError as error:
        return None, f"cannot take the student's layers from the teacher: {error}"
    model = Model("init_only", f"{teacher.path} layers {list(layer_map)}", "init_only",
                  student.model_cfg, params)
    return model, ""


def _check_model_fits(model: Model, vocab_size: int, tokenizer: str, max_len: int) -> None:
    c = model.model_cfg
    if int(c.vocab_size) != vocab_size:
        raise ValueError(f"--{model.role}={model.path} has vocab_size {c.vocab_size} but the "
                         f"tokenizer {tokenizer} has {vocab_size}: evaluate with the tokenizer "
                         "the models were trained with (--tokenizer)")
    if max_len > int(c.max_position_embeddings):
        raise ValueError(f"--max_len={max_len} exceeds --{model.role}'s "
                         f"max_position_embeddings ({c.max_position_embeddings})")


def resolve_pooling(pooling: str, teacher: Model) -> tuple[str, str]:
    """(pooling, where it came from); "auto" reads the teacher folder's sentence-transformers
    config, else mean."""
    if pooling != "auto":
        if pooling not in pooling_lib.POOLINGS:
            raise ValueError(f"--pooling must be auto, mean or cls, got {pooling!r}")
        return pooling, "--pooling"
    found = embeddings.read_pooling(teacher.path)
    if found:
        return found, f"the sentence-transformers pooling config of {teacher.path}"
    return "mean", "default (the teacher folder has no sentence-transformers pooling config)"


# ----------------------------------------------------------------------------------------------
# The evaluation.
# ----------------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """NaN → None, recursively: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def evaluate(student: str, teacher: str, *, sts: str | None = None,
             labelled: str | None = None, text: str | None = None,
             tokenizer: str | None = None, lowercase: bool | None = None,
             pooling: str = "auto", folds: int = 5, neighbours: int = 10, max_len: int = 128,
             batch_size: int = 64, dtype: str = "float32", init_only: bool = True,
             seed: int = 0, max_pairs: int = MAX_PAIRS, output: str | None = None
             ) -> dict[str, Any]:
    """Embeds the files with the teacher, the init-only student and the student; scores them.

    Args: as the flags of the same names (see the module docstring); `output` is written last,
      its folder checked first.

    Returns:
      The report: `metrics` (role → metric → number, as in the table), and what was evaluated
      (`models`, `data`, `pooling`, `tokenizer`, …).

    Raises:
      ValueError / OSError: a bad flag, file, model or tokenizer (one line for `cli.run`).
    """
    if not (sts or labelled or text):
        raise ValueError("nothing to evaluate: pass --sts, --labelled and/or --text")
    if output and not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise FileNotFoundError(f"--output={output}: its folder does not exist")
    if batch_size < 1 or neighbours < 1:
        raise ValueError(f"--batch_size ({batch_size}) and --neighbours ({neighbours}) must be "
                         "positive")
    # The user's files first: a bad line fails in a second, not after loading two models.
    pairs = read_sts(sts) if sts else None
    examples = read_labelled(labelled) if labelled else None
    if examples and (folds < 2 or len(examples.labels) < folds):
        raise ValueError(f"--folds={folds}: need at least 2 folds and at least as many "
                         f"examples as folds ({labelled} has {len(examples.labels)})")
    sentences = read_text(text) if text else None
    if sentences is not None and len(sentences) <= neighbours:
        raise ValueError(f"{text} (--text) has {len(sentences)} sentences; recall@{neighbours} "
                         f"needs more than {neighbours}")

    mesh = _one_device_mesh()
    models = {"teacher": load_model("teacher", teacher, mesh)}
    student_model = load_model("student", student, mesh)
    init_note = "not asked for (--noinit_only)"
    if init_only:
        built, init_note = init_only_model(student_model, models["teacher"])
        if built:
            models["init_only"] = built
        else:
            logging.warning("No init-only student: %s.", init_note)
    models["student"] = student_model
    pooling, pooling_source = resolve_pooling(pooling, models["teacher"])

    tokenizer_path = tokenizer or models["teacher"].tokenizer
    if not tokenizer_path:
        raise ValueError(f"--teacher={teacher} names no tokenizer: pass --tokenizer=vocab.txt, "
                         "tokenizer.json or .model")
    if lowercase is None:  # The teacher's setting fits its own vocabulary, or a copy of it.
        lowercase = models["teacher"].lowercase
    tok = load_tokenizer(tokenizer_path, lowercase=lowercase)
    for model in (models["teacher"], student_model):  # The init-only one is the student's shape.
        _check_model_fits(model, tok.vocab_size, tokenizer_path, max_len)

    # Each file is tokenised and packed once; every model reads the same rows.
    packed, data = {}, {}
    if pairs:
        packed["sts"] = embeddings.tokenize_and_pack(
            tok, pairs.sentences1 + pairs.sentences2, max_len)
        data["sts"] = {"path": sts, "pairs": len(pairs.gold), "header_skipped": pairs.header}
    if examples:
        packed["labelled"] = embeddings.tokenize_and_pack(tok, examples.texts, max_len)
        counts = {label: examples.labels.count(label) for label in sorted(set(examples.labels))}
        data["labelled"] = {"path": labelled, "examples": len(examples.labels),
                            "classes": len(counts), "label_counts": counts, "folds": folds,
                            "header_skipped": examples.header}
    if sentences is not None:
        packed["text"] = embeddings.tokenize_and_pack(tok, sentences, max_len)
        all_pairs = len(sentences) * (len(sentences) - 1) // 2
        data["text"] = {"path": text, "sentences": len(sentences), "neighbours": neighbours,
                        "pairs": min(all_pairs, max_pairs), "pairs_sampled": all_pairs > max_pairs}
    # One segment count for every file: each model then compiles one program, not one per file.
    max_segments = max(p.max_segments for p in packed.values())
    packed = {name: dataclasses.replace(p, max_segments=max_segments)
              for name, p in packed.items()}
    for name, p in packed.items():
        data[name].update(rows=int(p.rows["input_ids"].shape[0]), truncated=p.truncated)

    metrics: dict[str, dict[str, float]] = {}
    details: dict[str, dict[str, Any]] = {}
    teacher_text = None
    for role in ROLES:
        if role not in models:
            continue
        model = models[role]
        encoder = embeddings.embedding_encoder(model.model_cfg, dtype)
        params = embeddings.encoder_only(model.params)
        started = time.perf_counter()
        embedded = {name: embeddings.embed_packed(encoder, params, p, pooling=pooling,
                                                  batch_size=batch_size)
                    for name, p in packed.items()}
        row: dict[str, float] = {}
        details[role] = {"embed_seconds": round(time.perf_counter() - started, 3)}
        if pairs:
            n = len(pairs.gold)
            row["sts_spearman"] = sts_spearman(embedded["sts"][:n], embedded["sts"][n:],
                                               pairs.gold)
        if examples:
            accuracy = probe_accuracy(embedded["labelled"], examples.labels, folds=folds,
                                      seed=seed)
            row["probe_accuracy"] = float(np.mean(accuracy))
            details[role]["probe_fold_accuracy"] = accuracy
        if sentences is not None:
            if role == "teacher":
                teacher_text = embedded["text"]
            else:
                row["text_cosine_spearman"] = pairwise_agreement(
                    embedded["text"], teacher_text, max_pairs=max_pairs, seed=seed)
                row[f"text_recall@{neighbours}"] = neighbour_recall(
                    embedded["text"], teacher_text, neighbours)
        metrics[role] = row
        logging.info("%s: %s", role, row)

    report = {
        "metrics": metrics,
        "models": {role: m.describe() for role, m in models.items()},
        "init_only": ({"layer_map": list(models["student"].run_config.init.layer_map)}
                      if "init_only" in models else {"skipped": init_note}),
        "pooling": pooling, "pooling_source": pooling_source,
        "tokenizer": tokenizer_path, "lowercase": lowercase, "max_len": max_len,
        "batch_size": batch_size, "dtype": dtype, "seed": seed,
        "data": data, "details": details,
    }
    if student_model.run_config is not None:
        report["models"]["student"]["run_teacher"] = student_model.run_config.get(
            "teacher", {}).get("checkpoint", "")
    report = _finite(report)
    if output:
        tmp = f"{output}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, output)  # Whole or not at all.
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report's metrics as a table: a row per model, a column per metric (4 decimals)."""
    metrics = report["metrics"]
    columns = list(dict.fromkeys(k for row in metrics.values() for k in row))
    header = ["model", "layers×width", *columns]
    lines = [header]
    for role in ROLES:
        if role not in metrics:
            continue
        described = report["models"][role]
        cells = [ROLE_NAMES[role], f"{described['layers']}×{described['hidden_size']}"]
        for column in columns:
            value = metrics[role].get(column, "—")
            cells.append("nan" if value is None else
                         value if isinstance(value, str) else f"{value:.4f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)


# ----------------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------------


def _define_flags() -> dict[str, flags.FlagHolder]:
    """The CLI's flags, defined only when run as a program, so that this module imports beside
    the other commands (which define --output, --tokenizer …) in notebooks and tests."""
    return {
        "student": flags.DEFINE_string(
            "student", None, "distil_flax workdir or Hugging Face folder of the student.",
            required=True),
        "teacher": flags.DEFINE_string(
            "teacher", None, "Hugging Face folder or distil_flax workdir of the teacher.",
            required=True),
        "sts": flags.DEFINE_string(
            "sts", None, "TSV of sentence1 <TAB> sentence2 <TAB> gold score."),
        "labelled": flags.DEFINE_string("labelled", None, "TSV of label <TAB> text."),
        "text": flags.DEFINE_string("text", None, "Text file, one sentence per line."),
        "tokenizer": flags.DEFINE_string(
            "tokenizer", None, "vocab.txt / tokenizer.json / .model; default: the teacher's."),
        "lowercase": flags.DEFINE_bool(
            "lowercase", None, "Uncased normalisation for a vocab.txt; default: the teacher's "
            "(its folder's tokenizer_config.json do_lower_case, or its run's data.lowercase)."),
        "pooling": flags.DEFINE_enum(
            "pooling", "auto", ["auto", "mean", "cls"],
            "auto: the teacher folder's sentence-transformers 1_Pooling/config.json, else mean."),
        "folds": flags.DEFINE_integer("folds", 5, "Cross-validation folds of the probe."),
        "neighbours": flags.DEFINE_integer("neighbours", 10, "k of text_recall@k."),
        "max_len": flags.DEFINE_integer(
            "max_len", 128, "Tokens per sentence, [CLS] and [SEP] included (longer ones are "
            "cut), and the packed row length."),
        "batch_size": flags.DEFINE_integer("batch_size", 64, "Packed rows per forward pass."),
        "dtype": flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                                   "Compute dtype of the encoders."),
        "init_only": flags.DEFINE_bool(
            "init_only", True, "Also evaluate the student as its run started (teacher layers "
            "init.layer_map), when the student is a distil_flax workdir as wide as the teacher."),
        "seed": flags.DEFINE_integer("seed", 0, "Seeds the probe's folds and pair sampling."),
        "output": flags.DEFINE_string("output", None, "Write the report here as JSON."),
    }


def main(argv, flag_values: dict[str, flags.FlagHolder]):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    v = {name: holder.value for name, holder in flag_values.items()}
    report = cli.run(lambda: evaluate(**v), sigterm_aborts=True,
                     interrupted="interrupted: nothing was written (--output is written last)")
    print(format_table(report))
    if v["output"]:
        print(f"Wrote {os.path.abspath(v['output'])}")


if __name__ == "__main__":
    cli.main(functools.partial(main, flag_values=_define_flags()))
