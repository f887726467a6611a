"""What the `transformers` parity tests (test_hf.py, test_roberta.py) share: torch seeded for
every test, perturbed transformers modules, padded batches, our fp32 forward beside theirs, the
differences between the two, bit-exact parameter trees, and a module saved both as sharded
safetensors and as a legacy `pytorch_model.bin`.

Import it after `pytest.importorskip("torch")` and `pytest.importorskip("transformers")`, and
import `deterministic_torch` into the test module so that it applies to every test there.
"""

import shutil

import jax
import numpy as np
import pytest
import torch

from distil_flax import model as model_lib
from distil_flax.interop import hf

TOL = 1e-4


@pytest.fixture(autouse=True)
def deterministic_torch():
    torch.manual_seed(0)


def perturbed(module):
    """Eval mode with every parameter moved off its init, so biases and LayerNorms matter."""
    module.eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def padded_batch(vocab: int, rows: int = 3, length: int = 10, seed: int = 0, *, low: int = 5,
          pad: int = 0, first: int = 2):
    """Token ids [rows, length] drawn from [low, vocab), `first` at position 0, right-padded with
    `pad` on all but the first row, and the 1/0 mask. The defaults are BERT's: [CLS] 2, [PAD] 0,
    real ids past the five specials."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low, vocab, (rows, length))
    mask = np.ones_like(ids)
    for r in range(1, rows):
        mask[r, length - 2 * r:] = 0
    ids[mask == 0] = pad
    ids[:, 0] = first
    return ids, mask


def our_config(size: str, vocab_size: int, **fields):
    """`model_config(size)` with this vocabulary, 24 positions and `fields` overridden."""
    cfg = model_lib.model_config(size)
    cfg.vocab_size, cfg.max_position_embeddings = vocab_size, 24
    for key, value in fields.items():
        setattr(cfg, key, value)
    return cfg


def our_forward(model_cfg, params, ids, mask, token_type_ids=None, *, segments=None,
                positions=None):
    """Our fp32 forward: (logits [b, l, vocab], or None without an MLM head, out).

    By default one sequence a row: segment_ids = mask (padding is segment 0), positions 0, 1, …
    """
    cfg = model_cfg.copy_and_resolve_references()
    cfg.dtype = "float32"
    model = model_lib.make_encoder(cfg)
    if positions is None:
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return model.apply({"params": params}, ids, mask if segments is None else segments,
                       positions, token_type_ids,
                       logits_at="all" if "mlm_bias" in params else None,
                       return_all_hidden=True)


def their_forward(module, ids, mask, token_type_ids=None):
    """The transformers module's forward, with every hidden state."""
    kwargs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
              "output_hidden_states": True}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = torch.tensor(token_type_ids)
    with torch.no_grad():
        return module(**kwargs)


def max_diff(ours, theirs, mask) -> float:
    """Max |ours − theirs| over non-pad positions ([b, l, ...] arrays and a [b, l] mask)."""
    keep = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(ours)[keep] - np.asarray(theirs.detach())[keep]).max())


def hidden_diffs(out, hf_out, mask) -> list[float]:
    """`max_diff` of each hidden state (embeddings first), which must be as many as theirs."""
    assert len(out["hidden_states"]) == len(hf_out.hidden_states)
    return [max_diff(a, b, mask) for a, b in zip(out["hidden_states"], hf_out.hidden_states)]


def hidden_diff(out, hf_out, mask) -> float:
    return max(hidden_diffs(out, hf_out, mask))


def pooled_diff(out, hf_out) -> float:
    return float(np.abs(np.asarray(out["pooled"]) - hf_out.pooler_output.numpy()).max())


def report(name: str, **diffs) -> None:
    """Prints the measured differences (shown with `pytest -s`)."""
    print(f"\n[parity] {name}: " + ", ".join(f"{k}={v:.3g}" for k, v in diffs.items()))


def flat(params):
    """{"a/b/c": array} of a parameter tree."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_bit_exact(a, b, skip=(), dtype=np.float32):
    """The same keys (but those starting with one of `skip`) and equal arrays, each of `dtype`
    in both trees unless `dtype` is None."""
    fa, fb = flat(a), flat(b)
    fa = {k: v for k, v in fa.items() if not k.startswith(skip)}
    fb = {k: v for k, v in fb.items() if not k.startswith(skip)}
    assert sorted(fa) == sorted(fb)
    for k in fa:
        if dtype is not None:
            assert fa[k].dtype == fb[k].dtype == dtype, k
        assert np.array_equal(fa[k], fb[k]), k


def save_sharded_and_legacy(module, folder):
    """Saves `module` as sharded safetensors in folder/sharded and as a legacy pickle checkpoint
    (pytorch_model.bin, as transformers 4 wrote it) in folder/legacy.

    Returns ((sharded, legacy), {key: numpy array} of its state dict)."""
    sharded, legacy = folder / "sharded", folder / "legacy"
    module.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / hf.SAFETENSORS_INDEX).exists()
    legacy.mkdir()
    shutil.copy(sharded / "config.json", legacy)
    torch.save(module.state_dict(), legacy / hf.TORCH_BIN)
    return (sharded, legacy), {k: v.numpy() for k, v in module.state_dict().items()}
