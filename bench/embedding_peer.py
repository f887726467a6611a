"""Our sentence-embedding distillation beside sentence-transformers' own recipe: the same teacher,
student layers, corpus, training texts and minutes, scored the same way, in one table.

    python bench/offline_text.py --out=runs/embed_text     # held-out text of other domains
    T=runs/embed_text
    taskset -c 1 python bench/embedding_peer.py --minutes=10 --cores=1 --threads=1 \
        --workdir=runs/embedding_peer --labelled=$T/topics.tsv \
        --more_text=$T/fortunes.txt,$T/definitions.txt,$T/stories.txt,$T/manual.txt \
        --output=bench/results/embedding_peer.json
    python bench/embedding_peer.py --minutes=8 --ours=none          # the peer alone

One run, on the first --cores cores this process may use (both trainings inherit them):
  1. The peer: `bench/peer_sentence_transformers.py` for --minutes on --threads torch threads —
     all-MiniLM-L6-v2 with all but the layers of our config's `init.layer_map` removed,
     MSELoss against the teacher's sentence embeddings, on the bundled corpus cut into the
     texts our preparation cuts it into (`--max_len` = our config's `data.max_len`: whole
     sentences grouped while they fit, from sentences to ~250-token passages), so that both
     train on the same texts. It also saves its student as it started (the init-only student).
  2. Ours: `python -m distil_flax.main --config=OURS --workdir=WORKDIR/ours
     --config.train.num_steps=N`, with its held-out evaluation and checkpoint only at the end
     (the peer does neither along the way). Our run is bounded by steps, so N is chosen for our
     whole command to take as long as the peer's whole command took (both include starting
     up, loading the teacher and saving): a calibration run of --calibration_steps measures our
     step time (the median `train/step_time_s` after the first logged interval, which holds the
     compilation) and the rest of the command's time; N = (peer's seconds − the rest) / step
     time. --ours_steps=N skips the calibration.
  3. Each student against the teacher: `python -m distil_flax.evaluate_embeddings
     --text=WORKDIR/held_out.txt`, --sentences prose sentences of CPython's help topics
     (`recipes.held_out_sentences`), another domain than the training corpus, and on each
     file of --more_text (one sentence or passage a line; `bench/offline_text.py` writes
     quotations, dictionary definitions, and passages of 100–250 words: stories and the GNU
     Texinfo manual). Each text is read up to the teacher's max_seq_length (256), whatever the
     rows either student trained on. With --labelled (`label <TAB> text`, e.g. offline_text's
     topics.tsv), the first evaluation of each system also fits the linear probe
     (`probe_accuracy`: 5-fold logistic regression on frozen embeddings), the teacher's too.

Printed: a markdown table (and, with --output, JSON) of system, minutes (the whole command), load
(the machine's 1-minute load average, sampled every 10 s while it ran, mean: the cores are often
shared), steps, texts and tokens seen in training, the probe's accuracy (with --labelled), and
text_cosine_spearman (Spearman of all pairwise cosine similarities against the teacher's) and
text_recall@10 (of the teacher's nearest neighbours) on each held-out text, with the teacher's
row (its probe) and the init-only student — the teacher with layers removed, before training —
through sentence-transformers' layer removal and, when ours ran, through our
`init_from_teacher` (the two should agree). Texts seen: the peer's are its texts; ours are packed
segments, each a piece of whole sentences of up to `data.max_len` tokens, estimated as our real
tokens seen (the metrics' `train/real_tokens`) over the mean segment length of the prepared
training split. Tokens: real tokens, [CLS] and [SEP] included, padding not. Every run below
--workdir is started afresh.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import threading

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [BENCH, ROOT]

import peer_sentence_transformers as peer  # noqa: E402
from recipes import _run, held_out_sentences  # noqa: E402

OURS = "configs/embed_minilm.py"


def run_sampling_load(command: list[str], log: str, every: float = 10.0) -> tuple[float, float]:
    """`recipes._run` of a command, sampling the machine's 1-minute load average meanwhile;
    returns (minutes, the mean of the samples)."""
    samples, done = [os.getloadavg()[0]], threading.Event()

    def sample():
        while not done.wait(every):
            samples.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        minutes = _run(command, log)
    finally:
        done.set()
        sampler.join()
    return minutes, statistics.mean(samples)


def _fresh(path: str) -> str:
    if os.path.exists(path):
        shutil.rmtree(path)
    return path


def use_cores(count: int) -> list[int]:
    """Restricts this process (and what it starts) to the first `count` of its cores."""
    cores = sorted(os.sched_getaffinity(0))[:count] if count else sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores)
    return cores


def config_layers(config: str) -> tuple[int, ...]:
    """`init.layer_map` of a config file (with its `:preset`)."""
    return tuple(int(i) for i in _load_config(config).init.layer_map)


def piece_flags(config: str | None) -> list[str]:
    """The peer's flags for the texts a config (with its `:preset`) trains on: its
    `data.max_len` and `data.min_len`; none without a config."""
    if not config:
        return []
    data = _load_config(config).data
    return [f"--max_len={data.max_len}", f"--min_len={data.min_len}"]


def _load_config(config: str):
    from distil_flax.training.config_files import load_config

    return load_config(os.path.join(ROOT, config))


def step_seconds(workdir: str) -> float:
    """The median `train/step_time_s` of a run after its first logged interval (compilation)."""
    from distil_flax.training.metric_writers import read_metrics

    times = [r["train/step_time_s"] for r in read_metrics(workdir) if "train/step_time_s" in r]
    if len(times) < 2:
        sys.exit(f"error: {workdir} logged {len(times)} step times; the calibration needs 2 "
                 "or more (raise --calibration_steps)")
    return statistics.median(times[1:])


def seen_by_run(workdir: str) -> dict[str, float]:
    """Real tokens a run trained on (`train/real_tokens` per step × the steps of each logged
    interval) and the segments that makes at the prepared training split's mean segment length.
    """
    from distil_flax.data import load_tokenizer, prepare, records
    from distil_flax.training.config_files import load_json
    from distil_flax.training.metric_writers import read_metrics

    tokens, step = 0.0, 0
    for record in read_metrics(workdir):
        if "train/real_tokens" in record:
            tokens += record["train/real_tokens"] * (record["step"] - step)
            step = record["step"]
    c = load_json(os.path.join(workdir, "config.json"))
    tokenizer = load_tokenizer(c.data.tokenizer, lowercase=c.data.lowercase)
    split = records.PreparedDataset(prepare.default_directory(c.data, tokenizer)).split("train")
    # Pieces longer than a row are cut into several segments, each with its [CLS] and [SEP].
    per_piece = -(-(split.num_tokens // split.num_records) // (c.data.seq_len - 2))
    mean_segment = (split.num_tokens + 2 * per_piece * split.num_records) / (
        per_piece * split.num_records)
    return {"steps": step, "tokens_seen": round(tokens), "segments_seen": round(tokens /
            mean_segment), "mean_segment_tokens": round(mean_segment, 2)}


def evaluate(student: str, teacher: str, text: str, report: str, labelled: str = "") -> dict:
    """evaluate_embeddings' report of a student against the teacher on the held-out text (and
    the probe on `labelled`)."""
    _run([sys.executable, "-m", "distil_flax.evaluate_embeddings", f"--student={student}",
          f"--teacher={teacher}", f"--text={text}", f"--output={report}",
          *([f"--labelled={labelled}"] if labelled else [])],
         report.removesuffix(".json") + ".log")
    with open(report) as f:
        return json.load(f)


def _scores(reports: dict[str, dict], model: str) -> dict:
    """{text: {"text_cosine_spearman", "text_recall@10"}} of one model ("student" or
    "init_only") in one system's reports, a report per held-out text."""
    return {text: {key: report["metrics"][model][key]
                   for key in ("text_cosine_spearman", "text_recall@10")}
            for text, report in reports.items()}


def _probe(reports: dict[str, dict], model: str) -> float | None:
    """The probe accuracy of one model in a system's reports (the first text's), if fitted."""
    first = next(iter(reports.values()))
    return first["metrics"].get(model, {}).get("probe_accuracy")


def format_table(rows: list[dict]) -> str:
    """The rows as a markdown table (— where a row has no value): a probe column when any row
    has one, then a column per held-out text: pairwise-cosine Spearman / recall@10."""
    def cell(value, spec):
        return "—" if value is None else format(value, spec)

    texts = list(next(r["scores"] for r in rows if r.get("scores")))
    probe = any(r.get("probe") is not None for r in rows)
    lines = ["| system | minutes | load | steps | texts seen | tokens seen | "
             + ("probe | " if probe else "")
             + " | ".join(f"{t}: Spearman / recall@10" for t in texts) + " |",
             "|---|---|---|---|---|---|" + "---|" * (len(texts) + probe)]
    for r in rows:
        scores = " | ".join(f"{r['scores'][t]['text_cosine_spearman']:.3f} / "
                            f"{r['scores'][t]['text_recall@10']:.3f}" if r.get("scores")
                            else "1 / 1" for t in texts)
        lines.append(f"| {r['system']} | {cell(r.get('minutes'), '.1f')} | "
                     f"{cell(r.get('load'), '.1f')} | "
                     f"{cell(r.get('steps'), 'd')} | {r.get('texts_seen') or '—'} | "
                     f"{cell(r.get('tokens_seen'), ',d')} | "
                     + (f"{cell(r.get('probe'), '.3f')} | " if probe else "") + f"{scores} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=8.0, help="the peer's training budget")
    p.add_argument("--workdir", default="runs/embedding_peer")
    p.add_argument("--teacher", default="", help="default: the packaged all-MiniLM-L6-v2")
    p.add_argument("--ours", default=OURS, help="our config (with :preset), or none")
    p.add_argument("--ours_steps", default="auto", help="auto (calibrated) or a step count")
    p.add_argument("--calibration_steps", type=int, default=30)
    p.add_argument("--layers", default="", help="the peer's kept layers; default: the --ours "
                   "config's init.layer_map (with --ours=none: the peer script's default)")
    p.add_argument("--cores", type=int, default=2, help="cores for everything; 0: all")
    p.add_argument("--threads", type=int, default=2, help="the peer's torch threads")
    p.add_argument("--sentences", type=int, default=1000, help="held-out sentences")
    p.add_argument("--more_text", default="", help="comma-separated files of held-out "
                   "sentences or passages (one a line) to score on too, e.g. "
                   "bench/offline_text.py's fortunes.txt, definitions.txt, stories.txt and "
                   "manual.txt")
    p.add_argument("--labelled", default="", help="`label <TAB> text` file for the linear "
                   "probe, e.g. bench/offline_text.py's topics.tsv")
    p.add_argument("--peer_max_steps", type=int, default=0, help="also stop the peer here")
    p.add_argument("--output", default="", help="also write the results as JSON here")
    args = p.parse_args(argv)
    ours = None if args.ours == "none" else args.ours
    teacher = args.teacher or peer.default_teacher()
    layers = args.layers or ",".join(map(str, config_layers(ours) if ours
                                          else peer.default_layers()))
    more = [f for f in args.more_text.split(",") if f]
    names = ["pydoc"] + [os.path.splitext(os.path.basename(f))[0] for f in more]
    for f in more:  # Checked now, not after sixteen minutes of training.
        if not os.path.isfile(f):
            sys.exit(f"error: --more_text: {f} is not a file")
    if args.labelled and not os.path.isfile(args.labelled):
        sys.exit(f"error: --labelled: {args.labelled} is not a file")
    if len(set(names)) < len(names):
        sys.exit(f"error: --more_text: the held-out texts need distinct names, got {names}")
    cores = use_cores(args.cores)
    os.makedirs(args.workdir, exist_ok=True)
    text = os.path.join(args.workdir, "held_out.txt")
    texts = dict(zip(names, [text, *more]))
    with open(text, "w") as f:
        f.write("\n".join(held_out_sentences(args.sentences)) + "\n")
    load = os.getloadavg()
    print(f"cores {cores}; load average {load[0]:.1f} at the start", flush=True)

    # ---------------------------------------------------------------------- the peer
    peer_dir = os.path.join(args.workdir, "peer")
    init_dir = os.path.join(args.workdir, "peer_init")
    peer_minutes, peer_load = run_sampling_load(
        [sys.executable, os.path.join(BENCH, "peer_sentence_transformers.py"),
         f"--teacher={teacher}", f"--output={peer_dir}", f"--init_output={init_dir}",
         f"--layers={layers}", f"--minutes={args.minutes}", f"--threads={args.threads}",
         f"--max_steps={args.peer_max_steps}", "--overwrite",
         *piece_flags(ours)], f"{peer_dir}.log")
    with open(f"{peer_dir}.json") as f:
        peer_run = json.load(f)
    print(f"peer: {peer_minutes:.2f} min, {peer_run['steps']} steps", flush=True)

    # ---------------------------------------------------------------------- ours
    ours_run, ours_minutes, ours_load, calibration = None, None, None, None
    if ours:
        workdir = os.path.join(args.workdir, "ours")
        command = [sys.executable, "-m", "distil_flax.main", f"--config={ours}",
                   f"--config.teacher.checkpoint={teacher}"]
        if args.ours_steps == "auto":
            probe = _fresh(os.path.join(args.workdir, "ours_calibration"))
            n = args.calibration_steps
            minutes = _run([*command, f"--workdir={probe}", f"--config.train.num_steps={n}",
                            f"--config.train.eval_every={n}", "--config.train.log_every=5",
                            f"--config.train.checkpoint_every={n}"], f"{probe}.log")
            step = step_seconds(probe)
            fixed = minutes * 60 - n * step
            steps = max(1, int((peer_minutes * 60 - fixed) / step))
            calibration = {"steps": n, "minutes": round(minutes, 2), "step_seconds": step,
                           "fixed_seconds": round(fixed, 1)}
            print(f"calibration: {step:.3f} s a step + {fixed:.0f} s → {steps} steps", flush=True)
        else:
            steps = int(args.ours_steps)
        _fresh(workdir)
        ours_minutes, ours_load = run_sampling_load(
            [*command, f"--workdir={workdir}", f"--config.train.num_steps={steps}",
             f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}"],
            f"{workdir}.log")
        ours_run = seen_by_run(workdir)
        print(f"ours: {ours_minutes:.2f} min, {ours_run['steps']} steps", flush=True)

    # ---------------------------------------------------------------------- evaluation
    def evaluate_all(student: str, name: str) -> dict[str, dict]:
        return {t: evaluate(student, teacher, path, f"{name}.{t}.embeddings.json",
                            args.labelled if i == 0 else "")
                for i, (t, path) in enumerate(texts.items())}

    reports = {"peer": evaluate_all(peer_dir, peer_dir),
               "peer_init": evaluate_all(init_dir, init_dir)}
    if ours:
        reports["ours"] = evaluate_all(workdir, workdir)
    rows = [{"system": "sentence-transformers (torch, MSELoss)", "minutes": peer_minutes,
             "steps": peer_run["steps"], "texts_seen": f"{peer_run['texts_seen']:,} texts",
             "tokens_seen": peer_run["tokens_seen"], "load": peer_load,
             "probe": _probe(reports["peer"], "student"),
             "scores": _scores(reports["peer"], "student")}]
    if ours:
        rows.append({"system": f"distil_flax ({ours})", "minutes": ours_minutes,
                     "steps": ours_run["steps"],
                     "texts_seen": f"≈ {ours_run['segments_seen']:,} segments",
                     "tokens_seen": ours_run["tokens_seen"], "load": ours_load,
                     "probe": _probe(reports["ours"], "student"),
                     "scores": _scores(reports["ours"], "student")})
    rows.append({"system": f"init-only: teacher layers {peer_run['layers']} "
                           "(sentence-transformers)",
                 "probe": _probe(reports["peer_init"], "student"),
                 "scores": _scores(reports["peer_init"], "student")})
    first = reports["ours"]["pydoc"] if ours else {}
    if "init_only" in first.get("metrics", {}):
        rows.append({"system": f"init-only: teacher layers {first['init_only']['layer_map']} "
                               "(distil_flax)", "probe": _probe(reports["ours"], "init_only"),
                     "scores": _scores(reports["ours"], "init_only")})
    if args.labelled:
        rows.append({"system": "teacher (all-MiniLM-L6-v2)",
                     "probe": _probe(reports["peer"], "teacher")})
    end_load = os.getloadavg()
    print(f"\nload average {end_load[0]:.1f} at the end\n")
    print(format_table(rows))
    result = {"teacher": teacher, "layers": [int(i) for i in layers.split(",")],
              "minutes_budget": args.minutes, "cores": cores, "peer_threads": args.threads,
              "load_average": {"start": load, "end": end_load},
              "held_out": {"pydoc": f"{args.sentences} sentences of pydoc_data.topics",
                           **{t: path for t, path in texts.items() if t != "pydoc"}},
              "labelled": args.labelled or None,
              "truncated": {t: r["data"]["text"]["truncated"] for t, r in reports["peer"].items()},
              "peer": peer_run, "ours": ours_run, "ours_config": ours,
              "calibration": calibration, "rows": rows}
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
