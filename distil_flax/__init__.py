"""distil_flax: distil BERT-family encoders with JAX and Flax (README.md)."""

from distil_flax.training import early_signals

# Before a command imports anything slow, so that a Ctrl-C while it starts is kept.
early_signals.install()
