"""DistilBERT's, TinyBERT's and MiniLM's recipes side by side: same teacher, student, data, steps.

    make quickstart                     # the teacher: runs/quickstart/teacher (4 × 128)
    python bench/recipes.py --teacher=runs/quickstart/teacher --steps=300 \
        --workdir=runs/recipes --output=bench/results/recipes.json

Each recipe trains the quickstart's student shape (2 × 128) on the quickstart's data for the same
steps, both from the teacher's layers [1, 3] and from random init, and a student of half the
width (2 × 64: 2 heads of 32, 256 neurons) pruned from those layers (`init.prune`, hidden states
compared on the kept channels: `loss.kept_channels`) and from random init, through the real CLI
(`python -m distil_flax.main --config=configs/quickstart.py` with the recipe's loss sections as
overrides). Each student is then scored against the teacher by `python -m
distil_flax.evaluate_embeddings` on held-out sentences from another domain than the training
corpus (the World English Bible): prose sentences of CPython's own help texts
(`pydoc_data.topics`, shipped with Python). Printed: a markdown table (and --output: JSON) of the
agreement with the teacher — Spearman of all pairwise cosine similarities of mean-pooled
embeddings, recall@10 of the teacher's nearest neighbours — with each run's minutes.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The loss sections of each recipe, as --config overrides of configs/quickstart.py (DistilBERT's
# triple loss is that config's own). Relations: 4 relation heads of 32 in both 128-wide models.
RECIPES = {
    "distilbert": [],
    "tinybert": ["--config.loss.alpha_ce=0", "--config.loss.alpha_mlm=0",
                 "--config.loss.alpha_cos=0", "--config.loss.hidden_states.weight=1",
                 "--config.loss.attention_scores.weight=1"],
    "minilm": ["--config.loss.alpha_ce=0", "--config.loss.alpha_mlm=0",
               "--config.loss.alpha_cos=0", "--config.loss.relations.weight=1",
               "--config.loss.relations.heads=4", "--config.masking.mask_prob=0"],
}
_HALF_WIDTH = ["--config.model.hidden_size=64", "--config.model.num_heads=2",
               "--config.model.intermediate_size=256"]
INITS = {"teacher layers": ["--config.init.from_teacher=True", "--config.init.layer_map=(1,3)"],
         "random": ["--config.init.from_teacher=False"],
         "pruned 2 × 64": ["--config.init.from_teacher=True", "--config.init.layer_map=(1,3)",
                           "--config.loss.kept_channels=True", *_HALF_WIDTH],
         # L_cos needs equal widths, or the kept channels of a pruned student: off here.
         "random 2 × 64": ["--config.init.from_teacher=False", "--config.loss.alpha_cos=0",
                           *_HALF_WIDTH]}


def held_out_sentences(count: int, seed: int = 0) -> list[str]:
    """Prose sentences of CPython's help topics: 6–40 words, ending in a full stop, mostly words."""
    from pydoc_data.topics import topics

    found = set()
    for text in topics.values():
        for sentence in re.split(r"(?<=\.)\s+", " ".join(text.split())):
            words = sentence.split()
            alpha = sum(w.strip(".,;:()'\"").isalpha() for w in words)
            if (6 <= len(words) <= 40 and sentence.endswith(".") and alpha >= 0.7 * len(words)
                    and not re.search(r"[{}=>*]|::", sentence)):
                found.add(sentence)
    sentences = sorted(found)
    random.Random(seed).shuffle(sentences)
    return sentences[:count]


def _run(command: list[str], log: str) -> float:
    """Runs a command, its output to `log`; returns minutes; exits with its last lines on error."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        with open(log) as f:
            tail = f.read()[-2000:]
        sys.exit(f"error: {' '.join(command[:4])}… failed ({log}):\n{tail}")
    return (time.perf_counter() - start) / 60


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", default="runs/quickstart/teacher")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workdir", default="runs/recipes", help="one run per recipe and init here")
    p.add_argument("--sentences", type=int, default=1000, help="held-out sentences")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--inits", default=",".join(INITS), help="comma-separated")
    p.add_argument("--output", default="", help="also write the results as JSON here")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    text = os.path.join(args.workdir, "held_out.txt")
    with open(text, "w") as f:
        f.write("\n".join(held_out_sentences(args.sentences)) + "\n")

    rows = []
    for recipe in args.recipes.split(","):
        for init in args.inits.split(","):
            init_flags = INITS[init]
            slug = init.replace(" × ", "x").replace(" ", "-")
            workdir = os.path.join(args.workdir, f"{recipe}-{slug}")
            timing = f"{workdir}.minutes"  # A finished run is not trained again.
            if not os.path.exists(timing):
                minutes = _run(
                    [sys.executable, "-m", "distil_flax.main", "--config=configs/quickstart.py",
                     f"--workdir={workdir}", f"--config.teacher.checkpoint={args.teacher}",
                     f"--config.train.num_steps={args.steps}", *RECIPES[recipe], *init_flags],
                    f"{workdir}.log")
                with open(timing, "w") as f:
                    f.write(f"{minutes}\n")
            with open(timing) as f:
                minutes = float(f.read())
            report = f"{workdir}.embeddings.json"
            _run([sys.executable, "-m", "distil_flax.evaluate_embeddings", f"--student={workdir}",
                  f"--teacher={args.teacher}", f"--text={text}", "--noinit_only",
                  f"--output={report}"], f"{workdir}.evaluate.log")
            with open(report) as f:
                student = json.load(f)["metrics"]["student"]
            rows.append({"recipe": recipe, "init": init, "steps": args.steps,
                         "train_minutes": round(minutes, 2),
                         "text_cosine_spearman": student["text_cosine_spearman"],
                         "text_recall@10": student["text_recall@10"]})
            print(json.dumps(rows[-1]), flush=True)

    print("\n| recipe | init | steps | minutes | pairwise-cosine Spearman | recall@10 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['init']} | {r['steps']} | {r['train_minutes']:.1f} | "
              f"{r['text_cosine_spearman']:.3f} | {r['text_recall@10']:.3f} |")
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"teacher": args.teacher, "held_out": {"source": "pydoc_data.topics",
                                                             "sentences": args.sentences},
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
