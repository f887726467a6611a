"""An encoder as an ONNX graph, checked against PyTorch, optionally quantised to int8 (the
library side of `python -m distil_flax.export_onnx`, which documents the graph)."""

import contextlib
import dataclasses
import logging as py_logging
import os
import shutil
import warnings
from typing import Sequence

import numpy as np
from absl import logging

from distil_flax.interop import export as export_lib
from distil_flax.interop import hf, sources
from distil_flax.interop import sentence_transformers as st_layout
from distil_flax.interop.onnx_runtime import session
from distil_flax.training import atomic, progress

OPSET = 17
TOLERANCE = 1e-4  # Max |ONNX − PyTorch| of either output, fp32.
PARITY_BATCH = 32  # Sentences per batch of the parity check.
QUANTIZE = ("int8",)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.json")
# Parity sentences when --text gives none: short and long, with padding in every batch.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Distillation makes an encoder smaller and faster while keeping most of its accuracy.",
    "Hello world!",
    "A sentence embedding maps a whole sentence to one vector, so that similar sentences lie "
    "close together and unrelated ones far apart, whatever words they share.",
    "Short.",
    "ONNX Runtime runs the exported graph without PyTorch.",
)


@dataclasses.dataclass
class OnnxExport:
    """What `export_onnx` wrote and measured."""

    output: str
    inputs: list[str]
    pooling: str
    normalize: bool
    max_abs_diff_hidden: float  # ONNX vs PyTorch, over non-padding positions.
    max_abs_diff_embedding: float
    sentences: int
    int8_output: str | None = None
    int8_cosine_mean: float | None = None  # int8 vs fp32 ONNX sentence embeddings.
    int8_cosine_min: float | None = None
    int8_max_abs_diff_embedding: float | None = None

    def lines(self) -> list[str]:
        """What the command prints."""
        lines = [f"Wrote {self.output} ({os.path.getsize(self.output):,} bytes): inputs "
                 f"{', '.join(self.inputs)}; outputs last_hidden_state, sentence_embedding "
                 f"({self.pooling} pooling{', normalised' if self.normalize else ''}).",
                 f"ONNX vs PyTorch (fp32, {self.sentences} sentences): max |diff| "
                 f"last_hidden_state {self.max_abs_diff_hidden:.3g}, sentence_embedding "
                 f"{self.max_abs_diff_embedding:.3g} (tolerance {TOLERANCE:g})."]
        if self.int8_output:
            lines.append(f"Wrote {self.int8_output} ({os.path.getsize(self.int8_output):,} "
                         f"bytes): int8 vs fp32 sentence embeddings: cosine mean "
                         f"{self.int8_cosine_mean:.5f}, min {self.int8_cosine_min:.5f}; max "
                         f"|diff| {self.int8_max_abs_diff_embedding:.3g}.")
        return lines


# ----------------------------------------------------------------------------------------------
# The model: a transformers encoder and its sentence pooling, as one torch module.
# ----------------------------------------------------------------------------------------------


def _torch_libs():
    try:
        import torch
        import transformers
    except ImportError as error:
        raise ValueError(f"exporting to ONNX needs torch and transformers ({error}): pip install "
                         "-e '.[test]'") from None
    return torch, transformers


def resolve_folder(path: str, pooling: str = "auto") -> tuple[str, str, bool]:
    """(the transformers model's folder, pooling, normalize) of an HF or sentence-transformers
    folder; `pooling` "auto" takes the folder's sentence-transformers pooling, else mean.

    Raises:
      ValueError: no such folder, no HF model in it, or a bad pooling.
    """
    if pooling not in ("auto", "mean", "cls"):
        raise ValueError(f"--pooling must be auto, mean or cls, got {pooling!r}")
    if not os.path.isdir(path):
        raise ValueError(f"--model={path}: no such directory")
    sentence = st_layout.read_sentence_config(path)
    folder = os.path.join(path, sentence.transformer_path) if sentence else path
    if not hf.is_hf_checkpoint(folder):
        raise ValueError(f"--model={path} is not a Hugging Face model folder (config.json with a "
                         "model_type, and weights) nor a distil_flax workdir")
    if sentence and sentence.other_modules:
        logging.warning("%s: the sentence-transformers modules %s are not in the ONNX graph "
                        "(sentence_embedding is the pooled one).", path,
                        list(sentence.other_modules))
    if pooling == "auto":
        pooling = (sentence and sentence.pooling) or "mean"
    return folder, pooling, bool(sentence and sentence.normalize)


def sentence_module(folder: str, pooling: str, normalize: bool):
    """(torch module: inputs → (last_hidden_state, sentence_embedding), input names)."""
    torch, transformers = _torch_libs()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # Its "Loading weights" bar, on stderr.
    try:
        encoder = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager")
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    encoder.eval()
    # Token types are an input only where they can be other than 0 (BERT: 2; a RoBERTa, or our
    # export of a model without them, has one row, which every token gets).
    takes_types = encoder.config.model_type != "distilbert" and int(
        getattr(encoder.config, "type_vocab_size", 0) or 0) > 1

    class SentenceEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  **kwargs).last_hidden_state
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:  # sentence-transformers' mean: over the mask, clamped as it clamps.
                weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            return hidden, pooled

    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if takes_types else [])
    return SentenceEncoder().eval(), names


def parity_batches(folder: str, vocab_size: int, sentences: Sequence[str] | None,
                   max_length: int, types: bool, batch_size: int = PARITY_BATCH
                   ) -> list[dict[str, np.ndarray]]:
    """int64 inputs, `batch_size` sentences a batch: `sentences` (or the built-in ones) through
    the folder's tokenizer, each batch padded to its longest; random ids with padding when the
    folder has no tokenizer."""
    _, transformers = _torch_libs()
    sentences = list(sentences or SENTENCES)
    tokenizer = None
    if any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    else:
        logging.info("No tokenizer in %s: parity on random token ids.", folder)
    rng = np.random.default_rng(0)
    batches = []
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start:start + batch_size]
        if tokenizer is not None:
            batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                              return_tensors="np")
            ids, mask = batch["input_ids"], batch["attention_mask"]
        else:
            lengths = rng.integers(3, max(4, min(max_length, 40)), len(chunk))
            ids = rng.integers(1, vocab_size, (len(chunk), int(lengths.max())))
            mask = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int64)
            ids = np.where(mask, ids, 0)
        inputs = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        if types:
            inputs["token_type_ids"] = np.zeros_like(inputs["input_ids"])
        batches.append(inputs)
    return batches


# ----------------------------------------------------------------------------------------------
# Export, check, quantise.
# ----------------------------------------------------------------------------------------------


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / np.maximum(
        np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def _trace_inputs(vocab_size: int, types: bool):
    """Two rows, the second padded: the trace must take the attention-mask path (a batch
    without padding may let transformers skip the mask, and the graph would have none)."""
    torch, _ = _torch_libs()
    ids = torch.randint(1, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    args = (ids, mask) + ((torch.zeros_like(ids),) if types else ())
    return args


def export_onnx(model: str, output: str, *, pooling: str = "auto", quantize: str | None = None,
                sentences: Sequence[str] | None = None, opset: int = OPSET,
                overwrite: bool = False, tolerance: float = TOLERANCE) -> OnnxExport:
    """Exports `model` (HF / sentence-transformers folder, or a distil_flax workdir) to ONNX.

    Args:
      model: the folder (see the module docstring).
      output: the .onnx file to write; with `quantize`, the int8 model goes beside it as
        `<stem>_int8.onnx`.
      pooling: "auto" (the folder's sentence-transformers pooling, else mean), "mean" or "cls".
      quantize: None or "int8".
      sentences: parity sentences; None: `SENTENCES`.
      opset: ONNX opset (17 or more).
      overwrite: replace existing files.
      tolerance: the largest |ONNX − PyTorch| accepted.

    Raises:
      ValueError: a bad folder or flag, an existing output, or a parity check that fails (then
        nothing is written).
    """
    if quantize not in (None, *QUANTIZE):
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if opset < 17:
        raise ValueError(f"--opset must be 17 or more, got {opset}")
    output = os.path.abspath(output)
    int8_output = _int8_path(output) if quantize else None
    if not output.endswith(".onnx"):
        raise ValueError(f"--output={output} must end in .onnx")
    for path in filter(None, (output, int8_output)):
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"{path} exists (--overwrite replaces it)")
    if not os.path.isdir(os.path.dirname(output)):
        raise ValueError(f"--output={output}: its folder does not exist")
    if sentences is not None and not len(sentences):
        raise ValueError("no parity sentences (an empty --text file?)")
    model = hf.resolve_checkpoint(model)  # hf://ORG/NAME: its folder in the cache.
    if os.path.isfile(os.path.join(model, "config.json")):
        source = sources.open_source(model, field="--model")
        if source.kind != "hf":
            # Exported first, beside the output under a temporary name (a killed export's is
            # removed by the next export to the same output).
            staging = atomic.temp_path(output, ".model")
            try:
                export_lib.export_run(model, staging, output_format="sentence-transformers",
                                      pooling=None if pooling == "auto" else pooling)
                return export_onnx(staging, output, pooling=pooling, quantize=quantize,
                                   sentences=sentences, opset=opset, overwrite=overwrite,
                                   tolerance=tolerance)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    folder, pooling, normalize = resolve_folder(model, pooling)
    torch, _ = _torch_libs()
    module, names = sentence_module(folder, pooling, normalize)
    config = module.encoder.config
    types = "token_type_ids" in names
    batches = parity_batches(folder, config.vocab_size, sentences,
                             int(config.max_position_embeddings), types)
    # Each sentence runs through PyTorch, the ONNX graph and (quantized) the int8 graph.
    rows = [len(b["input_ids"]) for b in batches]
    shown = progress.Progress("parity", sum(rows) * (3 if quantize else 2), "sentences")
    with contextlib.ExitStack() as files:
        files.enter_context(shown)
        with torch.inference_mode():
            expected = []
            for batch, n in zip(batches, rows):
                expected.append([t.numpy() for t in module(*(torch.from_numpy(batch[k])
                                                             for k in names))])
                shown.update(n)
        # Renamed into place together once the parity check (and quantisation) passed.
        tmp_fp32 = files.enter_context(atomic.replaced(output, suffix=".onnx"))
        tmp_int8 = (files.enter_context(atomic.replaced(int8_output, suffix=".onnx"))
                    if int8_output else None)
        dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
        dynamic |= {"last_hidden_state": {0: "batch", 1: "sequence"},
                    "sentence_embedding": {0: "batch"}}
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter (the torch.export one needs onnxscript). Its deprecation
            # notice and tracer warnings (Python values taken as constants: the mask's padding
            # arithmetic, 0 for any input) are silenced; the parity check below is the guard.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, _trace_inputs(config.vocab_size, types), tmp_fp32,
                              dynamo=False, opset_version=opset, input_names=names,
                              output_names=["last_hidden_state", "sentence_embedding"],
                              dynamic_axes=dynamic, do_constant_folding=True)
        fp32 = session(tmp_fp32)
        diff_hidden = diff_embedding = 0.0
        embeddings = []
        for batch, (hidden_pt, embedding_pt) in zip(batches, expected):
            hidden, embedding = fp32.run(None, batch)
            keep = batch["attention_mask"].astype(bool)
            diff_hidden = max(diff_hidden, float(np.abs(hidden[keep] - hidden_pt[keep]).max()))
            diff_embedding = max(diff_embedding, float(np.abs(embedding - embedding_pt).max()))
            embeddings.append(embedding)
            shown.update(len(embedding))
        if not max(diff_hidden, diff_embedding) <= tolerance:
            raise ValueError(f"the ONNX graph differs from PyTorch by {diff_hidden:.3g} "
                             f"(last_hidden_state) / {diff_embedding:.3g} (sentence_embedding), "
                             f"more than {tolerance:g}: nothing written")
        result = OnnxExport(output, names, pooling, normalize, diff_hidden, diff_embedding,
                            sum(len(b["input_ids"]) for b in batches))
        if quantize:
            quantize_int8(tmp_fp32, tmp_int8)
            int8 = session(tmp_int8)
            quantized = []
            for batch in batches:
                quantized.append(int8.run(["sentence_embedding"], batch)[0])
                shown.update(len(quantized[-1]))
            quantized = np.concatenate(quantized)
            embedding = np.concatenate(embeddings)
            cosines = _cosines(quantized, embedding)
            result.int8_output = int8_output
            result.int8_cosine_mean = float(cosines.mean())
            result.int8_cosine_min = float(cosines.min())
            result.int8_max_abs_diff_embedding = float(np.abs(quantized - embedding).max())
    return result


def quantize_int8(source: str, target: str) -> None:
    """onnxruntime's dynamic quantisation: int8 (QInt8) weights, one scale per output channel,
    for every MatMul with a constant weight (and the embedding tables); activations are
    quantised per batch at run time, and the attention's activation × activation products stay
    fp32. On all-MiniLM-L6-v2, per-channel scales lift the embeddings' mean cosine to the fp32
    model from 0.959 (one scale per tensor) to 0.992 (200 pydoc sentences), at the same size.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = py_logging.getLogger()  # Where the quantiser logs, per tensor.
    root.addFilter(_quantizer_chatter)
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.removeFilter(_quantizer_chatter)


def _quantizer_chatter(record: py_logging.LogRecord) -> bool:
    """Drops the quantiser's per-tensor INFO lines and its advice to pre-process the model
    (shape inference, which static quantisation needs and dynamic does not)."""
    if "onnxruntime" not in record.pathname:
        return True
    return (record.levelno >= py_logging.WARNING
            and not str(record.msg).startswith("Please consider to run pre-processing"))


def _int8_path(output: str) -> str:
    stem, ext = os.path.splitext(output)
    return f"{stem}_int8{ext or '.onnx'}"


def read_sentences(path: str) -> list[str]:
    """One sentence per non-blank line of a UTF-8 file."""
    if not os.path.isfile(path):
        raise ValueError(f"--text={path}: no such file")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
