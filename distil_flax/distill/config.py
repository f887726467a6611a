"""The base run configuration, its validation, and loading config files outside the CLI.

Config files in `configs/` call `base_config()` and change fields. Every field is commented here,
but those of the feature terms' sections, commented where each term is declared (`losses.TERMS`).
"""

import os

import ml_collections
from etils import epath

from distil_flax.data import SOURCES, teacher_targets
from distil_flax.data import tokenizer as tokenizer_lib
from distil_flax.interop import hf
from distil_flax.losses import TERMS
from distil_flax.model import model_config
from distil_flax.training import fields, partitioning, trackers

RELEASED_LAYER_MAP = (0, 2, 4, 7, 9, 11)  # The layers the released DistilBERT took from BERT-base.


def base_config() -> ml_collections.ConfigDict:
    """DistilBERT's recipe with a 6-layer student; variants change fields."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds parameter init, masking, dropout and data order.

    # The model this run trains: the student, or the teacher when pretraining one.
    c.model = model_config("distil6")

    c.teacher = ml_collections.ConfigDict()
    # The teacher: a distil_flax workdir, a Hugging Face model folder, or hf://ORG/NAME[@REVISION]
    # (from the Hugging Face cache, or downloaded). Never re-saved.
    c.teacher.checkpoint = ""
    c.teacher.param_dtype = "bfloat16"  # The teacher only runs forward: halve its memory and reads.
    # Cached targets (`python -m distil_flax.cache_teacher`): comma-separated cache directories.
    # The sentence-embedding terms read a cache's pooled embeddings, L_ce a logits cache's top k;
    # teacher.checkpoint runs live only for the terms the caches do not serve (none: no teacher
    # runs), and initialises the student (init.from_teacher; "" for the first cache's teacher,
    # refused if its parameters are not that cache's). Several caches: several teachers.
    c.teacher.cache = ""
    # One weight per cache, comma-separated ("": all 1). Several teachers' embeddings are each
    # L2-normalised, scaled by the square root of their weight and concatenated (Jasper).
    c.teacher.weights = ""

    c.init = ml_collections.ConfigDict()
    # Order on start: a checkpoint in the workdir wins; else teacher layers (if from_teacher and a
    # teacher is given); else random init.
    c.init.from_teacher = True
    # Teacher layer for each student layer; a tuple, so that `--config.init.layer_map=(0,3,5)`
    # can set it (config_flags cannot override lists).
    c.init.layer_map = RELEASED_LAYER_MAP
    # A student narrower than its teacher (model.hidden_size, num_heads or intermediate_size) is
    # pruned from it: it keeps the heads (of the teacher's size), feed-forward neurons and hidden
    # channels with the largest activations on the first training batches (`model.importance`),
    # and its record, pruning.json, goes to the workdir and the model card.
    c.init.prune = ml_collections.ConfigDict()
    c.init.prune.calibration_batches = 8  # Training batches measured, one forward pass each.
    # map: student layer i is teacher layer init.layer_map[i]. importance: the model.num_layers
    # teacher layers that change their input most (Block Importance), in order; this prunes a
    # student of the teacher's width too.
    c.init.prune.layers = "map"

    c.loss = ml_collections.ConfigDict()
    c.loss.temperature = 2.0  # Softmax temperature of L_ce; the term is scaled by T².
    c.loss.alpha_ce = 5.0  # Weight of the soft-target loss (teacher → student distributions).
    c.loss.alpha_mlm = 2.0  # Weight of the masked-LM loss on the true tokens.
    c.loss.alpha_cos = 1.0  # Weight of 1 − cos between final hidden states.
    # A pruned student compares its hidden states (L_cos, loss.hidden_states, loss.embeddings'
    # MSE and cosine) with the teacher's channels it kept, instead of through learned
    # projections onto the teacher's width.
    c.loss.kept_channels = False
    # L_ce on masked positions only (cheaper; not the released recipe).
    c.loss.restrict_ce_to_mask = False
    # Positions per chunk of the fused MLM heads + loss (never materialises all logits at once);
    # 0: plain logits.
    c.loss.head_chunk = 128
    # Query rows per chunk of the attention-score and relation terms (a chunk holds [batch, heads,
    # relation_chunk, length] scores); 0: all rows at once.
    c.loss.relation_chunk = 128
    # The feature terms (TinyBERT, MiniLM, sentence embeddings: `losses.TERMS`), one section
    # each, its fields declared and commented in the term's module; weight 0: not computed.
    # Students may be narrower than their teacher for every one of them.
    for term in TERMS:
        c.loss[term.name] = ml_collections.ConfigDict()
        for field in term.fields:
            c.loss[term.name][field.name] = field.default

    c.masking = ml_collections.ConfigDict()
    c.masking.mask_prob = 0.15  # Fraction of real, non-special tokens predicted per row; 0: none.
    c.masking.replace_with_mask = 0.8  # Of those: set to [MASK] ...
    c.masking.replace_with_random = 0.1  # ... to a random token; the rest are kept.
    # Pick tokens ∝ count^-smoothing (DistilBERT's mlm_smoothing); 0: uniform.
    c.masking.smoothing = 0.7

    # Data: `python -m distil_flax.data.prepare --config=...` turns the source into token-id
    # shards in data.dir once; training reads the shards (preparing them first when missing).
    c.data = ml_collections.ConfigDict()
    c.data.source = "bundled"  # bundled (World English Bible) | text | jsonl | parquet | tfds.
    c.data.paths = ""  # Comma-separated files or globs; for tfds the dataset name or directory.
    c.data.text_field = "text"  # Field (jsonl, tfds) or column (parquet) holding a document.
    c.data.tfds_split = "train"  # TFDS split to read.
    c.data.tfds_data_dir = ""  # TFDS data directory; "" for TFDS's default.
    c.data.tokenizer = ""  # vocab.txt / tokenizer.json (WordPiece) or .model (SentencePiece).
    c.data.lowercase = True  # For vocab.txt tokenizers: uncased BERT normalisation.
    c.data.dir = ""  # Prepared shards; "" for cache_dir/<hash of source, tokenizer, options>.
    c.data.cache_dir = "~/.cache/distil_flax/prepared"  # Where data.dir="" preparations go.
    c.data.max_len = 2048  # Longest prepared piece; documents are cut at sentence ends.
    c.data.min_len = 0  # > 0: each piece's most is drawn in [min_len, max_len] (a mix of lengths).
    c.data.min_tokens = 10  # Drop documents with fewer tokens (counted in the manifest).
    c.data.max_unk_fraction = 0.5  # Drop documents with a larger fraction of [UNK] tokens.
    c.data.max_document_bytes = 16 << 20  # Drop (and count) larger records: corrupt input.
    c.data.eval_every = 50  # Hold out ~1 in n documents (by a hash of the text); 0: none.
    c.data.unit_bytes = 64 << 20  # Input bytes per preparation unit (= per output shard).
    c.data.workers = 0  # Preparation processes; 0: one per core.
    c.data.seq_len = 512  # Packed row length (the loader cuts longer pieces at token ends).
    c.data.window = 4096  # Pieces packed together (best-fit): larger pads less.
    c.data.threads = 2  # Threads reading and packing batches ahead of the training loop.
    c.data.prefetch = 4  # Batches made ahead.

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 4096  # Global sequences per optimizer update (the paper's 4K).
    c.train.micro_batch_size = 64  # Global sequences per forward/backward; 0: the whole batch.
    c.train.num_steps = 0  # Optimizer updates; 0: derive from num_epochs.
    c.train.num_epochs = 3.0  # Passes over the training rows when num_steps is 0.
    c.train.learning_rate = 5e-4
    c.train.warmup_fraction = 0.05  # Linear warmup over this fraction of steps, then linear decay.
    c.train.weight_decay = 0.0
    c.train.clip_norm = 5.0  # Global gradient-norm clipping; 0 disables.
    c.train.b1 = 0.9
    c.train.b2 = 0.98
    c.train.eps = 1e-6
    c.train.log_every = 50  # Steps between metric writes (the only host syncs of the loop).
    c.train.eval_every = 1000  # Steps between held-out evaluations; 0: only at the end.
    c.train.eval_batches = 20  # Batches per evaluation (0: the whole held-out set).
    c.train.checkpoint_every = 1000  # Steps between checkpoints (async).
    c.train.keep_checkpoints = 3  # Most recent checkpoints kept.
    c.train.async_checkpoints = True
    # On restart, a latest checkpoint that fails its checksums or cannot be read: False falls
    # back to the newest intact one (moving the bad ones to corrupt_checkpoints/); True stops.
    c.train.strict_restore = False
    # A step whose loss or gradients are not finite is always skipped (no update) and counted;
    # the run stops after this many such steps in a row (checked when metrics are fetched,
    # every log_every steps). 0: never stop.
    c.train.max_consecutive_nonfinite = 20
    c.train.peak_tflops = 0.0  # Device bf16 peak for MFU; 0: look up the device kind.
    trackers.add_fields(c.train)  # writers (TensorBoard, JSONL, MLflow, W&B) and their fields.

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # Data-parallel size; -1: all devices not used by other axes.
    c.mesh.fsdp = 1  # Parameter/optimizer sharding (ZeRO-3 style) size.
    c.mesh.tensor = 1  # Tensor-parallel size (heads, MLP and vocab split).
    # Logical axis → mesh axes, as (name, axes) pairs; a tuple for the same reason as layer_map.
    c.mesh.rules = partitioning.DEFAULT_RULES

    c.distributed = False  # Call jax.distributed.initialize() (multi-host; auto-detects TPU/SLURM).
    return c


# What every numeric (and choice) field may hold; `validate` checks them first.
RULES = {
    "seed": fields.at_least(0),
    **fields.MODEL,
    "init.prune.calibration_batches": fields.at_least(1),
    "init.prune.layers": fields.one_of("map", "importance"),
    "loss.temperature": fields.positive(),
    "loss.alpha_ce": fields.at_least(0),
    "loss.alpha_mlm": fields.at_least(0),
    "loss.alpha_cos": fields.at_least(0),
    "loss.head_chunk": fields.at_least(0),
    "loss.relation_chunk": fields.at_least(0),
    **{f"loss.{term.name}.{name}": fields.at_least(0) for term in TERMS for name in term.weights},
    **{f"loss.{term.name}.{field.name}": field.rule
       for term in TERMS for field in term.fields if field.rule},
    "masking.mask_prob": fields.fraction(high_open=True),
    "masking.replace_with_mask": fields.fraction(),
    "masking.replace_with_random": fields.fraction(),
    "masking.smoothing": fields.at_least(0),
    "data.source": fields.one_of(*SOURCES),
    **fields.DATA,
    **fields.OPTIMIZER,
    "train.micro_batch_size": fields.at_least(0),
    "train.eval_every": fields.at_least(0),
    "train.eval_batches": fields.at_least(0),
    "train.checkpoint_every": fields.at_least(1),
    "train.keep_checkpoints": fields.at_least(1),
    "train.peak_tflops": fields.at_least(0),
    **fields.MESH,
}


def loss_weights(c: ml_collections.ConfigDict) -> dict[str, float]:
    """Every loss term's weight, by field name."""
    loss = c.loss
    weights = {f"loss.{name}": loss[name] for name in ("alpha_ce", "alpha_mlm", "alpha_cos")}
    weights.update({f"loss.{term.name}.{name}": loss[term.name][name]
                    for term in TERMS for name in term.weights})
    return weights


def teacher_terms(c: ml_collections.ConfigDict) -> list[str]:
    """The weighted loss terms that read a teacher, by field name (all but the MLM loss)."""
    return [name for name, weight in loss_weights(c).items() if weight and name != "loss.alpha_mlm"]


def cache_directories(c: ml_collections.ConfigDict) -> list[str]:
    """teacher.cache's directories, in order ([] without a cache)."""
    return [d.strip() for d in c.teacher.cache.split(",") if d.strip()]


def cache_kinds(c: ml_collections.ConfigDict) -> list[str]:
    """The kind of each teacher.cache directory (`teacher_targets.KIND` or `.LOGITS`).

    Raises:
      ValueError: naming teacher.cache, for a directory that holds no cache manifest.
    """
    return [teacher_targets.read_manifest(d)["kind"] for d in cache_directories(c)]


def cache_weights(c: ml_collections.ConfigDict) -> list[float]:
    """teacher.weights, one per cache (all 1 when empty).

    Raises:
      ValueError: naming teacher.weights: not numbers, negative, all 0, or not one per cache.
    """
    caches = cache_directories(c)
    if not c.teacher.weights.strip():
        return [1.0] * len(caches)
    try:
        weights = [float(w) for w in c.teacher.weights.split(",")]
    except ValueError:
        raise ValueError(f"teacher.weights={c.teacher.weights!r}: expected comma-separated "
                         "numbers, one per teacher.cache directory") from None
    if len(weights) != len(caches):
        raise ValueError(f"teacher.weights has {len(weights)} entries for the {len(caches)} "
                         "directories of teacher.cache: give one weight per cache")
    if any(not w >= 0 or w == float("inf") for w in weights) or not any(weights):
        raise ValueError(f"teacher.weights={c.teacher.weights!r}: each must be finite and ≥ 0, "
                         "and one positive")
    return weights


EMBEDDING_TERMS = tuple(f"loss.embeddings.{name}" for name in (
    "mse_weight", "cosine_weight", "similarity_weight"))


def live_terms(c: ml_collections.ConfigDict, kinds: list[str]) -> list[str]:
    """The weighted teacher terms that caches of `kinds` do not serve, which the live teacher
    (teacher.checkpoint) computes: an embeddings cache serves the sentence terms, a logits cache
    L_ce at the masked positions; without a cache, every teacher term.
    """
    served = set(EMBEDDING_TERMS) if teacher_targets.KIND in kinds else set()
    if teacher_targets.LOGITS in kinds:
        served.add("loss.alpha_ce")
    return [name for name in teacher_terms(c) if name not in served]


def check_cached_terms(c: ml_collections.ConfigDict, kinds: list[str]) -> None:
    """That the caches of `kinds` and the live teacher between them serve every weighted term
    (`live_terms`).

    Raises:
      ValueError: naming the first term that needs a live teacher when teacher.checkpoint is
        empty, or a term the logits cache cannot serve as configured.
    """
    if teacher_targets.LOGITS in kinds and c.loss.alpha_ce and not c.loss.restrict_ce_to_mask:
        raise ValueError("teacher.cache holds the teacher's logits at the masked positions "
                         "only, but loss.restrict_ce_to_mask=False reads L_ce at every "
                         "token: set loss.restrict_ce_to_mask=True")
    live = live_terms(c, kinds)
    if live and not c.teacher.checkpoint:
        held = " and ".join({teacher_targets.KIND: "the teacher's pooled sentence embeddings",
                             teacher_targets.LOGITS: "its top-k logits at static masks"}[k]
                            for k in sorted(set(kinds)))
        raise ValueError(
            f"teacher.cache holds {held}, which {live[0]} does not read: it needs the teacher "
            f"itself (set teacher.checkpoint to run it live beside the cache, or set "
            f"{', '.join(live)} to 0)")
    if c.loss.kept_channels and len(cache_directories(c)) > 1:
        raise ValueError("loss.kept_channels compares with the channels a pruned student kept "
                         "of its one teacher; several teachers in teacher.cache compare through "
                         "a projection: set loss.kept_channels=False")


def validate(c: ml_collections.ConfigDict) -> "tokenizer_lib.Tokenizer":
    """Raises ValueError naming the field when a config cannot run; returns the tokenizer.

    Runs before a run touches its workdir, so it checks what can be checked without the data or
    the teacher: the tokenizer is loaded (a damaged vocabulary fails here; `train.build` takes it
    rather than loading it again) and the batch sizes are checked against the mesh on
    `jax.device_count()` devices.
    """
    fields.check(c, RULES)
    trackers.writers(c)  # An unknown writer, or a tracker that is not installed.
    loss = c.loss
    weights = loss_weights(c)
    if not any(weights.values()):
        raise ValueError(f"every loss weight is 0: set one of {', '.join(weights)}")
    needs_teacher = bool(teacher_terms(c))
    caches = cache_directories(c)
    kinds = cache_kinds(c)
    if caches:
        check_cached_terms(c, kinds)
        cache_weights(c)
    if needs_teacher and not c.teacher.checkpoint and not caches:
        raise ValueError(
            f"{', '.join(teacher_terms(c))} need a teacher but teacher.checkpoint is empty: set "
            "--config.teacher.checkpoint=WORKDIR_OF_TEACHER (or set those weights to 0)")
    for term in TERMS:  # Layers against the teacher are checked once it is loaded (loss_spec).
        term.check(loss[term.name], c)
    # A cached run loads its teacher only to initialise the student from it or for the terms
    # its caches do not serve.
    if c.teacher.checkpoint and (c.init.from_teacher or live_terms(c, kinds)):
        try:  # hf://ORG/NAME[@REV]: its snapshot in the Hugging Face cache (downloaded if needed).
            teacher = hf.resolve_checkpoint(c.teacher.checkpoint)
        except ValueError as error:
            raise ValueError(f"teacher.checkpoint: {error}") from None
        if not epath.Path(teacher).exists():  # Or gs://.
            raise ValueError(f"teacher.checkpoint={c.teacher.checkpoint!r} does not exist")
    if not c.data.tokenizer:
        raise ValueError("data.tokenizer is empty: set --config.data.tokenizer=PATH (vocab.txt, "
                         "tokenizer.json or .model)")
    if not os.path.exists(c.data.tokenizer):
        raise ValueError(
            f"data.tokenizer={c.data.tokenizer!r} does not exist; train one with `python -m "
            "distil_flax.data.train_vocab --output=...` or point data.tokenizer at a vocab")
    try:
        tokenizer = tokenizer_lib.load_tokenizer(c.data.tokenizer, c.data.lowercase)
    except FileNotFoundError:  # It exists: a directory.
        raise ValueError(f"data.tokenizer={c.data.tokenizer!r} is not a file") from None
    m = c.masking
    if m.mask_prob == 0 and loss.alpha_mlm:
        raise ValueError("masking.mask_prob is 0, which leaves loss.alpha_mlm nothing to predict")
    if m.replace_with_mask + m.replace_with_random > 1:
        raise ValueError(
            "masking.replace_with_mask + masking.replace_with_random must be in [0, 1]")
    t = c.train
    micro = t.micro_batch_size or t.batch_size
    if t.batch_size % micro:
        raise ValueError(
            f"train.batch_size ({t.batch_size}) must be a positive multiple of "
            f"train.micro_batch_size ({t.micro_batch_size})")
    if t.num_steps == 0 and t.num_epochs == 0:
        raise ValueError("set train.num_steps or train.num_epochs to a positive value")
    partitioning.check_rules(c.mesh.rules)
    # Also resolves the mesh sizes: a mesh that does not fit the devices fails here.
    partitioning.check_batch_divides(c.mesh, "train.batch_size", t.batch_size)
    if t.micro_batch_size:
        partitioning.check_batch_divides(c.mesh, "train.micro_batch_size", t.micro_batch_size)
    if loss.kept_channels and not (needs_teacher and c.init.from_teacher):
        raise ValueError("loss.kept_channels compares with the teacher's channels that a pruned "
                         "student kept: it needs init.from_teacher and a teacher")
    if (needs_teacher and c.init.from_teacher and c.init.prune.layers == "map"
            and len(c.init.layer_map) != c.model.num_layers):
        raise ValueError(
            f"init.layer_map {tuple(c.init.layer_map)} has {len(c.init.layer_map)} entries but "
            f"model.num_layers is {c.model.num_layers}: give one teacher layer per student layer")
    if c.data.seq_len > c.model.max_position_embeddings:
        raise ValueError(
            f"data.seq_len ({c.data.seq_len}) exceeds model.max_position_embeddings "
            f"({c.model.max_position_embeddings})")
    return tokenizer


def shrink_for_tests(c: ml_collections.ConfigDict, size: str) -> None:
    """The `:tiny` preset of the quickstart configs: seconds on a CPU, 32-token rows.

    Args:
      c: the config to change in place.
      size: a small entry of `model.SIZES` ("tiny" or "tiny_student").
    """
    c.model = model_config(size)
    c.model.max_position_embeddings = 32
    c.model.dtype = "float32"
    c.data.seq_len = 32
    c.data.eval_every = 20
    c.train.num_steps = 20
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.eval_batches = 2
    c.train.checkpoint_every = 10
