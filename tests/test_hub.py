"""Hub model ids as inputs (`hf://ORG/NAME[@REVISION]`), offline, from a Hugging Face cache laid
out as huggingface_hub lays it out: models--ORG--NAME/{blobs, refs/main, snapshots/<commit>}."""

import hashlib
import os

# Nothing may reach a hub: every id below resolves from a temporary cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch", reason="HF interop tests need torch: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from distil_flax import model as model_lib  # noqa: E402
from distil_flax.downstream import config as finetune_config  # noqa: E402
from distil_flax.interop import hf, sources  # noqa: E402
from distil_flax.training import cli  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", ".")


def _cache_model(cache, repo_id: str, folder, commit: str, refs=("main",)) -> str:
    """Puts `folder`'s files into `cache` as `snapshot_download` leaves them: content-addressed
    blobs, a snapshot folder of relative symlinks to them, and refs naming the commit."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)  # The client writes no newline.
    return str(snapshot)


@pytest.fixture
def hub_cache(tmp_path):
    """A cache holding org/tiny-bert (a random BertForMaskedLM with a vocab) at two commits:
    main → COMMIT, and OTHER_COMMIT (a 3-layer one) reachable by hash only."""
    torch.manual_seed(0)
    cache = tmp_path / "hub"
    modules = {}
    for commit, layers in ((COMMIT, 2), (OTHER_COMMIT, 3)):
        folder = tmp_path / f"saved_{layers}"
        config = transformers.BertConfig(
            vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=layers,
            num_attention_heads=2, intermediate_size=64, max_position_embeddings=24,
            attn_implementation="eager")
        modules[commit] = transformers.BertForMaskedLM(config).eval()
        modules[commit].save_pretrained(folder)
        (folder / "vocab.txt").write_text("".join(w + "\n" for w in WORDS))
        _cache_model(cache, "org/tiny-bert", folder, commit,
                     refs=("main",) if commit == COMMIT else ())
    return cache, modules


def test_the_cache_is_the_hub_clients_layout(hub_cache):
    cache, _ = hub_cache
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "org/tiny-bert" and repo.repo_type == "model"
    assert {r.commit_hash for r in repo.revisions} == {COMMIT, OTHER_COMMIT}
    assert set(repo.refs) == {"main"}


def test_paths_are_returned_unchanged(tmp_path):
    assert hf.resolve_checkpoint(str(tmp_path)) == str(tmp_path)
    assert hf.resolve_checkpoint("runs/teacher") == "runs/teacher"  # Even when absent.
    assert hf.resolve_checkpoint("gs://bucket/run") == "gs://bucket/run"


@pytest.mark.parametrize("suffix,commit", [("", COMMIT), ("@main", COMMIT),
                                           (f"@{COMMIT}", COMMIT),
                                           (f"@{OTHER_COMMIT}", OTHER_COMMIT)])
def test_hub_ids_resolve_offline_and_load_with_parity(hub_cache, suffix, commit):
    cache, modules = hub_cache
    folder = hf.resolve_checkpoint(f"hf://org/tiny-bert{suffix}", cache_dir=str(cache))
    assert folder == str(cache / "models--org--tiny-bert" / "snapshots" / commit)
    assert hf.hub_model_id(folder) == "org/tiny-bert"

    model_cfg, params = hf.load_hf_checkpoint(folder)
    module = modules[commit]
    assert model_cfg.num_layers == module.config.num_hidden_layers
    ids = np.array([[2, 5, 6, 7, 4, 9, 10, 3], [2, 6, 4, 8, 3, 0, 0, 0]])
    mask = (ids > 0).astype(np.int32)
    cfg = model_cfg.copy_and_resolve_references()
    cfg.dtype = "float32"
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    ours, _ = model_lib.make_encoder(cfg).apply({"params": params}, ids, mask, positions, None,
                                                logits_at="all")
    with torch.no_grad():
        theirs = module(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    keep = mask.astype(bool)
    assert np.abs(np.asarray(ours)[keep] - theirs.numpy()[keep]).max() < 1e-4


def test_the_environment_names_the_cache(hub_cache, monkeypatch):
    cache, _ = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert hf.resolve_checkpoint("hf://org/tiny-bert").endswith(f"snapshots/{COMMIT}")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(cache.parent))  # HF_HOME/hub.
    assert hf.resolve_checkpoint("hf://org/tiny-bert").endswith(f"snapshots/{COMMIT}")


def test_an_unreachable_hub_falls_back_to_the_cache(hub_cache, monkeypatch):
    """Online mode with no network: snapshot_download cannot connect, then reads the cache."""
    cache, _ = hub_cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # A closed local port: the connection is refused at once, nothing leaves the machine.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    assert not hf.hub.offline()
    folder = hf.resolve_checkpoint("hf://org/tiny-bert", cache_dir=str(cache))
    assert folder.endswith(f"snapshots/{COMMIT}")
    with pytest.raises(ValueError, match=r"hf://org/absent is not in the Hugging Face cache "
                                         r"\(.*\) and the Hub cannot be reached"):
        hf.resolve_checkpoint("hf://org/absent", cache_dir=str(cache))


@pytest.mark.parametrize("spec,message", [
    ("hf://org/absent", r"hf://org/absent is not in the Hugging Face cache \({cache}\) and "
                        r"HF_HUB_OFFLINE is set"),
    ("hf://org/tiny-bert@v2", r"hf://org/tiny-bert@v2 is not in the Hugging Face cache"),
    ("hf://org/tiny-bert@", r"nothing after '@'"),
    ("hf://org/two/slashes", r"not a valid Hub model id"),
    ("hf://", r"not a valid Hub model id"),
])
def test_bad_ids_are_one_clear_error(hub_cache, spec, message):
    cache, _ = hub_cache
    with pytest.raises(ValueError, match=message.replace("{cache}", str(cache))):
        hf.resolve_checkpoint(spec, cache_dir=str(cache))


def test_a_bad_id_is_one_error_line(hub_cache, capsys, monkeypatch):
    cache, _ = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: hf.resolve_checkpoint("hf://org/absent"))
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hf://org/absent is not in the "
                                                   f"Hugging Face cache ({cache})")


def test_fine_tuning_starts_from_a_hub_id(hub_cache, monkeypatch):
    cache, _ = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    pretrained = sources.open_source("hf://org/tiny-bert")
    assert pretrained.kind == "hf" and pretrained.path.endswith(f"snapshots/{COMMIT}")
    assert os.path.basename(pretrained.tokenizer) == "vocab.txt"
    assert pretrained.model_cfg.num_layers == 2

    c = finetune_config.base_config()
    c.init.checkpoint = "hf://org/tiny-bert"
    finetune_config.validate(c)
    c.init.checkpoint = "hf://org/absent"
    with pytest.raises(ValueError, match=r"^init.checkpoint: hf://org/absent is not in the "):
        finetune_config.validate(c)
    c.init.checkpoint = "hf://org/tiny-bert"
    c.distill.teacher = "hf://org/absent"
    with pytest.raises(ValueError, match=r"^distill.teacher: hf://org/absent is not in the "):
        finetune_config.validate(c)
