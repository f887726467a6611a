"""Student initialisation copies exactly the mapped teacher layers."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from distil_flax import student_init
from distil_flax.model import make_encoder, model_config


def _params(size, vocab=50, seed=0):
    c = model_config(size)
    c.vocab_size = vocab
    model = make_encoder(c)
    ids = np.zeros((1, 8), np.int32)
    params = model.init(jax.random.PRNGKey(seed), ids, ids + 1, ids, logits_at="all")
    return nn.unbox(params)["params"]


def _teacher_with_layers(n):
    c = model_config("tiny")
    c.num_layers = n
    c.vocab_size = 50
    model = make_encoder(c)
    ids = np.zeros((1, 8), np.int32)
    return nn.unbox(model.init(jax.random.PRNGKey(1), ids, ids + 1, ids, logits_at="all"))["params"]


def test_copies_mapped_layers_embeddings_and_head_and_drops_token_types():
    teacher = _teacher_with_layers(6)
    c = model_config("tiny_student")
    c.num_layers = 3
    c.vocab_size = 50
    student_model = make_encoder(c)
    ids = np.zeros((1, 8), np.int32)
    student = nn.unbox(student_model.init(jax.random.PRNGKey(2), ids, ids + 1, ids,
                                          logits_at="all"))["params"]
    layer_map = [0, 2, 5]
    got = student_init.init_from_teacher(teacher, student, layer_map)

    assert set(got) == set(student)  # No token types, no pooler: the student has none.
    assert "token_type_embeddings" not in got and "pooler" not in got
    for i, t in enumerate(layer_map):
        jax.tree.map(np.testing.assert_array_equal, got[f"layers_{i}"], teacher[f"layers_{t}"])
    # Non-mapped teacher layers are different arrays: the copy really followed the map.
    assert not np.array_equal(got["layers_1"]["mlp_in"]["kernel"],
                              teacher["layers_1"]["mlp_in"]["kernel"])
    for name in ("word_embeddings", "position_embeddings", "embeddings_norm", "mlm_transform",
                 "mlm_norm", "mlm_bias"):
        jax.tree.map(np.testing.assert_array_equal, got[name], teacher[name])


def test_map_length_and_range_and_shape_errors():
    teacher = _teacher_with_layers(4)
    student = _params("tiny_student")  # 1 layer.
    # The messages name the config field, init.layer_map.
    with pytest.raises(ValueError, match=r"^init\.layer_map \[0, 2\] has 2 entries but the "
                                         r"student has 1"):
        student_init.init_from_teacher(teacher, student, (0, 2))
    with pytest.raises(ValueError, match=r"^init\.layer_map \[4\] names layers outside the "
                                         r"teacher's 0..3"):
        student_init.init_from_teacher(teacher, student, [4])
    wide = model_config("tiny_student")
    wide.hidden_size, wide.num_heads, wide.vocab_size = 64, 2, 50
    ids = np.zeros((1, 8), np.int32)
    wide_params = nn.unbox(make_encoder(wide).init(jax.random.PRNGKey(0), ids, ids + 1, ids,
                                                   logits_at="all"))["params"]
    with pytest.raises(ValueError, match="shapes differ"):
        student_init.init_from_teacher(teacher, wide_params, [0])
