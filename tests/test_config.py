"""Config files, command-line overrides and validation: a config that cannot run names the field.

Tests see 8 simulated CPU devices (conftest.py); the tiny quickstart config (batch 16, micro-batch
8) fits them on the default mesh (data=-1: all 8).
"""

import json
import math
import os
import sys

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from distil_flax.distill import config as config_lib
from distil_flax.training import config_files, partitioning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")


def _parse(monkeypatch, *overrides):
    """The config `distil_flax.main` would run for `--config=configs/quickstart.py OVERRIDES`.

    The flag is defined as main.py defines it (locked), on fresh flag values. config_flags reads
    the overrides from sys.argv, as on a real command line.
    """
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "Run configuration file.",
                                             flag_values=values, lock_config=True)
    argv = ["main", f"--config={QUICKSTART}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    values(argv)
    return holder.value


def test_layer_map_and_mesh_rules_are_overridable_on_the_command_line(monkeypatch):
    rules = '(("batch", ("data", "fsdp")), ("embed", None), ("mlp", "tensor"))'
    c = _parse(monkeypatch, "--config.init.layer_map=(0,1)", f"--config.mesh.rules={rules}")
    assert tuple(c.init.layer_map) == (0, 1)
    assert partitioning.rules_from_config(c.mesh.rules) == (
        ("batch", ("data", "fsdp")), ("embed", None), ("mlp", "tensor"))
    # One layer, as a bare number or a repeated flag.
    assert tuple(_parse(monkeypatch, "--config.init.layer_map=3").init.layer_map) == (3,)
    c = _parse(monkeypatch, "--config.init.layer_map=3", "--config.init.layer_map=1")
    assert tuple(c.init.layer_map) == (3, 1)
    # Untouched, the defaults are the file's.
    c = _parse(monkeypatch)
    assert c.init.layer_map == (0, 2) and c.mesh.rules == partitioning.DEFAULT_RULES


def test_a_config_read_back_from_json_still_works(tmp_path):
    """JSON has no tuples: a run's config.json holds lists, which every reader accepts."""
    c = config_files.load_config(f"{QUICKSTART}:tiny")
    config_files.save_json(c, tmp_path / "config.json")
    loaded = config_files.load_json(tmp_path / "config.json")
    assert loaded.init.layer_map == [1]
    assert json.loads(loaded.to_json()) == json.loads(c.to_json_best_effort())
    partitioning.check_rules(loaded.mesh.rules)
    assert (partitioning.rules_from_config(loaded.mesh.rules)
            == partitioning.rules_from_config(c.mesh.rules) == partitioning.DEFAULT_RULES)
    loaded.init.layer_map = (0,)  # A tuple into the list field read back: converted, no error.
    assert loaded.init.layer_map == [0]


@pytest.fixture
def tiny(tmp_path):
    """The tiny student config, runnable as far as validation goes: a vocab and a teacher dir."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nfox\n##es\n")
    (tmp_path / "teacher").mkdir()
    c = config_files.load_config(f"{QUICKSTART}:tiny")
    c.data.tokenizer, c.teacher.checkpoint = str(vocab), str(tmp_path / "teacher")
    config_lib.validate(c)  # The cases below each break exactly one thing.
    return c


@pytest.mark.parametrize("rate", [math.nan, math.inf, -math.inf, 0.0, -1e-4])
def test_learning_rate_must_be_finite_and_positive(tiny, rate):
    tiny.train.learning_rate = rate
    with pytest.raises(ValueError, match=r"^train\.learning_rate must be finite and > 0, got"):
        config_lib.validate(tiny)


def test_model_needs_a_layer(tiny):
    tiny.model.num_layers = 0
    with pytest.raises(ValueError, match=r"^model\.num_layers must be finite and ≥ 1, got 0"):
        config_lib.validate(tiny)


def test_layer_map_must_name_one_teacher_layer_per_student_layer(tiny):
    tiny.init.layer_map = (0, 1)
    with pytest.raises(ValueError, match=r"^init\.layer_map \(0, 1\) has 2 entries but "
                                         r"model\.num_layers is 1"):
        config_lib.validate(tiny)
    tiny.init.from_teacher = False  # Not used then.
    config_lib.validate(tiny)


@pytest.mark.parametrize("mesh,batch,micro,message", [
    # 8 devices, all data-parallel: 12 rows do not split over them.
    ({}, 12, 0, r"^train\.batch_size \(12\) must be a multiple of the 8 data-parallel devices "
                r"\(mesh\.data × mesh\.fsdp = 8 × 1\)"),
    ({}, 16, 4, r"^train\.micro_batch_size \(4\) must be a multiple of the 8 data-parallel"),
    # data × fsdp = 2 × 2 (tensor takes the other factor 2): 4 divides 16 but 6 does not.
    (dict(data=-1, fsdp=2, tensor=2), 12, 6, r"^train\.micro_batch_size \(6\) must be a "
                                            r"multiple of the 4 data-parallel devices "
                                            r"\(mesh\.data × mesh\.fsdp = 2 × 2\)"),
    # A mesh that does not fit the devices is named as make_mesh names it.
    (dict(data=3), 16, 8, r"mesh shape \(mesh\.data=3, mesh\.fsdp=1, mesh\.tensor=1\) needs 3 "
                          r"devices, but 8 are available"),
])
def test_batch_sizes_must_split_over_the_data_parallel_devices(tiny, mesh, batch, micro,
                                                               message):
    for key, value in mesh.items():
        setattr(tiny.mesh, key, value)
    tiny.train.batch_size, tiny.train.micro_batch_size = batch, micro
    with pytest.raises(ValueError, match=message):
        config_lib.validate(tiny)


def test_batch_sizes_must_split_over_the_processes(tiny, monkeypatch):
    tiny.mesh.data, tiny.mesh.fsdp = 1, 8  # The batch splits over 8 devices, whatever the mesh.
    tiny.train.batch_size, tiny.train.micro_batch_size = 24, 8
    config_lib.validate(tiny)
    monkeypatch.setattr(jax, "process_count", lambda: 3)  # 8 devices on 3 hosts: only the count.
    with pytest.raises(ValueError, match=r"^train\.micro_batch_size \(8\) .* and of the 3 "
                                         r"process\(es\)"):
        config_lib.validate(tiny)


def test_check_batch_divides_is_the_one_check():
    """What fine-tuning's validation calls too: any field name, any mesh section."""
    partitioning.check_batch_divides({"data": 2, "fsdp": -1, "tensor": 1}, "train.x", 16)
    with pytest.raises(ValueError, match=r"^train\.eval_batch_size \(6\) must be a multiple of "
                                         r"the 8 data-parallel devices"):
        partitioning.check_batch_divides({"data": 2, "fsdp": -1, "tensor": 1},
                                         "train.eval_batch_size", 6)


@pytest.mark.parametrize("rules,message", [
    ((("batch", "data", "fsdp"),), r"^mesh\.rules entry \('batch', 'data', 'fsdp'\) is not a "
                                   r"\(logical name, mesh axes\) pair"),
    ((("batch", ("data", "pipeline")),), r"^mesh\.rules entry .*: mesh axes must be None, or "
                                         r"distinct names among data, fsdp, tensor"),
    ((("batch", ("data", "data")),), r"^mesh\.rules entry .*distinct names"),
    (((1, None),), r"^mesh\.rules entry \(1, None\) is not a"),
])
def test_malformed_mesh_rules_are_named(tiny, rules, message):
    tiny.mesh.rules = rules
    with pytest.raises(ValueError, match=message):
        config_lib.validate(tiny)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_states.weight", -1.0, r"^loss\.hidden_states\.weight must be finite and ≥ 0"),
    ("relations.weight", math.nan, r"^loss\.relations\.weight must be finite and ≥ 0"),
    ("relations.pairs", "qq,qv", r"^loss\.relations\.pairs='qq,qv': each pair must be one of"),
    ("relations.heads", 0, r"^loss\.relations\.heads must be finite and ≥ 1, got 0"),
    ("hidden_states.layer_map", (0, 1), r"^loss\.hidden_states\.layer_map \(0, 1\) has 2 "
                                        r"entries but model\.num_layers is 1"),
    ("relation_chunk", -1, r"^loss\.relation_chunk must be finite and ≥ 0"),
])
def test_intermediate_layer_terms_are_validated(tiny, field, value, message):
    tiny.loss.relations.weight = tiny.loss.hidden_states.weight = 1.0
    config_lib.validate(tiny)
    section, name = field.rsplit(".", 1) if "." in field else ("", field)
    setattr(tiny.loss[section] if section else tiny.loss, name, value)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(tiny)


def test_teacher_terms_and_masking_are_named(tiny):
    tiny.loss.alpha_ce = tiny.loss.alpha_cos = 0.0
    tiny.loss.attention_scores.weight = 1.0
    tiny.teacher.checkpoint = ""
    with pytest.raises(ValueError, match=r"^loss\.attention_scores\.weight need a teacher"):
        config_lib.validate(tiny)
    tiny.loss.attention_scores.weight = 0.0
    config_lib.validate(tiny)  # MLM alone: no teacher needed.
    tiny.masking.mask_prob = 0.0
    with pytest.raises(ValueError, match=r"^masking\.mask_prob is 0, which leaves "
                                         r"loss\.alpha_mlm nothing to predict"):
        config_lib.validate(tiny)


@pytest.mark.parametrize("changes, message", [
    (dict(attention_scores=1.0), r"^loss\.attention_scores compares heads one to one, but "
                                 r"model\.num_heads is 4 and the teacher has 2"),
    (dict(relations=1.0, heads=3), r"^loss\.relations\.heads \(3\) must divide model\.hidden_size "
                                   r"\(16\)"),
    (dict(relations=1.0, teacher_layer=2), r"^loss\.relations\.teacher_layer 2 is outside a "
                                           r"model of 2 layers"),
    (dict(hidden_states=1.0, layer_map=(2,)), r"^loss\.hidden_states\.layer_map: layer map "
                                              r"\(2,\) names layers outside the teacher's 0\.\.1"),
])
def test_terms_are_checked_against_both_models(changes, message):
    from distil_flax.distill import train
    from distil_flax.model import make_encoder, model_config

    c = config_files.load_config(f"{QUICKSTART}:tiny")
    c.model.hidden_size, c.model.num_heads = 16, 4
    for name in ("attention_scores", "relations", "hidden_states"):
        c.loss[name].weight = changes.get(name, 0.0)
    c.loss.relations.heads = changes.get("heads", 2)
    c.loss.relations.teacher_layer = changes.get("teacher_layer", -1)
    c.loss.hidden_states.layer_map = changes.get("layer_map", ())
    teacher_config = model_config("tiny")  # 2 layers × 32, 2 heads.
    student, teacher = (make_encoder(m, vocab_size=8) for m in (c.model, teacher_config))
    with pytest.raises(ValueError, match=message):
        train.loss_spec(c, student, teacher)
