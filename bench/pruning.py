"""Narrow students of all-MiniLM-L6-v2: random init against pruned from the teacher, same steps.

    python bench/offline_text.py --out=runs/embed_text            # the held-out files
    python bench/pruning.py --workdir=runs/pruning --output=bench/results/pruning.json

For each --widths student (3 layers; heads of 32, the teacher's size; 4 × width neurons) and each
init, one run of `python -m distil_flax.main --config=configs/embed_minilm.py:narrow` for the
config's steps (--steps to change them), then `python -m distil_flax.evaluate_embeddings` of it
against the teacher on each --texts file (held-out text of other domains than the training
corpus, the World English Bible; `bench/offline_text.py` says where each comes from):

  pruned   the config as shipped: the teacher pruned (`init.prune`) from its layers (0, 3, 5),
           MSE and cosine of the pooled embeddings on the teacher's channels the student kept
           (`loss.kept_channels`)
  random   random init, the recipe that served it best before pruning existed: MSE and cosine
           through a learned projection onto the teacher's 384 dimensions, plus the in-batch
           similarity term, 10 % warm-up
  (--variants adds pruned ones: "projection", the pruned student through a learned projection
  instead of the kept channels)

Printed: a markdown table (and --output: JSON) of the Spearman of all pairwise cosine
similarities against the teacher's, init-only (pruned: the student as it started, which
evaluate_embeddings rebuilds from the run's pruning.json; random: nothing to score) and
distilled, with each run's minutes (the whole command) and the machine's load. A finished run
is not trained again.
"""

import argparse
import json
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

from embedding_peer import run_sampling_load  # noqa: E402
from recipes import _run  # noqa: E402

CONFIG = "configs/embed_minilm.py:narrow"
TEXTS = "runs/embed_text/fortunes.txt,runs/embed_text/definitions.txt,runs/embed_text/pydoc.txt"
INITS = {
    "pruned": [],
    "random": ["--config.init.from_teacher=False", "--config.loss.kept_channels=False",
               "--config.loss.embeddings.similarity_weight=1",
               "--config.train.warmup_fraction=0.1"],
    "projection": ["--config.loss.kept_channels=False"],
}


def _shape(width: int) -> list[str]:
    return [f"--config.model.hidden_size={width}", f"--config.model.num_heads={width // 32}",
            f"--config.model.intermediate_size={4 * width}"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default="runs/pruning")
    p.add_argument("--widths", default="256,192")
    p.add_argument("--inits", default="pruned,random", help=f"of {', '.join(INITS)}")
    p.add_argument("--steps", type=int, default=0, help="0: the config's")
    p.add_argument("--texts", default=TEXTS, help="comma-separated held-out files")
    p.add_argument("--output", default="")
    args = p.parse_args(argv)
    from configs.embed_minilm import teacher_folder

    teacher = teacher_folder()
    texts = args.texts.split(",")
    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        for init in args.inits.split(","):
            workdir = os.path.join(args.workdir, f"{width}-{init}")
            timing = f"{workdir}.timing.json"
            if not os.path.exists(timing):
                steps = [f"--config.train.num_steps={args.steps}"] if args.steps else []
                minutes, load = run_sampling_load(
                    [sys.executable, "-m", "distil_flax.main", f"--config={CONFIG}",
                     f"--workdir={workdir}", *_shape(width), *INITS[init], *steps],
                    f"{workdir}.log")
                with open(timing, "w") as f:
                    json.dump({"minutes": minutes, "load": load}, f)
            with open(timing) as f:
                row = {"width": width, "init": init, **json.load(f)}
            with open(os.path.join(workdir, "config.json")) as f:
                row["steps"] = json.load(f)["train"]["num_steps"]
            for text in texts:
                report = f"{workdir}.{os.path.basename(text)}.json"
                _run([sys.executable, "-m", "distil_flax.evaluate_embeddings",
                      f"--student={workdir}", f"--teacher={teacher}", f"--text={text}",
                      f"--output={report}"], f"{workdir}.evaluate.log")
                with open(report) as f:
                    metrics = json.load(f)["metrics"]
                name = os.path.splitext(os.path.basename(text))[0]
                row[name] = {role: metrics[role]["text_cosine_spearman"]
                             for role in ("init_only", "student") if role in metrics}
            rows.append(row)
            print(json.dumps(row), flush=True)

    names = [os.path.splitext(os.path.basename(t))[0] for t in texts]
    print("\n| student | init | steps | minutes (load) | "
          + " | ".join(f"{n}: init-only → distilled" for n in names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for r in rows:
        cells = [f"{r[n].get('init_only', float('nan')):.3f} → {r[n]['student']:.3f}"
                 if "init_only" in r[n] else f"— → {r[n]['student']:.3f}" for n in names]
        print(f"| 3 × {r['width']} | {r['init']} | {r['steps']} | {r['minutes']:.1f} "
              f"({r['load']:.1f}) | " + " | ".join(cells) + " |")
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"teacher": teacher, "config": CONFIG, "texts": texts, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
