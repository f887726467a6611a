"""Task heads against `transformers` itself: every fine-tuned class imports with the same outputs
(fp32, 1e-4) and exports back to the identical state dict."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from distil_flax.interop import (
    hf,  # noqa: E402
    sources,
)
from distil_flax.model import heads  # noqa: E402

torch = pytest.importorskip("torch", reason="HF interop tests need torch: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
CLASSES = sorted(hf.TASK_CLASSES.values())


def _hf_model(cls_name: str):
    """A small transformers model of `cls_name`, every weight moved off its init."""
    torch.manual_seed(0)
    labels = 2 if "QuestionAnswering" in cls_name else 3
    id2label = {i: f"class_{i}" for i in range(labels)}
    if cls_name.startswith(("Roberta", "XLMRoberta")):
        config_class = (transformers.XLMRobertaConfig if cls_name.startswith("XLM")
                        else transformers.RobertaConfig)
        config = config_class(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=18, type_vocab_size=1,
            layer_norm_eps=1e-5, id2label=id2label, attn_implementation="eager")
    elif cls_name.startswith("Bert"):
        config = transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=16, id2label=id2label,
            attn_implementation="eager")
    else:
        config = transformers.DistilBertConfig(
            vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
            max_position_embeddings=16, id2label=id2label, attn_implementation="eager")
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(multiple_choice: bool):
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 50, (3, 10))
    mask = np.ones_like(ids)
    mask[1, 7:] = mask[2, 4:] = 0
    types = (np.arange(10) >= 5).astype(np.int64) * mask
    if multiple_choice:  # Three examples of two choices each.
        ids, mask, types = (np.stack([x, x[::-1]], axis=1) for x in (ids, mask, types))
    return ids, mask, types


def _outputs(out) -> np.ndarray:
    if hasattr(out, "start_logits"):
        return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], -1)
    return out.logits.numpy()


@pytest.mark.parametrize("cls_name", CLASSES)
def test_task_checkpoint_round_trip_matches_transformers(cls_name, tmp_path):
    theirs_model = _hf_model(cls_name)
    theirs_model.save_pretrained(tmp_path / "theirs")
    model_cfg, head, params = hf.load_hf_task_checkpoint(tmp_path / "theirs")
    assert hf.TASK_CLASSES[(model_cfg.head_style, head.head)] == cls_name
    if head.head in ("seq_cls", "token_cls"):
        assert head.label_names == ("class_0", "class_1", "class_2")
    model_cfg.dtype = "float32"
    ours_model = sources.task_model(model_cfg, head)

    ids, mask, types = _inputs(head.head == "multiple_choice")
    bert = cls_name.startswith("Bert")
    ours, _ = ours_model.apply({"params": params}, ids, mask, types if bert else None)
    kwargs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if bert:
        kwargs["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        theirs = _outputs(theirs_model(**kwargs))
    ours = np.asarray(ours)
    keep = mask.astype(bool) if head.head in ("qa", "token_cls") else ...
    assert np.abs(ours[keep] - theirs[keep]).max() < TOL

    # Export: the same state dict, and config fields transformers reads back.
    hf.export_task_hf(params, model_cfg, head, tmp_path / "ours")
    exported = load_file(str(tmp_path / "ours" / "model.safetensors"))
    original = {k: v.numpy() for k, v in theirs_model.state_dict().items()
                if not k.endswith(("position_ids", "token_type_ids"))}
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    reloaded = getattr(transformers, cls_name).from_pretrained(tmp_path / "ours")
    if head.head in ("seq_cls", "token_cls"):  # Class names mean something only there.
        assert reloaded.config.id2label == theirs_model.config.id2label


def test_fresh_heads_have_hf_shapes_and_regression_exports():
    from flax import linen as nn

    from distil_flax.model import model_config

    cfg = model_config("tiny_student")
    cfg.vocab_size, cfg.max_position_embeddings, cfg.dtype = 50, 16, "float32"
    model = heads.make_task_model(cfg, head="seq_cls", num_labels=1, pooling="first_token",
                                  head_dropout=0.2)
    shapes = nn.unbox(jax.eval_shape(heads.init_fn(model), jax.random.PRNGKey(0)))
    assert shapes["pre_classifier"]["kernel"].shape == (32, 32)  # DistilBERT's layout.
    assert shapes["classifier"]["kernel"].shape == (32, 1)
    config = hf.hf_task_config(cfg, heads.TaskHead("seq_cls", 1, regression=True,
                                                    head_dropout=0.2))
    assert config["architectures"] == ["DistilBertForSequenceClassification"]
    assert config["problem_type"] == "regression" and config["seq_classif_dropout"] == 0.2
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    with pytest.raises(ValueError, match="params do not match the model config and a qa head"):
        hf.hf_task_state_dict(params, cfg, heads.TaskHead("qa", 2))
