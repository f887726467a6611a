"""What several test files build alike: a tiny WordPiece vocabulary, a run checkpoint holding
only parameters, and the one-line check of a command's failure."""

import pathlib

import orbax.checkpoint as ocp
import pytest

from distil_flax.training import checkpoint, checksums, cli

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = ("the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "to", "house", "big", "small",
         "red", "blue", "in", "out", "of", "is", "was", "it", "he", "she", "they", ".", ",")


def write_vocab(folder: pathlib.Path) -> str:
    """vocab.txt of SPECIALS then WORDS in `folder`; returns its path."""
    path = folder / "vocab.txt"
    path.write_text("".join(t + "\n" for t in SPECIALS + WORDS))
    return str(path)


def save_params_checkpoint(workdir, step: int, params) -> None:
    """Step `step` of the run in `workdir`, holding only `params`, committed with the checksums
    every committed step has (a step without them counts as damaged)."""
    directory = checkpoint.checkpoint_dir(str(workdir))
    with ocp.CheckpointManager(directory, item_names=checkpoint.ITEMS) as manager:
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()
    checksums.write_checksums(directory / str(step), checkpoint.ITEMS)


def set_fields(c, settings: dict) -> None:
    """Sets dotted config fields (`"loss.alpha_ce": 5.0`) on a ConfigDict."""
    for name, value in settings.items():
        section, _, field = name.rpartition(".")
        node = c
        for part in section.split("."):
            node = node[part]
        node[field] = value


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
