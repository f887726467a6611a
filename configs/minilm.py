"""MiniLM v2: a 6 × 384 student distilled from BERT-base by self-attention relations alone.

Wang et al., "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing Pretrained
Transformers" (Findings of ACL 2021, arXiv:2012.15828).

    python -m distil_flax.data.prepare --config=configs/minilm.py \
        --config.data.tokenizer=bert-base-uncased/vocab.txt --config.data.dir=data/wiki_en
    python -m distil_flax.main --config=configs/minilm.py --workdir=runs/minilm \
        --config.teacher.checkpoint=bert-base-uncased --config.data.tokenizer=... \
        --config.data.dir=data/wiki_en

The recipe: the only loss is the KL between the teacher's and the student's Q–Q, K–K and V–V
scaled dot-product relations (`loss.relations`), each split into relation heads, so the student's
12 heads of 32 need not match the teacher's 12 of 64. One layer of each: the student's last and,
for a base-size teacher, the teacher's last (the paper takes an upper-middle layer of large
teachers: set `loss.relations.teacher_layer`). The student starts from random weights; the text is
not masked (no MLM term reads it). Settings we could not take from the paper's own text here and
took from public reimplementations of it instead: 48 relation heads, batch 1024 sequences of 512
tokens, Adam (β₂ 0.999) with peak learning rate 6e-4, 4 % warmup and linear decay, weight decay
0.01, 400K steps — check them against the paper before quoting this config as its recipe. Data:
English Wikipedia from TFDS (the paper adds BookCorpus), as `configs/distil6.py`.

`:pruned` starts the student as the teacher pruned instead (`init.prune`): the six layers
DistilBERT takes, and in each the 6 heads of 64, the 1536 feed-forward neurons and the 384 hidden
channels with the largest activations, so it keeps what the teacher computes rather than learning
it from nothing. The heads keep the teacher's size, so there are 6 of them (relations split into
their own relation heads either way).

`:tiny` runs in seconds on a CPU against the tests' tiny teacher (2 × 32) with a narrower 2 × 16
student; `:pruned,tiny` is that student pruned from the tiny teacher (one head of 16).
"""

from distil_flax.config import base_config, shrink_for_tests
from distil_flax.model import model_config


def get_config(preset: str = ""):
    c = base_config()
    c.model = model_config("distil6")
    c.model.hidden_size = 384
    c.model.num_heads = 12
    c.model.intermediate_size = 1536
    # Released MiniLM checkpoints are BERT-shaped: token types and a pooler (fine-tuning uses
    # them); both start random, as everything else.
    c.model.type_vocab_size = 2
    c.model.use_pooler = True
    c.model.head_style = "bert"
    c.init.from_teacher = False  # The paper's start: random (`:pruned` prunes the teacher).
    c.loss.alpha_ce = c.loss.alpha_mlm = c.loss.alpha_cos = 0.0
    c.loss.relations.weight = 1.0
    c.loss.relations.pairs = "qq,kk,vv"
    c.loss.relations.heads = 48
    c.loss.relations.teacher_layer = -1
    c.loss.relations.student_layer = -1
    c.masking.mask_prob = 0.0  # Teacher and student read the text itself.
    c.masking.smoothing = 0.0
    c.data.source = "tfds"
    c.data.paths = "wikipedia/20230601.en"
    c.train.batch_size = 1024
    c.train.num_steps = 400_000
    c.train.learning_rate = 6e-4
    c.train.warmup_fraction = 0.04
    c.train.weight_decay = 0.01
    c.train.b2 = 0.999
    presets = [p for p in preset.split(",") if p]
    unknown = set(presets) - {"pruned", "tiny"}
    if unknown:
        raise ValueError(f"unknown preset {sorted(unknown)}; known: pruned, tiny, pruned,tiny")
    if "pruned" in presets:
        c.model.num_heads = 6  # The teacher's heads of 64.
        c.init.from_teacher = True  # Narrower than the teacher: pruned from it.
    if "tiny" in presets:
        _tiny(c)
        if "pruned" in presets:
            c.model.num_heads = 1  # The tiny teacher's heads of 16.
            c.init.layer_map = (0, 1)
    return c


def _tiny(c):
    shrink_for_tests(c, "tiny")
    c.model.hidden_size = 16  # Half the tiny teacher's width: relations need no projection.
    c.model.intermediate_size = 32
    c.loss.relations.heads = 4  # 8 dims per relation head in the teacher, 4 in the student.
    c.data.source = "bundled"
    c.data.paths = ""
    c.data.dir = ""
    c.train.batch_size = 8
    c.train.micro_batch_size = 0
    c.train.learning_rate = 1e-3
    c.train.warmup_fraction = 0.05
