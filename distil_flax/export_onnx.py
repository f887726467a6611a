"""Exports an encoder to ONNX, checks it against PyTorch, and optionally quantises it to int8.

    python -m distil_flax.export_onnx --model=st --output=st.onnx --quantize=int8

--model: a Hugging Face BERT / DistilBERT folder (`export_hf`, `--format=sentence-transformers`,
or any such checkpoint), or a distil_flax distillation workdir (exported first as
`export_hf --format=sentence-transformers` would, into a folder beside --output that is
removed after). The graph
(`torch.onnx.export`, the TorchScript exporter, opset 17; batch and sequence axes dynamic):

    inputs    input_ids, attention_mask [batch, sequence] int64; token_type_ids too when the
              model has more than one token type (BERT; not DistilBERT)
    outputs   last_hidden_state [batch, sequence, hidden] float32
              sentence_embedding [batch, hidden] float32: the folder's sentence-transformers
              pooling (mean over the attention mask, or the first token) and Normalize module;
              a plain folder: --pooling (default mean), not normalised

The tokenizer stays in the model folder (`AutoTokenizer.from_pretrained(DIR)`). At export the
ONNX Runtime session is run beside the PyTorch model (fp32, eager attention) on --text's
sentences, or on a few built-in ones, and both outputs must agree to 1e-4; the command prints the
largest differences. --quantize=int8 also writes MODEL_int8.onnx: onnxruntime's dynamic
quantisation (int8 weights of every MatMul, activations quantised per batch at run time), and
prints the cosine between its sentence embeddings and the fp32 model's. A bad folder or flag ends
in one `error:` line; nothing is left at --output unless the parity check passed.
"""

import functools

from absl import app, flags

from distil_flax.interop.onnx import OPSET, QUANTIZE, export_onnx, read_sentences
from distil_flax.training import cli


def _define_flags() -> dict[str, flags.FlagHolder]:
    """Defined only when run as a program, so that this module imports beside the others."""
    return {
        "model": flags.DEFINE_string(
            "model", None, "HF or sentence-transformers folder, or a distil_flax workdir.",
            required=True),
        "output": flags.DEFINE_string("output", None, "The .onnx file to write.", required=True),
        "quantize": flags.DEFINE_enum(
            "quantize", None, list(QUANTIZE),
            "int8: also write <output stem>_int8.onnx (dynamic quantisation, int8 weights)."),
        "pooling": flags.DEFINE_enum(
            "pooling", "auto", ["auto", "mean", "cls"],
            "sentence_embedding's pooling; auto: the folder's sentence-transformers pooling, "
            "else mean."),
        "text": flags.DEFINE_string(
            "text", None, "Parity sentences, one a line; default: a few built-in ones."),
        "opset": flags.DEFINE_integer("opset", OPSET, "ONNX opset (≥ 17)."),
        "overwrite": flags.DEFINE_bool("overwrite", False, "Replace existing output files."),
    }


def main(argv, flag_values: dict[str, flags.FlagHolder]):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    v = {name: holder.value for name, holder in flag_values.items()}

    def job():
        sentences = read_sentences(v["text"]) if v["text"] else None
        return export_onnx(v["model"], v["output"], pooling=v["pooling"],
                           quantize=v["quantize"], sentences=sentences, opset=v["opset"],
                           overwrite=v["overwrite"])

    result = cli.run(job, sigterm_aborts=True,
                     interrupted="interrupted: nothing was written (--output is renamed into "
                                 "place after the parity check)")
    print("\n".join(result.lines()))


if __name__ == "__main__":
    cli.main(functools.partial(main, flag_values=_define_flags()))
