"""The evaluation behind `python -m distil_flax.evaluate_embeddings` (whose docstring says what
it measures): models, init-only student, metrics on each file, the report and its table."""

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from distil_flax import model as model_lib
from distil_flax.data import load_tokenizer
from distil_flax.embeddings import embed as embeddings
from distil_flax.embeddings.files import read_labelled, read_sts, read_text
from distil_flax.embeddings.metrics import (
    MAX_PAIRS,
    neighbour_recall,
    pairwise_agreement,
    probe_accuracy,
    sts_spearman,
)
from distil_flax.interop import onnx_runtime, sources
from distil_flax.interop import sentence_transformers as st_layout
from distil_flax.model import pooling as pooling_lib
from distil_flax.model import student_init
from distil_flax.training import atomic, partitioning, progress

ROLES = ("teacher", "init_only", "student")  # Table rows, in order.
ROLE_NAMES = {"teacher": "teacher", "init_only": "init-only student", "student": "student"}


# ----------------------------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
    """An encoder to embed with: where it came from, its config and its full parameter tree."""

    role: str  # teacher | init_only | student
    path: str
    source: str  # hf | run | finetuned (`interop.sources.KINDS`) | init_only
    model_cfg: ml_collections.ConfigDict
    params: dict[str, Any]  # MLM head and pooler included where the checkpoint has them.
    step: int | None = None
    tokenizer: str = ""
    lowercase: bool = True
    run_config: ml_collections.ConfigDict | None = None  # A run workdir's config.json.
    pruning: student_init.Pruning | None = None  # A pruned run's record (its pruning.json).

    def describe(self) -> dict[str, Any]:
        c = self.model_cfg
        return {"path": self.path, "source": self.source, "step": self.step,
                "layers": int(c.num_layers), "hidden_size": int(c.hidden_size),
                "vocab_size": int(c.vocab_size)}


def _one_device_mesh():
    return partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def load_model(role: str, path: str, mesh=None) -> Model:
    """A teacher or student: anything `interop.sources` reads (a distil_flax workdir, an HF or
    sentence-transformers folder, `hf://ORG/NAME`), on `mesh` (default: one device).

    Raises:
      ValueError: not a model (named), or one we cannot read.
    """
    mesh = mesh or _one_device_mesh()
    source = sources.open_source(path, field=f"--{role}")
    # A run's whole tree (MLM head too): an init-only student is built from it.
    params, step = sources.encoder_params(source, mesh, partitioning.DEFAULT_RULES)
    if source.kind != "run":
        params = jax.device_put(params, mesh.devices.flat[0])
    logging.info("%s: %s (%s%s), %d layers × %d.", role, path, source.kind,
                 f", step {step}" if step is not None else "", source.model_cfg.num_layers,
                 source.model_cfg.hidden_size)
    return Model(role, path, source.kind, source.model_cfg, params, step, source.tokenizer,
                 source.lowercase, source.run_config, source.pruning)


def init_only_model(student: Model, teacher: Model) -> tuple[Model | None, str]:
    """The student as its run started: the teacher's layers `init.layer_map` (the run's), or
    the teacher pruned as its pruning.json records.

    Returns:
      (model, "") or (None, why there is none).
    """
    if student.source != "run" or student.run_config is None:
        return None, (f"the student is a {student.source} model, not a distil_flax "
                      "distillation workdir (no init.layer_map)")
    s, t = student.model_cfg, teacher.model_cfg
    if student.pruning is not None:
        structure = jax.eval_shape(model_lib.init_fn(model_lib.make_encoder(s)),
                                   jax.random.PRNGKey(0))
        try:
            params = student_init.init_from_teacher(
                teacher.params, structure, student.pruning.layers,
                num_heads=(int(t.num_heads), int(s.num_heads)), pruning=student.pruning)
        except ValueError as error:
            return None, f"cannot prune the teacher as the student's run did: {error}"
        return Model("init_only", f"{teacher.path} pruned as {student.path}", "init_only",
                     s, params), ""
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


def _init_only_note(student: Model) -> dict[str, Any]:
    """How the init-only student was made, for the report."""
    if student.pruning is not None:
        return {"layer_map": list(student.pruning.layers), "pruned": True}
    return {"layer_map": list(student.run_config.init.layer_map)}


def _check_model_fits(model: Model, vocab_size: int, tokenizer: str, max_len: int) -> None:
    c = model.model_cfg
    if int(c.vocab_size) != vocab_size:
        raise ValueError(f"--{model.role}={model.path} has vocab_size {c.vocab_size} but the "
                         f"tokenizer {tokenizer} has {vocab_size}: evaluate with the tokenizer "
                         "the models were trained with (--tokenizer)")
    if max_len > int(c.max_position_embeddings):
        raise ValueError(f"--max_len={max_len} exceeds --{model.role}'s "
                         f"max_position_embeddings ({c.max_position_embeddings})")


DEFAULT_MAX_LEN = 512  # Without a max_seq_length to follow: BERT's positions.


def resolve_max_len(max_len: int, teacher: Model, student: Model) -> tuple[int, str]:
    """(tokens per text, [CLS] and [SEP] included, where that came from). 0 follows the teacher:
    its sentence-transformers max_seq_length (sentence_bert_config.json: 256 for
    all-MiniLM-L6-v2), else its positions up to DEFAULT_MAX_LEN; either way no more than the
    student's positions. Never a training run's data.seq_len: a passage is read as far as the
    teacher reads it, whatever rows the student trained on."""
    if max_len:
        if max_len < 3:
            raise ValueError(f"--max_len must be 0 (the teacher's) or at least 3, got {max_len}")
        return max_len, "--max_len"
    found = st_layout.read_sentence_config(teacher.path) if os.path.isdir(teacher.path) else None
    if found is not None and found.max_seq_length:
        length, source = found.max_seq_length, f"the max_seq_length of {teacher.path}"
    else:
        length = min(int(teacher.model_cfg.max_position_embeddings), DEFAULT_MAX_LEN)
        source = "the teacher's positions"
    positions = int(student.model_cfg.max_position_embeddings)
    if positions < length:
        return positions, f"{source} ({length}), cut to the student's {positions} positions"
    return length, source


def resolve_pooling(pooling: str, teacher: Model) -> tuple[str, str]:
    """(pooling, where it came from); "auto" reads the teacher folder's sentence-transformers
    config, else mean."""
    if pooling != "auto":
        if pooling not in pooling_lib.POOLINGS:
            raise ValueError(f"--pooling must be auto, mean or cls, got {pooling!r}")
        return pooling, "--pooling"
    found = st_layout.read_pooling(teacher.path)
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
             pooling: str = "auto", folds: int = 5, neighbours: int = 10, max_len: int = 0,
             batch_size: int = 64, dtype: str = "float32", init_only: bool = True,
             seed: int = 0, max_pairs: int = MAX_PAIRS, onnx: str | None = None,
             output: str | None = None) -> dict[str, Any]:
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
    onnx_files = [f for f in (onnx or "").split(",") if f]
    for path in onnx_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--onnx={path}: no such file")
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
    max_len, max_len_source = resolve_max_len(max_len, models["teacher"], student_model)

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

    def score(embedded: dict[str, np.ndarray], detail: dict[str, Any],
              teacher_text: np.ndarray | None) -> dict[str, float]:
        """One model's metrics on each file's embeddings (`teacher_text`: the teacher's, for
        the agreement; None while embedding the teacher itself)."""
        row: dict[str, float] = {}
        if pairs:
            n = len(pairs.gold)
            row["sts_spearman"] = sts_spearman(embedded["sts"][:n], embedded["sts"][n:],
                                               pairs.gold)
        if examples:
            accuracy = probe_accuracy(embedded["labelled"], examples.labels, folds=folds,
                                      seed=seed)
            row["probe_accuracy"] = float(np.mean(accuracy))
            detail["probe_fold_accuracy"] = accuracy
        if sentences is not None and teacher_text is not None:
            row["text_cosine_spearman"] = pairwise_agreement(
                embedded["text"], teacher_text, max_pairs=max_pairs, seed=seed)
            row[f"text_recall@{neighbours}"] = neighbour_recall(
                embedded["text"], teacher_text, neighbours)
        return row

    metrics: dict[str, dict[str, float]] = {}
    details: dict[str, dict[str, Any]] = {}
    teacher_text = None
    # Every model embeds every file's sentences: the JAX models, then each ONNX file.
    sentences_per_model = sum(len(p.row) for p in packed.values())
    shown = progress.Progress(
        "evaluate", sentences_per_model * (len(models) + len(onnx_files)), "sentences")
    for role in ROLES:
        if role not in models:
            continue
        model = models[role]
        encoder = embeddings.embedding_encoder(model.model_cfg, dtype)
        params = embeddings.encoder_only(model.params)
        started = time.perf_counter()
        embedded = {name: embeddings.embed_packed(encoder, params, p, pooling=pooling,
                                                  batch_size=batch_size, progress=shown)
                    for name, p in packed.items()}
        details[role] = {"embed_seconds": round(time.perf_counter() - started, 3)}
        metrics[role] = score(embedded, details[role], teacher_text)
        if role == "teacher" and sentences is not None:  # The others agree with it.
            teacher_text = embedded["text"]
        logging.info("%s: %s", role, metrics[role])
    # The student's ONNX exports, on the same sentences, one at a time (framed, padded).
    texts = {"sts": pairs and pairs.sentences1 + pairs.sentences2,
             "labelled": examples and examples.texts, "text": sentences}
    framed = {name: [tok.frame(ids[:max_len - 2]).input_ids
                     for ids in tok.encode_batch(texts[name])]
              for name in packed} if onnx_files else {}
    onnx_rows = {}
    for path in onnx_files:
        role = f"onnx:{os.path.basename(path)}"
        started = time.perf_counter()
        embedded = {}
        for name, ids in framed.items():
            embedded[name] = onnx_runtime.embed(path, ids, tok.pad_id, max_len, batch_size)
            shown.update(len(ids))
        details[role] = {"embed_seconds": round(time.perf_counter() - started, 3)}
        metrics[role] = score(embedded, details[role], teacher_text)
        onnx_rows[role] = {"path": path, "source": "onnx",
                           "hidden_size": int(next(iter(embedded.values())).shape[-1])}
        logging.info("%s: %s", role, metrics[role])
    shown.close()

    report = {
        "metrics": metrics,
        "models": {**{role: m.describe() for role, m in models.items()}, **onnx_rows},
        "init_only": _init_only_note(models["student"]) if "init_only" in models else {
            "skipped": init_note},
        "pooling": pooling, "pooling_source": pooling_source,
        "tokenizer": tokenizer_path, "lowercase": lowercase, "max_len": max_len,
        "max_len_source": max_len_source,
        "batch_size": batch_size, "dtype": dtype, "seed": seed,
        "data": data, "details": details,
    }
    if student_model.run_config is not None:
        report["models"]["student"]["run_teacher"] = student_model.run_config.get(
            "teacher", {}).get("checkpoint", "")
    report = _finite(report)
    if output:
        atomic.write_text(output, json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report's metrics as a table: a row per model, a column per metric (4 decimals)."""
    metrics = report["metrics"]
    columns = list(dict.fromkeys(k for row in metrics.values() for k in row))
    header = ["model", "layers×width", *columns]
    lines = [header]
    for role in metrics:  # ROLES, then the ONNX files.
        described = report["models"][role]
        layers = "onnx" if described["source"] == "onnx" else described["layers"]
        cells = [ROLE_NAMES.get(role, role), f"{layers}×{described['hidden_size']}"]
        for column in columns:
            value = metrics[role].get(column, "—")
            cells.append("nan" if value is None else
                         value if isinstance(value, str) else f"{value:.4f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)
