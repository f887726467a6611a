"""Command-line flags both benchmark scripts share, so the pair always measures the same shapes.

Plain Python (argparse only): imported by the JAX bench and the PyTorch peer alike.
"""

import argparse


def comma_list(kind):
    """An argparse type for comma-separated lists: "64,128" → [64, 128]."""
    return lambda text: [kind(v) for v in text.split(",") if v]


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """Adds the model-shape flags (defaults: BERT-base teacher, DistilBERT student)."""
    shape = parser.add_argument_group(
        "model shapes (defaults: BERT-base teacher, DistilBERT student)")
    shape.add_argument("--vocab", type=int, default=30522)
    shape.add_argument("--hidden", type=int, default=768)
    shape.add_argument("--heads", type=int, default=12)
    shape.add_argument("--intermediate", type=int, default=3072)
    shape.add_argument("--teacher_layers", type=int, default=12)
    shape.add_argument("--student_layers", type=int, default=6)
