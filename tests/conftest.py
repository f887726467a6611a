"""Every test sees 8 simulated CPU devices, so sharded and single-device runs can be compared."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the whole session, as a cluster keeps one for
    restarts: the many runs, restarts and CLI subprocesses (through JAX_COMPILATION_CACHE_DIR)
    compile each program once."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cache

    directory = str(tmp_path_factory.mktemp("xla_cache"))
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cache.reset_cache()
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return directory


@pytest.fixture(scope="session")
def vocab_path(tmp_path_factory):
    """A WordPiece vocab trained on the bundled corpus (a couple of seconds)."""
    from distil_flax import data

    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    return data.train_wordpiece(data.read_documents("bundled"), 2000, str(path))


@pytest.fixture(scope="session")
def teacher_workdir(tmp_path_factory, vocab_path):
    """A tiny BERT teacher pretrained for 20 steps with the quickstart teacher config."""
    from distil_flax.distill import train
    from distil_flax.training.config_files import load_config

    c = load_config("configs/quickstart_teacher.py:tiny")
    c.data.tokenizer = vocab_path
    workdir = str(tmp_path_factory.mktemp("teacher"))
    train.train_and_evaluate(c, workdir)
    return workdir


@pytest.fixture
def rng():
    """The loss tests' random inputs: the same each test."""
    import numpy as np

    return np.random.default_rng(0)


@pytest.fixture
def x64():
    """Float64 in JAX for the test (the float64 references of the loss tests)."""
    import jax

    with jax.enable_x64(True):
        yield
