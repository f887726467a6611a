"""What a config file of `configs/` (or a user's own) imports: the distillation config's base and
its `:tiny` shrink. They are defined in `distil_flax.distill.config`; this module keeps the import
path config files have always used."""

from distil_flax.distill.config import base_config, shrink_for_tests

__all__ = ["base_config", "shrink_for_tests"]
