"""TinyBERT general distillation: a 4 × 312 student from BERT-base through its layers.

Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding" (Findings of EMNLP
2020, arXiv:1909.10351), the general (task-agnostic) stage.

    python -m distil_flax.data.prepare --config=configs/tinybert.py \
        --config.data.tokenizer=bert-base-uncased/vocab.txt --config.data.dir=data/wiki_en
    python -m distil_flax.main --config=configs/tinybert.py --workdir=runs/tinybert \
        --config.teacher.checkpoint=bert-base-uncased --config.data.tokenizer=... \
        --config.data.dir=data/wiki_en

The recipe: MSE between hidden states (`loss.hidden_states`, the embeddings' outputs included)
through a learned projection W_h from the student's 312 to the teacher's 768 dimensions, plus MSE
between the attention scores of the 12 heads (`loss.attention_scores`), both on TinyBERT's
uniform map (student layer i reads teacher layer 3(i + 1) − 1), each weighted 1; no prediction-
layer term in this stage. The student (312 hidden, 12 heads, 1200 intermediate) starts random.
The paper runs 3 epochs over English Wikipedia with sequences of 128 tokens and otherwise BERT's
pretraining settings (batch 256, Adam with learning rate 1e-4, 1 % warmup, weight decay 0.01).

`:pruned` starts a 4 × 384 student (6 heads of 64, the teacher's size; 1536 neurons) as the
teacher pruned (`init.prune`) from TinyBERT's own layers (2, 5, 8, 11): each student head then
learns the attention scores of the teacher head it was cut from.

`:tiny` runs in seconds on a CPU against the tests' tiny teacher (2 × 32) with a 1 × 16 student;
`:pruned,tiny` is that student pruned from the tiny teacher (one head of 16).
"""

from distil_flax.config import base_config, shrink_for_tests
from distil_flax.model import model_config


def get_config(preset: str = ""):
    c = base_config()
    c.model = model_config("base")
    c.model.num_layers = 4
    c.model.hidden_size = 312
    c.model.num_heads = 12  # Attention scores are compared head by head.
    c.model.intermediate_size = 1200
    c.init.from_teacher = False  # The paper's start: random (`:pruned` prunes the teacher).
    c.loss.alpha_ce = c.loss.alpha_mlm = c.loss.alpha_cos = 0.0
    c.loss.hidden_states.weight = 1.0
    c.loss.hidden_states.embeddings = True
    c.loss.attention_scores.weight = 1.0
    c.masking.smoothing = 0.0  # BERT's pretraining data: uniform masking.
    c.data.source = "tfds"
    c.data.paths = "wikipedia/20230601.en"
    c.data.seq_len = 128
    c.train.batch_size = 256
    c.train.micro_batch_size = 0
    c.train.num_steps = 0
    c.train.num_epochs = 3.0
    c.train.learning_rate = 1e-4
    c.train.warmup_fraction = 0.01
    c.train.weight_decay = 0.01
    c.train.b2 = 0.999
    presets = [p for p in preset.split(",") if p]
    unknown = set(presets) - {"pruned", "tiny"}
    if unknown:
        raise ValueError(f"unknown preset {sorted(unknown)}; known: pruned, tiny, pruned,tiny")
    if "pruned" in presets:
        c.model.hidden_size = 384
        c.model.num_heads = 6  # The teacher's heads of 64.
        c.model.intermediate_size = 1536
        c.init.from_teacher = True  # Narrower than the teacher: pruned from it.
        c.init.layer_map = (2, 5, 8, 11)  # TinyBERT's uniform map, which its terms compare.
    if "tiny" in presets:
        shrink_for_tests(c, "tiny")
        c.model.num_layers = 1
        c.model.hidden_size = 16  # Narrower than the tiny teacher's 32: trains a projection.
        c.model.intermediate_size = 32
        c.data.source = "bundled"
        c.data.paths = ""
        c.data.dir = ""
        c.train.batch_size = 8
        c.train.learning_rate = 1e-3
        c.train.warmup_fraction = 0.05
        if "pruned" in presets:
            c.model.num_heads = 1  # The tiny teacher's heads of 16.
            c.init.layer_map = (1,)  # The uniform map's one layer.
    return c
