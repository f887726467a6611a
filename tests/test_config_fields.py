"""Every numeric field of every shipped config has a declared range, and a hostile value (NaN,
±inf, −1, 0) is either refused naming the field or accepted because the field's comment says
what it means (`training/fields.py`)."""

import glob
import inspect
import math
import os
import re

import pytest

from distil_flax.distill import config as distill_config
from distil_flax.downstream import config as downstream_config
from distil_flax.losses import TERMS
from distil_flax.model import config as model_config
from distil_flax.training import fields
from distil_flax.training.config_files import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
HOSTILE = (math.nan, math.inf, -math.inf, -1, 0)


def _is_finetuning(c) -> bool:
    return "task" in c


def _rules(c):
    return downstream_config.RULES if _is_finetuning(c) else distill_config.RULES


def _numeric_fields(c, prefix=""):
    for key, value in c.items():
        if hasattr(value, "items"):
            yield from _numeric_fields(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def _comments(finetuning: bool) -> dict[str, str]:
    """Each config field's comment (the line's own and the comment lines just above it)."""
    found = {}
    sources = ([(downstream_config.base_config, "")] if finetuning else
               [(distill_config.base_config, ""), (model_config.model_config, "model.")])
    for function, prefix in sources:
        above = []
        for line in inspect.getsource(function).splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped[1:])
                continue
            match = re.match(r"c\.([\w.]+) = [^#]*(?:#(.*))?$", stripped)
            if match:
                path = prefix + match.group(1)
                found[path] = found.get(path, "") + " ".join(above) + (match.group(2) or "")
            above = []
    for term in [] if finetuning else TERMS:
        for field in term.fields:
            found[f"loss.{term.name}.{field.name}"] = field.doc
    return found


def _set(c, path, value):
    *sections, name = path.split(".")
    for section in sections:
        c = c[section]
    c[name] = value


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_numeric_field_has_a_rule_and_hostile_values_are_refused_or_documented(path):
    c = load_config(path)
    rules, comments = _rules(c), _comments(_is_finetuning(c))
    numeric = dict(_numeric_fields(c))
    assert not [name for name in numeric if name not in rules], "fields without a rule"
    fields.check(c, rules)  # The shipped values themselves are allowed.
    for name, shipped in numeric.items():
        for value in HOSTILE:
            c = load_config(path)
            try:
                _set(c, name, value)
            except TypeError:  # A float into an int field: the flag parser refuses it too.
                assert isinstance(shipped, int) and isinstance(value, float)
                continue
            try:
                fields.check(c, rules)
            except ValueError as error:
                assert str(error).startswith(f"{name} must be "), str(error)
                assert not rules[name].allows(value)
                continue
            assert math.isfinite(value), f"{name}={value} accepted"
            rule = rules[name]
            if value in rule.special:  # Outside the range: its comment must say what it means.
                assert re.search(rf"(?<![\d.]){value:g}:", comments.get(name, "")), (
                    f"{name}={value} is accepted as {rule.special[value]!r}, but its comment "
                    f"{comments.get(name)!r} does not say so")


def test_the_rules_name_only_fields_the_configs_have():
    """A rule for a renamed or removed field would silently check nothing."""
    for rules, c in ((distill_config.RULES, distill_config.base_config()),
                     (downstream_config.RULES, downstream_config.base_config())):
        for name in rules:
            found = c
            for key in name.split("."):
                assert key in found, f"rule for {name}, which the config lacks"
                found = found[key]


@pytest.mark.parametrize("field, value, message", [
    ("loss.temperature", math.nan, "loss.temperature must be finite and > 0, got nan"),
    ("train.weight_decay", math.nan, "train.weight_decay must be finite and ≥ 0, got nan"),
    ("train.warmup_fraction", -1.0, "train.warmup_fraction must be in [0, 1], got -1.0"),
    ("masking.smoothing", math.inf, "masking.smoothing must be finite and ≥ 0, got inf"),
    ("mesh.data", -2,
     "mesh.data must be finite and ≥ 1 (or -1: every device the other axes leave), got -2"),
    ("loss.embeddings.temperature", 0.0, "loss.embeddings.temperature must be finite and > 0"),
])
def test_validate_checks_the_ranges_before_anything_else(field, value, message):
    c = distill_config.base_config()
    c.teacher.checkpoint = "/does/not/exist"  # Would fail later: the range is checked first.
    _set(c, field, value)
    with pytest.raises(ValueError) as refused:
        distill_config.validate(c)
    assert str(refused.value).startswith(message)


def test_finetuning_validate_checks_the_ranges_first():
    c = downstream_config.base_config()  # No init.checkpoint: would fail next.
    c.train.b2 = 1.0
    with pytest.raises(ValueError, match=r"^train.b2 must be in \[0, 1\), got 1.0"):
        downstream_config.validate(c)


@pytest.mark.parametrize("rule, allowed, refused", [
    (fields.at_least(1, {0: "off"}), (0, 1, 7, 2.5), (-1, 0.5, math.nan, math.inf)),
    (fields.fraction(high_open=True), (0, 0.5), (1, -0.1, math.nan)),
    (fields.positive(), (1e-9, 3), (0, -1, -math.inf, math.inf)),
    (fields.any_number(), (-1, 0, 5), (math.nan, math.inf, "3", True)),
    (fields.one_of("a", "b"), ("a",), ("c", 1)),
])
def test_rules(rule, allowed, refused):
    assert all(rule.allows(v) for v in allowed)
    assert not any(rule.allows(v) for v in refused)
