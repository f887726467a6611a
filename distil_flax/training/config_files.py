"""Config files outside the command line: a `configs/` file with its `:arg`, a run's config.json.

The commands read `--config` through `ml_collections.config_flags`; notebooks, tests and model
cards load the same files here, locked as on the command line.
"""

import importlib.util
import json
import os
from typing import Any

import ml_collections
from etils import epath

from distil_flax.training import atomic


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` as the `--config` flag does (for notebooks and tests).

    The config is locked, as on the command line: setting a field that does not exist raises.
    """
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_distil_flax_config", path)
    if module_spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    c = module.get_config(arg) if arg else module.get_config()
    c.lock()
    return c


def save_json(c: ml_collections.ConfigDict, path: str | os.PathLike) -> None:
    """Writes `c` as JSON to a local or object-storage path (`gs://...`, through etils.epath).

    Whole or not at all: a local file is written beside and renamed over `path` (objects are
    atomic already), so a run killed mid-write leaves the previous config.json intact.
    """
    atomic.write_text(path, c.to_json_best_effort(indent=2, sort_keys=True))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in a local or `gs://` file.

    Raises:
      FileNotFoundError: nothing at `path`.
      ValueError: not valid JSON (naming the file).
    """
    try:
        return json.loads(epath.Path(path).read_text())
    except ValueError as error:  # Also not UTF-8 (UnicodeDecodeError).
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def load_json(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Reads a config written by `save_json` (a run's `config.json`), local or `gs://`.

    Raises:
      FileNotFoundError: nothing at `path`.
      ValueError: the file is not a JSON object.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no config file at {path}")
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return ml_collections.ConfigDict(value)
