"""The command that trains a run again, rebuilt from its config.json (for model cards).

A run's config.json holds every field but not the config file it came from. `training_command`
picks the file of the repository's `configs/` (with its usual `:arg`s) that needs the fewest
`--config.*` overrides to give config.json exactly, and writes those overrides as `config_flags`
parses them back (tuples and bools as Python literals, strings as they are). Without the
repository's `configs/` (an installed package), there is no command, and the card says so.
"""

import json
import os
import shlex
from typing import Any, Mapping, Sequence

import distil_flax
from distil_flax.training import config_files

# The repository's config files, when the package runs from a checkout (beside setup.cfg: an
# installed package's site-packages may hold some other project's `configs/`).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(distil_flax.__file__)))
CONFIGS_DIR = os.path.join(_ROOT, "configs")


def training_command(config: Mapping[str, Any], workdir: str) -> tuple[list[str] | None, str]:
    """The command that trains a run with exactly `config` (its config.json), as argv.

    The config file of `configs/` (with its usual `:arg`s) needing the fewest `--config.*`
    overrides is chosen; overrides are the fields whose values differ from it.

    Returns:
      (argv, "") or (None, why not).
    """
    finetuning = "task" in config
    module = "distil_flax.finetune" if finetuning else "distil_flax.main"
    task = config.get("task", {}).get("name", "")
    args = (f"task={task}", f"task={task},preset=tiny") if finetuning else ("", "tiny")
    if not (os.path.isdir(CONFIGS_DIR) and os.path.isfile(os.path.join(_ROOT, "setup.cfg"))):
        return None, "The repository's `configs/` is not at hand to name the config file."
    best = None
    for file in sorted(f for f in os.listdir(CONFIGS_DIR) if f.endswith(".py")):
        for arg in args:
            spec = os.path.join(CONFIGS_DIR, file) + (f":{arg}" if arg else "")
            try:
                reference = json.loads(config_files.load_config(spec).to_json_best_effort())
            except Exception:  # noqa: BLE001 — a config that cannot take this arg: not it.
                continue
            overrides = _overrides(config, reference)
            if overrides is not None and (best is None or len(overrides) < len(best[1])):
                best = (f"configs/{file}" + (f":{arg}" if arg else ""), overrides)
    if best is None:
        return None, "No config file of `configs/` has config.json's fields."
    return ["python", "-m", module, f"--config={best[0]}", f"--workdir={workdir}",
            *best[1]], ""


def _overrides(run: Mapping[str, Any], reference: Mapping[str, Any],
               prefix: str = "") -> list[str] | None:
    """`--config.a.b=value` flags turning `reference` into `run`; None if they can't."""
    if set(run) - set(reference):
        return None  # Fields this config has not: another trainer's, or since removed.
    flags = []
    for key, value in sorted(run.items()):
        ours = reference[key]
        if isinstance(value, dict) != isinstance(ours, dict):
            return None
        if isinstance(value, dict):
            inner = _overrides(value, ours, f"{prefix}{key}.")
            if inner is None:
                return None
            flags += inner
        elif value != ours:
            flags.append(f"--config.{prefix}{key}={_flag_value(value)}")
    return flags


def _flag_value(value: Any) -> str:
    """How `config_flags` parses a value back: literals for tuples and bools, str as is."""
    if isinstance(value, list):
        return repr(_tuples(value))
    return value if isinstance(value, str) else repr(value)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def shell(argv: Sequence[str]) -> str:
    """A command line, one flag a line."""
    quoted = [shlex.quote(a) for a in argv]
    head = [q for q in quoted if not q.startswith(("--", "'--"))]
    flags = [q for q in quoted if q.startswith(("--", "'--"))]
    return " \\\n    ".join([" ".join(head), *flags]) if flags else " ".join(head)
