"""The allowed values of config fields: declared once per field, checked before a run starts.

A `Rule` says what a numeric field may hold (finite always; a sign or bounds; whether it is a
count) and which values outside that range mean something else, each with its meaning — the
field's comment in its config says the same. A choice field lists its choices. Each config's
`validate` calls `check` with its table (`distill.config.RULES`, `downstream.config.RULES`)
before anything touches the workdir, so a NaN temperature or a negative warmup is refused in
one line naming the field instead of training on it.

The tables below are those of the sections both trainers share.
"""

import dataclasses
import math
from typing import Any, Mapping

from distil_flax.model import HEAD_STYLES, attention


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field may hold.

    Attributes:
      low, high: bounds (None: unbounded); `low_open`/`high_open` exclude them.
      special: values allowed outside the bounds, with what each means (`{0: "off"}`).
      choices: for a string field, its allowed values (the numeric attributes are then unused).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: Mapping[Any, str] = dataclasses.field(default_factory=dict)
    choices: tuple[str, ...] = ()

    def allows(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.special:
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.high_open
                                                          and value == self.high)

    def describe(self) -> str:
        """The allowed values in words: "a number in [0, 1)", "≥ 1 (or 0: derive it)"."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is not None and self.high is not None:
            text = (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"finite and {'>' if self.low_open else '≥'} {self.low:g}"
        elif self.high is not None:
            text = f"finite and {'<' if self.high_open else '≤'} {self.high:g}"
        else:
            text = "a finite number"
        if self.special:
            text += " (or " + "; ".join(f"{v:g}: {m}" for v, m in self.special.items()) + ")"
        return text


def at_least(low: float, special: Mapping[Any, str] | None = None) -> Rule:
    """≥ `low`, or one of the `special` values: `at_least(1, {0: "off"})`."""
    return Rule(low=low, special=special or {})


def positive() -> Rule:
    return Rule(low=0, low_open=True)


def fraction(*, high_open: bool = False, special: Mapping[Any, str] | None = None) -> Rule:
    """In [0, 1] (or [0, 1) with `high_open`)."""
    return Rule(low=0, high=1, high_open=high_open, special=special or {})


def any_number() -> Rule:
    return Rule()


def one_of(*choices: str) -> Rule:
    return Rule(choices=choices)


def check(config: Any, rules: Mapping[str, Rule]) -> None:
    """Raises ValueError naming the first field of `rules` whose value `config` breaks.

    Fields a config lacks are skipped (a section another trainer has, or a config.json saved
    before the field existed).
    """
    for path, rule in rules.items():
        found, value = _lookup(config, path)
        if found and not rule.allows(value):
            raise ValueError(f"{path} must be {rule.describe()}, got {value!r}")


def _lookup(config: Any, path: str) -> tuple[bool, Any]:
    value = config
    for key in path.split("."):
        if key not in value:
            return False, None
        value = value[key]
    return True, value


# The optimizer and the loop's clock, the same fields in both trainers.
OPTIMIZER = {
    "train.batch_size": at_least(1),
    "train.num_steps": at_least(1, {0: "derive it from train.num_epochs"}),
    "train.num_epochs": at_least(0),
    "train.learning_rate": positive(),
    "train.warmup_fraction": fraction(),
    "train.weight_decay": at_least(0),
    "train.clip_norm": at_least(0),
    "train.b1": fraction(high_open=True),
    "train.b2": fraction(high_open=True),
    "train.eps": positive(),
    "train.log_every": at_least(1),
    "train.max_consecutive_nonfinite": at_least(0),
}

# The data section of a distillation config, which `data.prepare` reads too.
DATA = {
    "data.max_len": at_least(1),
    "data.min_len": at_least(0),
    "data.min_tokens": at_least(0),
    "data.max_unk_fraction": fraction(),
    "data.max_document_bytes": at_least(1),
    "data.eval_every": at_least(0),
    "data.unit_bytes": at_least(1),
    "data.workers": at_least(0),
    "data.seq_len": at_least(2),
    "data.window": at_least(1),
    "data.threads": at_least(1),
    "data.prefetch": at_least(1),
}

MESH = {
    "mesh.data": at_least(1, {-1: "every device the other axes leave"}),
    "mesh.fsdp": at_least(1),
    "mesh.tensor": at_least(1),
}

# The model section (`model.model_config`) a run trains from scratch or from its teacher.
MODEL = {
    "model.vocab_size": at_least(1, {0: "take it from the tokenizer"}),
    "model.max_position_embeddings": at_least(1),
    "model.position_offset": at_least(0),
    "model.layer_norm_eps": Rule(low=0, high=1, low_open=True, high_open=True),
    "model.dropout_rate": fraction(high_open=True),
    "model.attention_dropout_rate": fraction(high_open=True),
    "model.num_layers": at_least(1),
    "model.hidden_size": at_least(1),
    "model.num_heads": at_least(1),
    "model.head_dim": at_least(1, {0: "hidden_size // num_heads"}),
    "model.intermediate_size": at_least(1),
    "model.type_vocab_size": at_least(0),
    "model.head_style": one_of(*HEAD_STYLES),
    "model.attention_impl": one_of(*attention.IMPLS),
    "model.attention_mask": one_of(*attention.MASKS),
    "model.dtype": one_of("bfloat16", "float32", "float16"),
    "model.param_dtype": one_of("bfloat16", "float32", "float16"),
}
