"""Every test sees 8 simulated CPU devices, so sharded and single-device runs can be compared."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def vocab_path(tmp_path_factory):
    """A WordPiece vocab trained on the bundled corpus (a couple of seconds)."""
    from distil_flax import data

    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    return data.train_wordpiece(data.read_documents("bundled"), 2000, str(path))


@pytest.fixture(scope="session")
def teacher_workdir(tmp_path_factory, vocab_path):
    """A tiny BERT teacher pretrained for 20 steps with the quickstart teacher config."""
    from distil_flax import train
    from distil_flax.config import load_config

    c = load_config("configs/quickstart_teacher.py:tiny")
    c.data.tokenizer = vocab_path
    workdir = str(tmp_path_factory.mktemp("teacher"))
    train.train_and_evaluate(c, workdir)
    return workdir
