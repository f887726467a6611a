"""Fine-tunes a pretrained or distilled encoder on one GLUE task (Wang et al., 2019).

    python -m distil_flax.finetune --config=configs/glue.py:task=mrpc --workdir=runs/glue/mrpc \
        --config.init.checkpoint=runs/distil6 --config.data.dir=glue_data/MRPC

Tasks: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli. `data.dir` is the task's folder from
GLUE's `download_glue_data.py` (train.tsv, dev.tsv; MNLI dev_matched.tsv and dev_mismatched.tsv),
or `--config.data.source=tfds` reads prepared `glue/<task>`. BERT's recipe, as the DistilBERT
paper fine-tuned for its Table 1 (GLUE dev): batch 32, AdamW lr 5e-5 with 10 % warmup and linear
decay, 3 epochs, rows of at most 128 tokens, evaluation after every epoch. Each task reports its
official metrics (CoLA Matthews corr., MRPC/QQP F1 and accuracy, STS-B Pearson/Spearman, MNLI
matched/mismatched accuracy, others accuracy) and their mean as its score; `tasks.metrics.
glue_score` averages the nine scores into the paper's macro-score.

Task-specific distillation: `--config.distill.teacher=runs/glue/mrpc_bert` (a BERT fine-tuned
with this config) trains with α·T²·KL(teacher ‖ student) + (1 − α)·CE.
`:task=mrpc,preset=tiny` is a seconds-long version for tests.
"""

from distil_flax.downstream import config as finetune_config


def get_config(arg: str = "task=sst2"):
    task, preset = finetune_config.parse_arg(arg, default_task="sst2")
    c = finetune_config.base_config()
    c.task.name = task
    if preset == "tiny":
        finetune_config.shrink_for_tests(c)
    return c
