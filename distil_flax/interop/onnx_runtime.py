"""Running `export_onnx`'s graphs: ONNX Runtime sessions, padded input batches, embeddings.

The graph takes input_ids and attention_mask (and token_type_ids when its model has token
types), int64 [batch, sequence], and returns sentence_embedding [batch, hidden] among its outputs.
"""

from collections.abc import Sequence

import numpy as np


def session(path: str, threads: int | None = None, *, spinning: bool = True):
    """An ONNX Runtime CPU session of `path`.

    Args:
      threads: intra-op threads; None: onnxruntime's default (one per core).
      spinning: idle intra-op threads spin before they sleep (onnxruntime's default, lowest
        latency); off where several sessions take turns on the same cores.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def padded_batches(token_ids: Sequence[Sequence[int]], batch: int, pad_id: int, max_len: int,
                   pad_multiple: int = 1) -> list[dict[str, np.ndarray]]:
    """int64 batches of framed sentences (`[CLS] … [SEP]` already), each padded to its longest
    row rounded up to `pad_multiple` (at most `max_len`): input_ids, attention_mask and
    token_type_ids (zeros). Rows longer than `max_len` are an error, not cut."""
    batches = []
    for start in range(0, len(token_ids), batch):
        rows = token_ids[start:start + batch]
        longest = max(len(r) for r in rows)
        if longest > max_len:
            raise ValueError(f"a sentence of {longest} tokens is longer than max_len={max_len}")
        length = min(max_len, -(-longest // pad_multiple) * pad_multiple)
        ids = np.full((len(rows), length), pad_id, np.int64)
        mask = np.zeros((len(rows), length), np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "token_type_ids": np.zeros_like(ids)})
    return batches


def embed(path: str, token_ids: Sequence[Sequence[int]], pad_id: int, max_len: int,
          batch_size: int = 64) -> np.ndarray:
    """[sentences, hidden] float32: the graph's sentence_embedding of each framed sentence.

    Raises:
      ValueError: naming `path`, for a file ONNX Runtime cannot load or a graph without
        `export_onnx`'s inputs and sentence_embedding output.
    """
    try:
        runner = session(path)
    except Exception as error:  # onnxruntime's errors (InvalidProtobuf, Fail …) are bare.
        raise ValueError(f"{path}: ONNX Runtime cannot load it ({error})") from None
    inputs = [i.name for i in runner.get_inputs()]
    outputs = [o.name for o in runner.get_outputs()]
    known = {"input_ids", "attention_mask", "token_type_ids"}
    if "sentence_embedding" not in outputs or not set(inputs) <= known:
        raise ValueError(f"{path} is not an export_onnx graph: inputs {inputs}, outputs "
                         f"{outputs} (expected some of {sorted(known)} → sentence_embedding)")
    return np.concatenate([
        runner.run(["sentence_embedding"], {name: b[name] for name in inputs})[0]
        for b in padded_batches(token_ids, batch_size, pad_id, max_len)])
