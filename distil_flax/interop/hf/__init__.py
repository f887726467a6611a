"""Hugging Face interop: BERT-family checkpoints in, `transformers`-loadable folders out.

The one place where Hugging Face names and layouts meet ours, in these modules:

  names   the tables both directions share: each architecture family (BERT, DISTILBERT,
          ROBERTA, XLM_ROBERTA) as an explicit name map (our parameter path ↔ HF state-dict
          key), the transposed kernels, the task classes and their head modules, and the
          expected shape of every parameter;
  load    HF folders in: `load_hf_checkpoint` (BertModel, BertForMaskedLM, BertForPreTraining,
          DistilBertModel, DistilBertForMaskedLM, RobertaModel, RobertaForMaskedLM and XLM-R's
          two; safetensors, sharded, or a legacy .bin through `torch.load(weights_only=True)`),
          `load_hf_task_checkpoint` (fine-tuned *For<Task>);
  export  folders out: `export_hf` (*ForMaskedLM or the bare *Model) and `export_task_hf`
          (fine-tuned `heads.TaskModel`s), with config.json, the tokenizer files and a card;
  hub     Hub model ids as inputs: `resolve_checkpoint("hf://ORG/NAME[@REVISION]")` is the
          model's snapshot folder in the Hugging Face cache (downloaded when missing and
          reachable); a path is returned unchanged;
  card    the model card (README.md) of an export, through huggingface_hub's `ModelCard`:
          `run_card` (recipe, metrics, commands from a workdir) or `plain_card`; `reproduce`
          rebuilds a run's training command from its config.json; `model_index` states the
          run's results and those of results files (GLUE suite, embedding evaluation) in the
          card's metadata as the Hub reads them.

Every conversion asserts the key set and each shape against the model the config describes, so a
checkpoint either converts completely or fails with a ValueError naming the offending keys.
Callers use `from distil_flax import hf; hf.load_hf_checkpoint(...)`: the names below.
"""

from distil_flax.interop.hf.card import PIPELINE_TAGS, loss_terms, plain_card, run_card
from distil_flax.interop.hf.export import (
    export_hf,
    export_task_hf,
    hf_config,
    hf_state_dict,
    hf_task_config,
    hf_task_state_dict,
)
from distil_flax.interop.hf.hub import HUB_PREFIX, hub_model_id, is_hub_id, resolve_checkpoint
from distil_flax.interop.hf.load import (
    has_mlm_head,
    is_hf_checkpoint,
    load_hf_checkpoint,
    load_hf_task_checkpoint,
)
from distil_flax.interop.hf.names import (
    SAFETENSORS,
    SAFETENSORS_INDEX,
    TASK_CLASSES,
    TASK_HEADS,
    TORCH_BIN,
    export_architecture,
)

__all__ = [
    "HUB_PREFIX",
    "PIPELINE_TAGS",
    "SAFETENSORS",
    "SAFETENSORS_INDEX",
    "TASK_CLASSES",
    "TASK_HEADS",
    "TORCH_BIN",
    "export_architecture",
    "export_hf",
    "export_task_hf",
    "has_mlm_head",
    "hf_config",
    "hf_state_dict",
    "hf_task_config",
    "hf_task_state_dict",
    "hub_model_id",
    "is_hub_id",
    "is_hf_checkpoint",
    "load_hf_checkpoint",
    "load_hf_task_checkpoint",
    "loss_terms",
    "plain_card",
    "resolve_checkpoint",
    "run_card",
]
