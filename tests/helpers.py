"""What several test files build alike: a tiny WordPiece vocabulary, and the one-line check of
a command's failure."""

import pathlib

import pytest

from distil_flax.training import cli

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = ("the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "to", "house", "big", "small",
         "red", "blue", "in", "out", "of", "is", "was", "it", "he", "she", "they", ".", ",")


def write_vocab(folder: pathlib.Path) -> str:
    """vocab.txt of SPECIALS then WORDS in `folder`; returns its path."""
    path = folder / "vocab.txt"
    path.write_text("".join(t + "\n" for t in SPECIALS + WORDS))
    return str(path)


def error_line(capsys, job) -> str:
    """What `cli.run` prints for a failing job: exactly one `error:` line, status 1."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(job)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# The loss tests' float64 inputs (with the `x64` fixture of conftest.py).


def f64(*arrays):
    """The arrays as float64 JAX arrays."""
    import jax.numpy as jnp

    return tuple(jnp.asarray(a, jnp.float64) for a in arrays)
