"""The sentence-transformers layout: an encoder export that `SentenceTransformer(DIR)` loads.

    DIR/  config.json, model.safetensors,      the bare BertModel / DistilBertModel
          tokenizer files, README.md           (`export.export_hf` with head="none")
          modules.json                         Transformer (path "") → Pooling → [Normalize]
          sentence_bert_config.json            max_seq_length; do_lower_case false (the
                                               tokenizer lowercases an uncased vocab itself)
          config_sentence_transformers.json    cosine similarity
          1_Pooling/config.json                mean or cls (`pooling_config`)

The files are the classic layout (module types `sentence_transformers.models.*`, one boolean per
pooling mode), as all-MiniLM-L6-v2 ships it: sentence-transformers 2 to 6 load it, and so does
`read_pooling`. `SentenceTransformer(DIR).encode(sentences)` then computes what
`embeddings.embed` computes with the same pooling (normalised when the Normalize module is there).

`read_sentence_config` reads a folder's pooling, Normalize module and max_seq_length (a teacher's,
so a student exports the way its teacher embeds); `export_sentence_transformers` writes the
layout; `sentence_card` turns a card (`card.run_card` / `plain_card`) into the card of such an
export. Callers import it as `st_layout`, so that the name never reads as the library's.
"""

import dataclasses
import os
from typing import Any, Mapping

import ml_collections
from absl import logging
from huggingface_hub import ModelCard

from distil_flax.interop.hf import card as card_lib
from distil_flax.interop.hf import export as export_lib
from distil_flax.model.pooling import check_pooling
from distil_flax.training import atomic
from distil_flax.training.config_files import read_json

# modules.json types of the classic layout; sentence-transformers 6 still maps them.
TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"
POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
            f"{POOLING_DIR}/config.json")
# The module classes whose output our embeddings reproduce (by class name, any package path).
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")

# sentence-transformers' Pooling modes (1_Pooling/config.json) we compute, by our name.
_ST_MODES = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}
_ST_OTHER_MODES = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
    """How a sentence-transformers folder turns token states into a sentence embedding.

    Attributes:
      pooling: "mean" or "cls"; None when the folder names no Pooling module.
      normalize: a Normalize module follows the pooling (unit-length embeddings).
      max_seq_length: sentence_bert_config.json's, None when absent.
      transformer_path: the folder of the Transformer module, relative ("" for the root).
      other_modules: module types we do not compute (Dense, ...): our embeddings are the
        pooled (and normalised) ones before them.
    """

    pooling: str | None
    normalize: bool = False
    max_seq_length: int | None = None
    transformer_path: str = ""
    other_modules: tuple[str, ...] = ()


def _pooling_dir(folder: str) -> str:
    """The Pooling module's folder: as modules.json names it, else the usual `1_Pooling`."""
    modules_file = os.path.join(folder, "modules.json")
    if os.path.isfile(modules_file):
        modules = read_json(modules_file)
        for module in modules if isinstance(modules, list) else []:
            if isinstance(module, dict) and str(module.get("type", "")).endswith(".Pooling"):
                return os.path.join(folder, module.get("path", "1_Pooling"))
    return os.path.join(folder, "1_Pooling")


def read_pooling(folder: str | os.PathLike) -> str | None:
    """The pooling of a sentence-transformers folder ("mean" or "cls"); None if it has none.

    Raises:
      ValueError: a damaged config, or a pooling we do not compute (max, mean_sqrt_len, weighted
        mean, last token, or several modes concatenated).
    """
    config_file = os.path.join(_pooling_dir(os.fspath(folder)), "config.json")
    if not os.path.isfile(config_file):
        return None
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} holds no JSON object")
    mode = config.get("pooling_mode")  # sentence-transformers ≥ 6 writes one name instead.
    if isinstance(mode, str):
        if mode not in _ST_MODES:
            raise ValueError(f"{config_file} pools with {mode!r}; distil_flax computes mean or "
                             "cls (pass --pooling=mean|cls)")
        return mode
    modes = [name for name, key in _ST_MODES.items() if config.get(key)]
    others = [key for key in _ST_OTHER_MODES if config.get(key)]
    if others or len(modes) != 1:
        on = [key for key in (*_ST_MODES.values(), *_ST_OTHER_MODES) if config.get(key)]
        raise ValueError(f"{config_file} pools with {on or 'no mode'}; distil_flax computes "
                         f"exactly one of {list(_ST_MODES.values())} (pass --pooling=mean|cls)")
    return modes[0]


def pooling_config(pooling: str, dim: int) -> dict[str, Any]:
    """sentence-transformers' `1_Pooling/config.json` for our pooling of `dim`-wide states."""
    check_pooling(pooling)
    config: dict[str, Any] = {"word_embedding_dimension": int(dim)}
    config.update({key: name == pooling for name, key in _ST_MODES.items()})
    config.update({key: False for key in _ST_OTHER_MODES})
    return config



def read_sentence_config(folder: str | os.PathLike) -> SentenceConfig | None:
    """The sentence-transformers setup of `folder`; None when it is no such folder (neither
    modules.json nor 1_Pooling/config.json).

    Raises:
      ValueError: damaged JSON, or a pooling we do not compute (`read_pooling`).
    """
    folder = os.fspath(folder)
    modules_file = os.path.join(folder, "modules.json")
    has_modules = os.path.isfile(modules_file)
    if not has_modules and not os.path.isfile(os.path.join(folder, POOLING_DIR, "config.json")):
        return None
    modules = read_json(modules_file) if has_modules else []
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{modules_file} is not a list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    transformer = next((str(m.get("path", "")) for m, k in zip(modules, kinds)
                        if k == "Transformer"), "")
    others = tuple(str(m.get("type")) for m, k in zip(modules, kinds)
                   if k not in _KNOWN_MODULES)
    max_seq_length = None
    config_file = os.path.join(folder, transformer, "sentence_bert_config.json")
    if os.path.isfile(config_file):
        value = read_json(config_file)
        if isinstance(value, dict) and isinstance(value.get("max_seq_length"), int):
            max_seq_length = value["max_seq_length"]
    return SentenceConfig(read_pooling(folder), "Normalize" in kinds, max_seq_length,
                          transformer, others)


def modules_json(normalize: bool) -> list[dict[str, Any]]:
    """modules.json: the Transformer at the folder's root, the Pooling, and maybe Normalize."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER},
               {"idx": 1, "name": "1", "path": POOLING_DIR, "type": POOLING}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": NORMALIZE})
    return modules


def sentence_card(card: ModelCard, *, name: str, pooling: str, normalize: bool,
                  max_seq_length: int) -> ModelCard:
    """`card` (of a head="none" export) as the card of a sentence-transformers export: library
    sentence-transformers, pipeline sentence-similarity, and a section on how it embeds."""
    card = ModelCard(str(card))  # A copy: the caller's card is left as it was.
    card.data.library_name = "sentence-transformers"
    card.data.pipeline_tag = "sentence-similarity"
    tags = list(card.data.tags or [])
    card.data.tags = tags + [t for t in ("sentence-transformers", "sentence-similarity",
                                         "feature-extraction") if t not in tags]
    pooled = {"mean": "the mean of the token states (padding excluded, [CLS] and [SEP] included)",
              "cls": "the [CLS] token's state"}[pooling]
    section = (
        "## Sentence embeddings\n\n"
        f"A sentence's embedding is {pooled}"
        + (", scaled to unit length" if normalize else "")
        + f"; inputs are cut at {max_seq_length} tokens. With sentence-transformers:\n\n"
        "```python\nfrom sentence_transformers import SentenceTransformer\n\n"
        f"model = SentenceTransformer(\"{name}\")  # The folder, or its Hub id.\n"
        "embeddings = model.encode([\"A sentence.\", \"Another one.\"])\n"
        "print(model.similarity(embeddings, embeddings))\n```\n\n")
    text = card.text
    at = text.find("## Usage")
    card.text = text[:at] + section + text[at:] if at >= 0 else text.rstrip() + "\n\n" + section
    return card


def export_sentence_transformers(
        params: Mapping[str, Any], model_cfg: ml_collections.ConfigDict,
        output_dir: str | os.PathLike, *, pooling: str = "mean", normalize: bool = False,
        max_seq_length: int | None = None, tokenizer_path: str | None = None,
        lowercase: bool = True, overwrite: bool = False, card: ModelCard | None = None
) -> list[str]:
    """Writes the bare encoder in the sentence-transformers layout (see the module docstring).

    Atomic as `export.export_hf`: everything is written beside `output_dir` and renamed into
    place, so a failure leaves nothing behind.

    Args:
      params, model_cfg: the encoder (as `export.export_hf`; an MLM head is not exported).
      output_dir: the folder to create.
      pooling: "mean" or "cls".
      normalize: add a Normalize module (unit-length embeddings), as the teacher had.
      max_seq_length: tokens per sentence, [CLS] and [SEP] included; None: the model's
        max_position_embeddings.
      tokenizer_path, lowercase, overwrite: as `export.export_hf`.
      card: the model card of the head="none" export (`card.run_card`); None: a plain one. Either
        gets `sentence_card`'s section.

    Returns:
      Paths of the files written, relative to `output_dir`, sorted.

    Raises:
      ValueError: a bad pooling or max_seq_length, or params that do not match `model_cfg`.
      FileExistsError: `output_dir` exists, is not empty, and `overwrite` is False.
    """
    pooling_config(pooling, 1)  # Checks the pooling's name.
    positions = int(model_cfg.max_position_embeddings)
    max_seq_length = positions if max_seq_length is None else int(max_seq_length)
    if not 3 <= max_seq_length <= positions:
        raise ValueError(f"max_seq_length must be between 3 ([CLS] token [SEP]) and the model's "
                         f"max_position_embeddings ({positions}), got {max_seq_length}")
    output_dir = export_lib.check_output_dir(output_dir, overwrite)
    name = os.path.basename(output_dir)
    if card is None:
        card = card_lib.plain_card(export_lib.hf_config(model_cfg, head="none"), "none",
                                   name=name, has_tokenizer=bool(tokenizer_path))
    card = sentence_card(card, name=name, pooling=pooling, normalize=normalize,
                         max_seq_length=max_seq_length)
    written = export_lib.export_hf(
        params, model_cfg, output_dir, tokenizer_path=tokenizer_path, lowercase=lowercase,
        head="none", overwrite=overwrite, card=card,
        add=lambda folder: _write_layout(folder, pooling=pooling, normalize=normalize,
                                         max_seq_length=max_seq_length,
                                         dim=int(model_cfg.hidden_size)))
    logging.info("Exported a sentence-transformers model (%s pooling%s, max_seq_length %d) to "
                 "%s.", pooling, ", normalised" if normalize else "", max_seq_length, output_dir)
    return written


def _write_layout(folder: str, *, pooling: str, normalize: bool, max_seq_length: int,
                  dim: int) -> None:
    write = atomic.write_json
    write(os.path.join(folder, "modules.json"), modules_json(normalize))
    # do_lower_case here lowercases the text before the tokenizer sees it; the tokenizer already
    # lowercases for an uncased vocabulary (tokenizer_config.json), and a cased one must not be.
    write(os.path.join(folder, "sentence_bert_config.json"),
          {"max_seq_length": max_seq_length, "do_lower_case": False})
    write(os.path.join(folder, "config_sentence_transformers.json"),
          {"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None})
    os.mkdir(os.path.join(folder, POOLING_DIR))
    write(os.path.join(folder, POOLING_DIR, "config.json"),
          pooling_config(pooling, dim))
