"""The base fine-tuning configuration and its validation.

`configs/glue.py`, `configs/squad.py` and `configs/imdb.py` call `base_config()` and set the task
and its usual hyper-parameters. Every field is commented here.
"""

import os

import ml_collections
from etils import epath

from distil_flax.interop import hf
from distil_flax.training import fields, partitioning, trackers


def base_config() -> ml_collections.ConfigDict:
    """Fine-tuning defaults (BERT's GLUE recipe); task configs change fields."""
    c = ml_collections.ConfigDict()
    c.seed = 42  # Seeds the head's init, dropout and the data order.

    c.task = ml_collections.ConfigDict()
    # cola | sst2 | mrpc | stsb | qqp | mnli | qnli | rte | wnli | squad | imdb.
    c.task.name = "sst2"

    c.init = ml_collections.ConfigDict()
    # The pretrained encoder: a distil_flax pretraining/distillation workdir (its config.json and
    # latest checkpoint), a Hugging Face BERT/DistilBERT folder (config.json + safetensors), or a
    # Hub model "hf://ORG/NAME[@REVISION]" (from the Hugging Face cache, or downloaded).
    c.init.checkpoint = ""

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "bfloat16"  # Compute dtype; "float32" on CPUs.
    c.model.dropout_rate = -1.0  # Encoder dropout; -1: the pretrained model's (0.1).
    # Dropout before the head; -1: transformers' default for it (DistilBERT 0.2 before a
    # classifier, 0.1 before QA outputs; BERT the encoder's dropout, none before QA outputs).
    c.model.head_dropout = -1.0
    c.model.attention_impl = "auto"  # auto | xla | cudnn | einsum.
    # Recompute layer activations in the backward pass (saves memory): none | full |
    # dots_saveable | dots_with_no_batch_dims_saveable (see `model.REMAT_POLICIES`).
    c.model.remat = "none"

    c.data = ml_collections.ConfigDict()
    c.data.source = "files"  # files (the original release's files) | tfds (prepared TFDS data).
    # The task's folder of original files: GLUE's <TASK>/ with train.tsv and dev.tsv (MNLI:
    # dev_matched.tsv, dev_mismatched.tsv); SQuAD's train-v1.1.json and dev-v1.1.json; aclImdb/.
    c.data.dir = ""
    c.data.train_file = ""  # Overrides the training file (or IMDb folder) inside data.dir.
    c.data.eval_file = ""  # Overrides the evaluation file (tasks with one evaluation split).
    c.data.tfds_data_dir = ""  # TFDS data directory; "": TFDS's default (~/tensorflow_datasets).
    # The tokenizer; "": the init checkpoint's (its run's data.tokenizer, or the HF folder's
    # vocab.txt / tokenizer.json).
    c.data.tokenizer = ""
    c.data.lowercase = True  # Only for a vocab.txt given in data.tokenizer: uncased normalisation.
    c.data.max_length = 128  # Longest row in tokens, specials included; longer inputs truncated.
    c.data.doc_stride = 128  # SQuAD: tokens between the starts of a context's windows.
    c.data.max_query_length = 64  # SQuAD: question tokens kept.
    c.data.max_answer_length = 30  # SQuAD: longest predicted answer, in tokens.
    c.data.n_best_size = 20  # SQuAD: start/end candidates per window and answers kept.
    c.data.max_train_examples = 0  # Use only the first n training examples (0: all).
    c.data.max_eval_examples = 0  # Evaluate on the first n examples of each split (0: all).

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32  # Global examples per optimizer update.
    c.train.eval_batch_size = 128  # Global rows per evaluation step.
    c.train.num_epochs = 3.0  # Passes over the training examples (when num_steps is 0).
    c.train.num_steps = 0  # Optimizer updates; 0: from num_epochs.
    c.train.learning_rate = 5e-5  # Peak learning rate of AdamW.
    c.train.warmup_fraction = 0.1  # Linear warmup over this fraction of steps, then linear decay.
    c.train.weight_decay = 0.01  # On kernels and embeddings, not on biases and LayerNorms.
    c.train.clip_norm = 1.0  # Global gradient-norm clipping; 0 disables.
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-6
    c.train.log_every = 50  # Steps between training metric writes (the loop's only syncs).
    c.train.eval_every = 0  # Steps between evaluations; 0: at the end of every epoch.
    c.train.checkpoint_every = 0  # Steps between resumable checkpoints; 0: at every evaluation.
    c.train.async_checkpoints = True
    # Restart: fall back past a corrupt latest checkpoint to the newest intact one; True: stop.
    c.train.strict_restore = False
    # Stop after this many steps in a row whose loss, gradients or update were not finite (their
    # updates are skipped; 0: skip and go on).
    c.train.max_consecutive_nonfinite = 20
    trackers.add_fields(c.train)  # writers (TensorBoard, JSONL, MLflow, W&B) and their fields.

    c.distill = ml_collections.ConfigDict()
    # Task-specific distillation ("DistilBERT (D)"): a teacher fine-tuned on the same task — a
    # workdir of this fine-tuning (its best checkpoint), a fine-tuned HF folder or "hf://ORG/NAME".
    # "": none.
    c.distill.teacher = ""
    # loss = alpha · T² · KL(teacher ‖ student) + (1 − alpha) · task loss; for SQuAD the KL is
    # the mean over the start and end distributions; for regression, MSE to the teacher's score.
    c.distill.alpha = 0.5
    c.distill.temperature = 2.0
    c.distill.teacher_param_dtype = "bfloat16"  # The teacher only runs forward.

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # Data-parallel size; -1: all devices not used by other axes.
    c.mesh.fsdp = 1  # Parameter/optimizer sharding size.
    c.mesh.tensor = 1  # Tensor-parallel size.
    c.mesh.rules = partitioning.DEFAULT_RULES  # Logical axis → mesh axes.

    c.distributed = False  # Call jax.distributed.initialize() (multi-host).
    return c


# What every numeric (and choice) field may hold; `validate` checks them first.
RULES = {
    "seed": fields.at_least(0),
    "model.dtype": fields.MODEL["model.dtype"],
    "model.attention_impl": fields.MODEL["model.attention_impl"],
    "model.dropout_rate": fields.fraction(high_open=True,
                                          special={-1: "the pretrained model's"}),
    "model.head_dropout": fields.fraction(high_open=True, special={-1: "transformers' default"}),
    "data.source": fields.one_of("files", "tfds"),
    "data.max_length": fields.at_least(8),
    "data.doc_stride": fields.at_least(1),
    "data.max_query_length": fields.at_least(1),
    "data.max_answer_length": fields.at_least(1),
    "data.n_best_size": fields.at_least(1),
    "data.max_train_examples": fields.at_least(0),
    "data.max_eval_examples": fields.at_least(0),
    **fields.OPTIMIZER,
    "train.eval_batch_size": fields.at_least(1),
    "train.eval_every": fields.at_least(0),
    "train.checkpoint_every": fields.at_least(0),
    "distill.alpha": fields.fraction(),
    "distill.temperature": fields.positive(),
    **fields.MESH,
}


def parse_arg(arg: str, default_task: str) -> tuple[str, str]:
    """(task, preset) from a task config's `:arg`: "task=mrpc", "task=mrpc,preset=tiny" or ""."""
    values = {"task": default_task, "preset": ""}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in values:
            raise ValueError(f"config argument {item!r}: expected task=NAME or preset=tiny")
        values[key] = value
    if values["preset"] not in ("", "tiny"):
        raise ValueError(f"unknown preset {values['preset']!r}; known: tiny")
    return values["task"], values["preset"]


def shrink_for_tests(c: ml_collections.ConfigDict) -> None:
    """The `preset=tiny` of the task configs: float32, short rows, small batches, one epoch."""
    c.model.dtype = "float32"
    c.data.max_length = 32  # The tiny test encoders have 32 positions.
    c.data.doc_stride = 8
    c.data.max_query_length = 12
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.train.num_epochs = 1.0
    c.train.learning_rate = 1e-2  # Tiny random-ish encoders need it to move in a few steps.
    c.train.log_every = 1
    c.distill.teacher_param_dtype = "float32"


def _resolve(field: str, spec: str) -> str:
    """A checkpoint field's folder: a Hub id becomes its cached snapshot (downloaded first when
    missing and reachable); ValueError naming the field when it cannot."""
    try:
        return hf.resolve_checkpoint(spec)
    except ValueError as error:
        raise ValueError(f"{field}: {error}") from None


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field when a fine-tuning config cannot run."""
    fields.check(c, RULES)
    trackers.writers(c)  # An unknown writer, or a tracker that is not installed.
    if not c.init.checkpoint:
        raise ValueError("init.checkpoint is empty: set --config.init.checkpoint to a distil_flax "
                         "workdir, a Hugging Face model folder or hf://ORG/NAME")
    if not epath.Path(_resolve("init.checkpoint", c.init.checkpoint)).exists():
        raise ValueError(f"init.checkpoint={c.init.checkpoint!r} does not exist")
    teacher = c.distill.teacher and _resolve("distill.teacher", c.distill.teacher)
    if teacher and not epath.Path(teacher).exists():
        raise ValueError(f"distill.teacher={c.distill.teacher!r} does not exist")
    if c.data.tokenizer and not os.path.isfile(c.data.tokenizer):
        raise ValueError(f"data.tokenizer={c.data.tokenizer!r} does not exist")
    t = c.train
    if t.num_steps == 0 and t.num_epochs == 0:
        raise ValueError("set train.num_steps or train.num_epochs to a positive value")
    partitioning.check_rules(c.mesh.rules)
    for field in ("batch_size", "eval_batch_size"):
        partitioning.check_batch_divides(c.mesh, f"train.{field}", t[field])
