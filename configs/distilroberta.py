"""DistilRoBERTa: a 6-layer RoBERTa-shaped student distilled from roberta-base.

    hf download FacebookAI/roberta-base --include "*.json" "*.txt" "*.safetensors" \
        --local-dir runs/roberta-base
    python -m distil_flax.data.prepare --config=configs/distilroberta.py \
        --config.data.paths='openwebtext/*.parquet' --config.data.dir=data/openwebtext
    python -m distil_flax.main --config=configs/distilroberta.py --workdir=runs/distilroberta \
        --config.data.paths='openwebtext/*.parquet' --config.data.dir=data/openwebtext
    python -m distil_flax.export_hf --workdir=runs/distilroberta --output=runs/distilroberta/hf

The teacher may also be `--config.teacher.checkpoint=hf://FacebookAI/roberta-base` (the Hugging
Face cache, downloaded when missing); `data.tokenizer` must then name the snapshot's vocab.json.
The export is a `RobertaForMaskedLM` with roberta-base's byte-level BPE tokenizer, as
`distilroberta-base` is.

Where each number comes from. The reference distiller is Hugging Face's
`examples/research_projects/distillation` (Sanh et al., 2019, arXiv:1910.01108), which trained
the released `distilroberta-base`; its README publishes no DistilRoBERTa command line, so the
recipe is its `train.py` defaults plus the loss weights of the README's training command:
  * student: `training_configs/distilroberta-base.json`, exactly: 6 layers × 768, 12 heads,
    feed-forward 3072, GELU, type_vocab_size 1, max_position_embeddings 514 (our 512 positions +
    `position_offset` 2), layer_norm_eps 1e-5, vocab 50 265 (taken from the tokenizer here);
  * init: teacher layers [0, 2, 4, 7, 9, 11] with embeddings and the MLM head, as the reference's
    `scripts/extract.py --model_type roberta` (which copies lm_head.dense / layer_norm only with
    `--vocab_transform`; we always copy them, as for DistilBERT);
  * loss: α_ce 5, α_mlm 2, α_cos 1 (the README's training command), temperature 2, L_ce on every
    real token (train.py defaults: `--temperature 2`, no `--restrict_ce_to_mask`);
  * masking: 15 % of tokens, 80 % <mask> / 10 % random / 10 % kept, mlm_smoothing 0.7 (train.py
    defaults `--mlm_mask_prop 0.15 --word_mask 0.8 --word_rand 0.1 --word_keep 0.1
    --mlm_smoothing 0.7`);
  * batch: 5 sequences per GPU × gradient accumulation 50 (train.py defaults) × 8 GPUs (the
    paper's 8 × V100) = 2 000 sequences of up to 512 tokens per update. Here: 2 000 rows per
    update in micro-batches of 40 (5 per device on 8 devices). The DistilBERT paper speaks of
    "up to 4K examples per batch"; `--config.train.batch_size=4000` gives that;
  * optimiser: AdamW, lr 5e-4, 5 % linear warmup then linear decay, weight decay 0, ε 1e-6,
    β = (0.9, 0.98), gradient clipping 5.0, 3 epochs (train.py defaults `--learning_rate 5e-4
    --warmup_prop 0.05 --weight_decay 0.0 --adam_epsilon 1e-6 --max_grad_norm 5.0 --n_epoch 3`;
    the betas are its distiller.py's) — all `base_config`'s values already;
  * data: OpenWebTextCorpus (the README: "pretrained with the supervision of roberta-base solely
    on OpenWebTextCorpus"), e.g. the Parquet files of the Hub dataset `Skylion007/openwebtext`.

Not reproduced: the reference freezes a RoBERTa student's position embeddings
(`--freeze_pos_embs`, README command); here they train with the rest.

`:tiny` is a seconds-long version for tests: a 1-layer RoBERTa-shaped student (32 wide) of a
2-layer teacher; the test supplies the teacher folder and its vocabulary.
"""

from distil_flax.config import base_config, shrink_for_tests
from distil_flax.model import model_config


def get_config(preset: str = ""):
    c = base_config()
    c.model = model_config("distilroberta")  # training_configs/distilroberta-base.json.
    c.teacher.checkpoint = "runs/roberta-base"  # A local copy of FacebookAI/roberta-base.
    c.init.layer_map = (0, 2, 4, 7, 9, 11)  # scripts/extract.py --model_type roberta.
    c.loss.alpha_ce = 5.0
    c.loss.alpha_mlm = 2.0
    c.loss.alpha_cos = 1.0
    c.loss.temperature = 2.0
    c.masking.smoothing = 0.7
    c.data.tokenizer = "runs/roberta-base/vocab.json"  # The teacher's byte-level BPE (cased).
    c.data.source = "parquet"
    c.data.paths = ""  # OpenWebText, e.g. --config.data.paths='openwebtext/*.parquet'.
    c.data.text_field = "text"
    c.data.seq_len = 512
    c.train.batch_size = 2000  # 5 per GPU × 8 GPUs × 50 accumulation steps.
    c.train.micro_batch_size = 40  # 5 per device on 8 devices.
    c.train.num_epochs = 3.0
    c.train.learning_rate = 5e-4
    c.train.warmup_fraction = 0.05
    c.train.weight_decay = 0.0
    c.train.clip_norm = 5.0
    c.train.eps = 1e-6
    c.train.b1, c.train.b2 = 0.9, 0.98
    if preset == "tiny":
        shrink_for_tests(c, "tiny_roberta_student")
        c.data.source = "bundled"
        c.data.paths = ""
        c.init.layer_map = (1,)  # The last of the tiny teacher's 2 layers.
        c.train.batch_size = 16
        c.train.micro_batch_size = 8  # Exercises gradient accumulation.
    elif preset:
        raise ValueError(f"unknown preset {preset!r}; known: tiny")
    return c
