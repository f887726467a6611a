"""Fine-tuning on downstream tasks (GLUE, SQuAD, IMDb) and task-specific distillation.

  main      the command (`python -m distil_flax.finetune`)
  train     the trainer on the one run loop: build, state, evaluation, results
  step      the jitted fine-tuning and prediction steps, and the task losses
  init      where fine-tuning starts from (a workdir or an HF folder), and reading results back
  heads     the task model: the encoder with a classification / QA / token head
  config    the base config and its validation
  tasks/    readers, features, official metrics and prediction files of each task
"""
