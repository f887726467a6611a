"""Hugging Face Hub model ids as inputs: `hf://ORG/NAME[@REVISION]` → a local snapshot folder.

Wherever a checkpoint folder is read (a teacher, fine-tuning's `init.checkpoint`, a fine-tuned
teacher), `resolve_checkpoint` turns a Hub id into the folder `huggingface_hub.snapshot_download`
keeps in the Hugging Face cache, and leaves every other path as it is:

    hf://google-bert/bert-base-uncased             the `main` branch
    hf://google-bert/bert-base-uncased@v1.0        a branch or tag
    hf://google-bert/bert-base-uncased@86b5e09…    a commit (40 hex digits)

Only what distil_flax reads is fetched: JSON (config, tokenizer config, weight index), safetensors
weights, vocabularies (*.txt, SentencePiece *.model); a legacy `pytorch_model*.bin` only when the
repository has no safetensors. With `HF_HUB_OFFLINE=1`, or when the Hub cannot be reached, the
snapshot comes from the cache alone; a model that is not there is a ValueError naming the id and
the cache searched. The cache is `HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub,
read when called (not only when huggingface_hub was imported), or the `cache_dir` argument.
"""

import os
import re

from absl import logging

from distil_flax.interop.hf.names import SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX

HUB_PREFIX = "hf://"
# What a model folder needs for `load_hf_checkpoint`, `load_hf_task_checkpoint` and tokenizers.
_ALLOW = ("*.json", "*.safetensors", "*.txt", "*.model")
_TORCH_WEIGHTS = ("pytorch_model*.bin",)
# The cache's folder of one model: models--ORG--NAME/snapshots/<commit>.
_SNAPSHOT = re.compile(r"models--(?P<repo>[^/]+)/snapshots/[^/]+")


def is_hub_id(spec: str | os.PathLike) -> bool:
    """Whether `spec` names a Hub model (`hf://ORG/NAME[@REVISION]`) rather than a path."""
    return os.fspath(spec).startswith(HUB_PREFIX)


def parse_hub_id(spec: str) -> tuple[str, str | None]:
    """`hf://ORG/NAME[@REVISION]` → ("ORG/NAME", REVISION or None).

    Raises:
      ValueError: not of that form, or not a valid Hub repository id.
    """
    if not is_hub_id(spec):
        raise ValueError(f"{spec!r} is not a Hub model id (hf://ORG/NAME[@REVISION])")
    repo_id, at, revision = spec[len(HUB_PREFIX):].partition("@")
    if at and not revision:
        raise ValueError(f"{spec}: nothing after '@' (hf://ORG/NAME@REVISION)")
    from huggingface_hub.utils import validate_repo_id  # Only Hub ids need huggingface_hub.

    try:
        validate_repo_id(repo_id)
    except ValueError as e:  # HFValidationError.
        raise ValueError(f"{spec} is not a valid Hub model id (hf://ORG/NAME[@REVISION]): "
                         f"{e}") from None
    return repo_id, revision or None


def hub_model_id(spec: str | os.PathLike) -> str | None:
    """The Hub id ("ORG/NAME") of a `hf://` spec or of a folder inside the Hugging Face cache."""
    spec = os.fspath(spec)
    if is_hub_id(spec):
        return spec[len(HUB_PREFIX):].partition("@")[0]
    match = _SNAPSHOT.search(os.path.abspath(spec).replace(os.sep, "/"))
    # The cache writes ORG/NAME as ORG--NAME; Hub ids never contain "--".
    return match["repo"].replace("--", "/") if match else None


def default_cache_dir() -> str:
    """The Hugging Face cache as the environment names it now (huggingface_hub's precedence)."""
    from huggingface_hub import constants

    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        path = env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]
    elif env.get("HF_HOME"):
        path = os.path.join(env["HF_HOME"], "hub")
    else:
        path = constants.HF_HUB_CACHE
    return os.path.expandvars(os.path.expanduser(path))


def offline() -> bool:
    """Whether Hub requests are off (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`, read now)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.upper() in ("1", "ON", "YES", "TRUE")


def resolve_checkpoint(spec: str, *, cache_dir: str | None = None) -> str:
    """A checkpoint spec → a local folder: `hf://ORG/NAME[@REVISION]` becomes its snapshot in the
    Hugging Face cache (downloaded when missing and the Hub is reachable); any other string, a
    path, is returned unchanged.

    Args:
      spec: a path, or `hf://ORG/NAME` with an optional `@REVISION` (branch, tag or commit).
      cache_dir: the Hugging Face cache to use; None: the environment's (see the module doc).

    Returns:
      The folder (a `snapshots/<commit>` folder for a Hub id).

    Raises:
      ValueError: a malformed id; a model or revision the Hub does not have (or does not show
        without a token); a model not in the cache when the Hub cannot be reached, naming the
        cache searched.
    """
    spec = os.fspath(spec)
    if not is_hub_id(spec):
        return spec
    repo_id, revision = parse_hub_id(spec)
    cache = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    local_only = offline()
    folder = _snapshot(spec, repo_id, revision, cache, local_only, _ALLOW)
    if not any(os.path.isfile(os.path.join(folder, f))
               for f in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN)):
        # No safetensors in the repository: a legacy checkpoint, weights as torch pickles.
        folder = _snapshot(spec, repo_id, revision, cache, local_only, _ALLOW + _TORCH_WEIGHTS)
        if os.path.isfile(os.path.join(folder, TORCH_BIN_INDEX)) or os.path.isfile(
                os.path.join(folder, TORCH_BIN)):
            logging.info("%s has no safetensors weights: using its PyTorch pickles.", spec)
    logging.info("%s → %s%s.", spec, folder, " (offline: from the cache)" if local_only else "")
    return folder


def _snapshot(spec: str, repo_id: str, revision: str | None, cache: str, local_only: bool,
              patterns: tuple[str, ...]) -> str:
    """`snapshot_download` of `patterns`, its failures told as one ValueError naming `spec`."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        return huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache, allow_patterns=list(patterns),
            local_files_only=local_only, library_name="distil_flax")
    except errors.IncompleteSnapshotError as e:
        raise ValueError(f"{spec}: the cached snapshot in {cache} is incomplete and the Hub "
                         f"cannot be reached to complete it ({_first_line(e)})") from None
    except errors.LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if local_only else "the Hub cannot be reached")
        raise ValueError(f"{spec} is not in the Hugging Face cache ({cache}) and {why}: "
                         "download it where the network allows (or point HF_HUB_CACHE at a "
                         "cache that has it)") from None
    except errors.RevisionNotFoundError:
        raise ValueError(f"{spec}: the Hub has no revision {revision!r} of {repo_id}") from None
    except errors.RepositoryNotFoundError:  # Also GatedRepoError.
        raise ValueError(f"{spec}: the Hub has no model {repo_id!r} that this machine may read "
                         "(a typo, or private/gated: log in with `hf auth login`)") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
