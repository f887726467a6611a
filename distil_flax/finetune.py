"""`python -m distil_flax.finetune`: the fine-tuning command (see `downstream/main.py`)."""

from distil_flax.downstream import main

if __name__ == "__main__":
    main.run_command()
