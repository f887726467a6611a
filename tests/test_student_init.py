"""Student initialisation copies exactly the mapped teacher layers."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from distil_flax.model import make_encoder, model_config, student_init


def _model(size, seed=0, **fields):
    """A float32 model of a size in `model.SIZES` (fields overridden) and its random params."""
    c = model_config(size)
    c.vocab_size, c.dtype = 50, "float32"
    for key, value in fields.items():
        setattr(c, key, value)
    model = make_encoder(c)
    ids = np.zeros((1, 8), np.int32)
    params = model.init(jax.random.PRNGKey(seed), ids, ids + 1, ids, logits_at="all")
    return model, nn.unbox(params)["params"]


def test_copies_mapped_layers_embeddings_and_head_and_folds_token_types():
    _, teacher = _model("tiny", seed=1, num_layers=6)
    _, student = _model("tiny_student", seed=2, num_layers=3)
    teacher_positions = np.array(teacher["position_embeddings"]["embedding"])
    layer_map = [0, 2, 5]
    got = student_init.init_from_teacher(teacher, student, layer_map)

    assert set(got) == set(student)  # No token types, no pooler: the student has none.
    assert "token_type_embeddings" not in got and "pooler" not in got
    for i, t in enumerate(layer_map):
        jax.tree.map(np.testing.assert_array_equal, got[f"layers_{i}"], teacher[f"layers_{t}"])
    # Non-mapped teacher layers are different arrays: the copy really followed the map.
    assert not np.array_equal(got["layers_1"]["mlp_in"]["kernel"],
                              teacher["layers_1"]["mlp_in"]["kernel"])
    for name in ("word_embeddings", "embeddings_norm", "mlm_transform", "mlm_norm", "mlm_bias"):
        jax.tree.map(np.testing.assert_array_equal, got[name], teacher[name])
    # Token-type row 0 (which BERT adds to every token) is folded into every position; the
    # teacher's own table is untouched.
    type_0 = teacher["token_type_embeddings"]["embedding"][0]
    np.testing.assert_array_equal(got["position_embeddings"]["embedding"],
                                  teacher_positions + type_0)
    np.testing.assert_array_equal(teacher["position_embeddings"]["embedding"], teacher_positions)


def _packed_inputs(rng, vocab=50):
    """Two rows of 12: two packed documents (7 + 5 tokens); one of 9 tokens and 3 of padding."""
    ids = rng.integers(1, vocab, (2, 12)).astype(np.int32)
    segments = np.array([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3], np.int32)
    positions = np.array([list(range(7)) + list(range(5)), list(range(9)) + [0] * 3], np.int32)
    ids[segments == 0] = 0
    return ids, segments, positions


def test_student_starts_as_the_teacher_minus_unmapped_layers():
    teacher_model, teacher = _model("tiny", seed=1, num_layers=4)
    student_model, student = _model("tiny_student", seed=2, num_layers=2)
    layer_map = [1, 3]
    got = student_init.init_from_teacher(teacher, student, layer_map)
    # The reference: the teacher itself (token types, pooler) with only the mapped layers,
    # renumbered, run as distillation runs it (token types 0).
    skipping_model = teacher_model.clone(num_layers=len(layer_map))
    skipping = {name: value for name, value in teacher.items() if not name.startswith("layers_")}
    skipping.update({f"layers_{i}": teacher[f"layers_{t}"] for i, t in enumerate(layer_map)})
    inputs = _packed_inputs(np.random.default_rng(0))

    def run(model, params):
        logits, out = model.apply({"params": params}, *inputs, logits_at="all")
        return np.asarray(out["hidden"]), np.asarray(logits)

    want_hidden, want_logits = run(skipping_model, skipping)
    got_hidden, got_logits = run(student_model, got)
    assert np.max(np.abs(got_hidden - want_hidden)) < 1e-5
    assert np.max(np.abs(got_logits - want_logits)) < 1e-5
    # Without the fold (the teacher's bare position table) the student is not the teacher: the
    # test above could not pass by accident.
    unfolded = dict(got, position_embeddings=teacher["position_embeddings"])
    assert np.max(np.abs(run(student_model, unfolded)[0] - want_hidden)) > 1e-3


def test_map_length_and_range_and_shape_errors():
    _, teacher = _model("tiny", seed=1, num_layers=4)
    _, student = _model("tiny_student")  # 1 layer.
    # The messages name the config field, init.layer_map.
    with pytest.raises(ValueError, match=r"^init\.layer_map \[0, 2\] has 2 entries but the "
                                         r"student has 1"):
        student_init.init_from_teacher(teacher, student, (0, 2))
    with pytest.raises(ValueError, match=r"^init\.layer_map \[4\] names layers outside the "
                                         r"teacher's 0..3"):
        student_init.init_from_teacher(teacher, student, [4])
    # Equal width, a different MLP: the per-parameter shapes say which.
    _, wide_mlp = _model("tiny_student", intermediate_size=128)
    with pytest.raises(ValueError, match=r"shapes differ:\n  layers_0 <- layers_0"):
        student_init.init_from_teacher(teacher, wide_mlp, [0])


def test_narrower_student_or_other_heads_name_both_sizes():
    _, teacher = _model("tiny", num_layers=2)  # Hidden size 32, 2 heads.
    _, narrow = _model("tiny_student", hidden_size=16, intermediate_size=32)
    with pytest.raises(ValueError, match=r"teacher's hidden size \(32\) differs from "
                                         r"model\.hidden_size \(16\): a narrower student is "
                                         r"pruned from the teacher \(init\.prune\)"):
        student_init.init_from_teacher(teacher, narrow, [0])
    # Heads split the same flat kernels, so only the counts, when given, can tell.
    _, student = _model("tiny_student", num_heads=4)
    student_init.init_from_teacher(teacher, student, [0])
    with pytest.raises(ValueError, match=r"teacher's number of heads \(2\) differs from "
                                         r"model\.num_heads \(4\)"):
        student_init.init_from_teacher(teacher, student, [0], num_heads=(2, 4))
