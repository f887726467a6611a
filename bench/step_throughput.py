"""Throughput of our distillation step on random weights and random token ids.

    python bench/step_throughput.py --mode=all,masked --batch=64 --seq=512
    python bench/step_throughput.py --recipe=minilm --student_hidden=384 \
        --student_intermediate=1536 --mode=all
    python bench/step_throughput.py --recipe=tinybert --student_layers=4 --student_hidden=312 \
        --student_intermediate=1200 --mode=all

Runs `distil_flax.step.distil_step` — on-device masking, teacher forward (BERT-base shaped, bf16
weights), student forward/backward, the recipe's losses, clipping and AdamW — built as
training builds it: state from `train_state.abstract_state` / `fresh_state`, the optimizer from
`optim.make_optimizer`, the step from `step.jit_steps` (donated state, explicit shardings).
`--recipe` sets the loss: distilbert (the triple loss; `--mode` says where L_ce reads), minilm
(Q/K/V relations of the last layers, `--relation_heads`), tinybert (hidden states, through a
projection when the student is narrower, and attention scores on the uniform layer map); the
commands above give the students of configs/minilm.py and configs/tinybert.py.
Every comma-separated flag value is swept; each configuration prints one JSON line on stdout:

    tokens_per_s, useful_tflops, mfu   from the median step time (FLOPs: distil_flax/flops.py)
    step_ms (+ p10/p90)                 device-synchronised steps after warm-up
    peak_mem_gib                        the allocator's peak (GPU/TPU; null on CPU)
    compiled_mem_gib                    XLA's own estimate: arguments + outputs + temporaries

`--find_max_batch` doubles the batch until the step no longer fits; `--breakdown` times the
parts of the step on their own (where step time goes); `--profile_dir` writes a profiler trace.

Imports only jax, flax, optax, numpy and the package modules that need nothing else, so it runs
from a plain checkout (`PYTHONPATH=.`) on a machine without ml_collections or clu.
"""

import argparse
import functools
import gc
import itertools
import json
import os
import statistics
import sys
import time
import traceback
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from shape_args import add_shape_args, comma_list  # noqa: E402

from distil_flax import losses  # noqa: E402
from distil_flax.distill.masking import MaskingSpec, mask_tokens  # noqa: E402
from distil_flax.distill.step import jit_steps  # noqa: E402
from distil_flax.model import (  # noqa: E402
    Encoder,
    attention_kernel,  # noqa: E402
    init_fn,
    remat_policy_name,
)
from distil_flax.training import flops, partitioning, train_state
from distil_flax.training import optimizer as optim

GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_shape_args(p)
    sweep = p.add_argument_group("swept (comma-separated lists)")
    sweep.add_argument("--batch", type=comma_list(int), default=[64], help="sequences per step")
    sweep.add_argument("--seq", type=comma_list(int), default=[512])
    sweep.add_argument("--mode", type=comma_list(str), default=["all", "masked"],
                       help="all: L_ce on every token (released recipe); masked: on the 15%%")
    sweep.add_argument("--attention", type=comma_list(str), default=["auto"],
                       help="model.attention_impl: auto|xla|cudnn|splash|einsum")
    sweep.add_argument("--attention_mask", type=comma_list(str), default=["lengths"],
                       help="model.attention_mask: lengths (rows are one sequence, as here) | "
                            "segments (packed rows)")
    sweep.add_argument("--head_chunk", type=comma_list(int), default=[128],
                       help="loss.head_chunk: positions per chunk of the fused head; 0: plain")
    sweep.add_argument("--remat", type=comma_list(str), default=["none"],
                       help="model.remat: none|full|dots_saveable|dots_with_no_batch_dims_saveable")
    p.add_argument("--recipe", default="distilbert", choices=RECIPES, help="the loss")
    p.add_argument("--relation_heads", type=int, default=48, help="minilm's relation heads")
    p.add_argument("--student_hidden", type=int, default=0, help="0: the teacher's --hidden")
    p.add_argument("--student_intermediate", type=int, default=0,
                   help="0: the teacher's --intermediate")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype of both models")
    p.add_argument("--teacher_dtype", default="bfloat16", help="teacher parameter dtype")
    p.add_argument("--segments", type=int, default=1,
                   help="documents packed per row (>1 needs --attention_mask=segments)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1", help="mesh axis sizes")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="device bf16 peak for MFU; 0: look up the device kind")
    p.add_argument("--find_max_batch", action="store_true",
                   help="double the batch from --batch until the step fails to fit")
    p.add_argument("--breakdown", action="store_true",
                   help="also time masking, teacher, student, heads+loss and optimizer alone")
    p.add_argument("--profile_dir", default="", help="write a jax.profiler trace of 5 steps here")
    p.add_argument("--compile_only", action="store_true",
                   help="compile on abstract inputs (nothing allocated) and report XLA's memory "
                        "estimate; runs anywhere, e.g. full size on a CPU")
    args = p.parse_args(argv)
    if args.breakdown and args.recipe != "distilbert":
        p.error("--breakdown times the parts of the distilbert recipe's step only")
    if args.segments > 1 and "lengths" in args.attention_mask:
        p.error("--segments > 1 packs several documents per row: use --attention_mask=segments")
    return args


# ------------------------------------------------------------------------------------------------
# Models, state and data


RECIPES = ("distilbert", "minilm", "tinybert")


def make_models(args, attention: str, attention_mask: str, remat: str, seq: int):
    common = dict(vocab_size=args.vocab, num_heads=args.heads,
                  max_position_embeddings=max(512, seq), attention_impl=attention,
                  attention_mask=attention_mask, dtype=jnp.dtype(args.dtype))
    teacher = Encoder(num_layers=args.teacher_layers, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, type_vocab_size=2, use_pooler=True,
                      head_style="bert", **common)
    student = Encoder(num_layers=args.student_layers,
                      hidden_size=args.student_hidden or args.hidden,
                      intermediate_size=args.student_intermediate or args.intermediate,
                      type_vocab_size=0, use_pooler=False,
                      head_style="distilbert", remat=remat, **common)
    return teacher, student


def recipe_loss(args, mode: str, head_chunk: int, student: Encoder, teacher: Encoder
                ) -> losses.LossSpec:
    """The loss of `--recipe`, as its config resolves it (`train.loss_spec`)."""
    if args.recipe == "distilbert":
        return losses.LossSpec(restrict_ce_to_mask=mode == "masked", head_chunk=head_chunk)
    no_heads = dict(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0)
    if args.recipe == "minilm":
        return losses.LossSpec(**no_heads, relations=losses.Relations(
            weight=1.0, heads=args.relation_heads, student_layer=student.num_layers - 1,
            teacher_layer=teacher.num_layers - 1))
    pairs = losses.layer_pairs((), student.num_layers, teacher.num_layers)
    return losses.LossSpec(
        **no_heads,
        hidden_states=losses.HiddenStates(weight=1.0,
                                          pairs=losses.hidden_state_pairs(pairs, True)),
        attention_scores=losses.AttentionScores(weight=1.0, pairs=pairs))


def masking_spec(vocab: int) -> MaskingSpec:
    # bert-base-uncased's [PAD] [UNK] [CLS] [SEP] [MASK] ids, when the vocabulary is that large.
    specials = (0, 100, 101, 102, 103) if vocab > 103 else (0, 1, 2, 3, 4)
    return MaskingSpec(mask_id=specials[-1], vocab_size=vocab, special_ids=specials)


# The PyTorch peer's optimizer settings (peer_pytorch.py: clip 5.0, AdamW), in the fields of a
# config's `train` section, so that the optimizer and its schedule are training's own
# (`optim.make_optimizer`). The shortest warmup (the first update, at rate 0: the same work) and
# a long run: the rate stays at ≈ 1e-4 over the timed steps, as the peer's constant one.
PEER_OPTIMIZER = types.SimpleNamespace(learning_rate=1e-4, warmup_fraction=0.0, clip_norm=5.0,
                                       b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01)
PEER_RUN_STEPS = 1_000_000


def make_teacher_params(teacher: Encoder, mesh, rules, dtype, allocate: bool):
    """Random teacher parameters in their shardings, stored as `dtype` (`partitioning.cast`, as
    training casts its loaded teacher); abstract unless `allocate`."""
    if not allocate:
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding),
            partitioning.abstract_params(init_fn(teacher), mesh, rules))
    params, _ = partitioning.sharded_init(init_fn(teacher), jax.random.PRNGKey(0), mesh, rules)
    return partitioning.cast(params, dtype)


def make_batch(rng: np.random.Generator, args, accum: int, batch: int, seq: int,
               masking: MaskingSpec) -> dict[str, np.ndarray]:
    """Random rows [accum, batch, seq]: ordinary token ids, `--segments` documents per row."""
    ids = rng.integers(max(masking.special_ids) + 1, args.vocab, size=(accum, batch, seq))
    doc = -(-seq // args.segments)
    index = np.arange(seq)
    segment_ids = np.broadcast_to(index // doc + 1, ids.shape)
    positions = np.broadcast_to(index % doc, ids.shape)
    return {"input_ids": ids.astype(np.int32), "segment_ids": segment_ids.astype(np.int32),
            "positions": positions.astype(np.int32)}


class Bench:
    """One configuration: models, state, compiled step and inputs, ready to time.

    With `allocate=False` the state, teacher and batch are abstract (shapes and shardings only):
    the step is compiled, for inspection, but cannot run.
    """

    def __init__(self, args, *, batch: int, seq: int, mode: str, attention: str,
                 attention_mask: str, head_chunk: int, remat: str, allocate: bool = True):
        self.args, self.batch, self.seq, self.mode = args, batch, seq, mode
        sizes = dict(item.split("=") for item in args.mesh.split(","))
        self.mesh = partitioning.make_mesh({k: int(v) for k, v in sizes.items()})
        self.rules = partitioning.DEFAULT_RULES
        self.teacher, self.student = make_models(args, attention, attention_mask, remat, seq)
        self.masking = masking_spec(args.vocab)
        self.loss = recipe_loss(args, mode, head_chunk, self.student, self.teacher)
        projections = losses.projection_init(self.loss, self.student.hidden_size,
                                             self.teacher.hidden_size)
        self.optimizer, schedule = optim.make_optimizer(PEER_OPTIMIZER, PEER_RUN_STEPS)
        replicated = partitioning.replicated(self.mesh)
        batch_sharding = partitioning.batch_sharding(self.mesh, self.rules, leading_dims=1)
        micro = batch // args.accum
        self.teacher_params = make_teacher_params(
            self.teacher, self.mesh, self.rules, jnp.dtype(args.teacher_dtype), allocate)
        abstract = train_state.abstract_state(
            partitioning.abstract_params(init_fn(self.student), self.mesh, self.rules),
            self.optimizer, replicated,
            partitioning.abstract_params(projections, self.mesh, self.rules))
        # Frequency smoothing on (as the recipe), with uniform weights: same code path.
        weights = np.ones((args.vocab,), np.float32)
        if allocate:
            params, _ = partitioning.sharded_init(
                init_fn(self.student), jax.random.PRNGKey(1), self.mesh, self.rules)
            projection_params, _ = partitioning.sharded_init(
                projections, jax.random.PRNGKey(3), self.mesh, self.rules)
            self.state = train_state.fresh_state(params, self.optimizer, abstract,
                                                 jax.random.PRNGKey(2), projection_params)
            self.token_weights = jax.device_put(weights, replicated)
            rng = np.random.default_rng(0)
            self.batches = [
                partitioning.host_to_global(
                    make_batch(rng, args, args.accum, micro, seq, self.masking), batch_sharding)
                for _ in range(2)]
        else:
            self.state = abstract
            self.token_weights = jax.ShapeDtypeStruct(weights.shape, weights.dtype,
                                                      sharding=replicated)
            self.batches = [{k: jax.ShapeDtypeStruct((args.accum, micro, seq), jnp.int32,
                                                     sharding=batch_sharding)
                             for k in ("input_ids", "segment_ids", "positions")}]
        self.context = functools.partial(partitioning.mesh_context, self.mesh, self.rules)
        step, _ = jit_steps(
            student=self.student, teacher=self.teacher, optimizer=self.optimizer,
            schedule=schedule, masking=self.masking, loss=self.loss, mesh=self.mesh,
            rules=self.rules, state_shardings=train_state.shardings_of(abstract),
            teacher_shardings=train_state.shardings_of(self.teacher_params))
        start = time.perf_counter()
        with self.context():
            self.step = step.lower(self.state, self.teacher_params, self.batches[0],
                                   self.token_weights).compile()
        self.compile_s = time.perf_counter() - start

    def run(self, steps: int) -> tuple[list[float], dict]:
        """Runs `steps` steps, each synchronised; returns their times (s) and the last metrics."""
        times, metrics = [], {}
        for i in range(steps):
            start = time.perf_counter()
            self.state, metrics = self.step(self.state, self.teacher_params,
                                            self.batches[i % 2], self.token_weights)
            jax.block_until_ready((self.state, metrics))
            times.append(time.perf_counter() - start)
        return times, metrics

    def flops_per_token(self) -> float:
        """Useful FLOPs: the encoders and the MLM heads where a loss reads them (none in the
        feature-only recipes, whose relation terms are not counted)."""
        fraction = 1.0 if self.mode == "all" else self.masking.mask_prob
        if not self.loss.uses_heads:
            fraction = 0.0
        return flops.step_flops_per_token(self.student, self.teacher, self.seq, fraction, fraction)

    def attention_selected(self) -> str:
        return attention_kernel(self.student, self.seq, train=True)


# ------------------------------------------------------------------------------------------------
# Measurements


def _peak_memory_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None  # CPU.
    return stats["peak_bytes_in_use"] / GIB


def _compiled_memory_gib(compiled) -> float | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    return total / GIB


def _summary(times_s: list[float]) -> dict[str, float]:
    ms = sorted(t * 1e3 for t in times_s)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return {"step_ms": statistics.median(ms), "step_ms_p10": pick(0.1), "step_ms_p90": pick(0.9)}


def measure(bench: Bench, args) -> dict:
    """Warm-up, then `args.steps` timed steps; the JSON record of one configuration."""
    bench.run(args.warmup)
    times, metrics = bench.run(args.steps)
    if args.profile_dir:
        with jax.profiler.trace(args.profile_dir):
            bench.run(5)
    timing = _summary(times)
    devices = jax.device_count()
    tokens_per_s = bench.batch * bench.seq / (timing["step_ms"] / 1e3)
    useful = tokens_per_s * bench.flops_per_token()
    peak = flops.peak_flops(jax.devices()[0], args.peak_tflops)
    return {
        "system": "distil_flax", "device": jax.devices()[0].device_kind, "devices": devices,
        "recipe": args.recipe, "student_hidden": bench.student.hidden_size, "mode": bench.mode,
        "batch": bench.batch, "seq": bench.seq, "accum": args.accum,
        "attention": bench.student.attention_impl, "attention_selected": bench.attention_selected(),
        "attention_mask": bench.student.attention_mask, "head_chunk": bench.loss.head_chunk,
        "remat": remat_policy_name(bench.student.remat), "dtype": args.dtype,
        "teacher_dtype": args.teacher_dtype, "segments": args.segments,
        "tokens_per_s": tokens_per_s, "useful_tflops": useful / 1e12,
        "mfu": useful / (peak * devices) if peak else None,
        "peak_mem_gib": _peak_memory_gib(), "compiled_mem_gib": _compiled_memory_gib(bench.step),
        **timing, "compile_s": bench.compile_s, "loss": float(metrics["loss"]),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
    }


def compile_only(args, config: dict) -> dict:
    """XLA's memory estimate of the step, from a compilation on abstract inputs."""
    bench = Bench(args, **config, allocate=False)
    analysis = bench.step.memory_analysis()
    return {"system": "distil_flax", "kind": "compile_only", "device": jax.devices()[0].device_kind,
            "devices": jax.device_count(), **config, "accum": args.accum,
            "attention_selected": bench.attention_selected(),
            "compiled_mem_gib": _compiled_memory_gib(bench.step),
            "temp_gib": analysis.temp_size_in_bytes / GIB,
            "argument_gib": analysis.argument_size_in_bytes / GIB,
            "compile_s": bench.compile_s}


def _fits(error: Exception) -> bool:
    text = str(error)
    return not any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))


def find_max_batch(args, config: dict) -> dict:
    """Doubles the batch until compilation or a step runs out of memory."""
    if jax.default_backend() == "cpu":
        raise SystemExit("--find_max_batch needs a GPU or TPU: host memory sets no useful limit")
    batch, largest, reason = config["batch"], None, ""
    while True:
        try:
            bench = Bench(args, **{**config, "batch": batch})
            bench.run(2)
            largest = batch
        except Exception as error:  # noqa: BLE001 — any OOM surfaces as a runtime error.
            if _fits(error):
                raise
            reason = str(error).splitlines()[0][:200]
            break
        finally:
            bench = None
            gc.collect()
        batch *= 2
    return {"system": "distil_flax", "kind": "max_batch", **config, "max_batch": largest,
            "failed_at": batch, "failure": reason}


def breakdown(bench: Bench, args) -> dict:
    """Times the step's parts as separate programs, one micro-batch each (where step time goes).

    Parts: masking; teacher encoder forward; student encoder forward + backward; both MLM heads
    with L_ce and L_mlm, forward + backward (the teacher's vocabulary projection included); the
    optimizer update. Separate programs lose cross-part fusion, so their sum exceeds the step.
    """
    student, teacher, loss, masking = bench.student, bench.teacher, bench.loss, bench.masking
    on_all = bench.mode == "all"
    micro = jax.tree.map(lambda x: x[0], bench.batches[0])
    rng = jax.random.PRNGKey(0)

    def do_masking(rng, micro, token_weights):
        return mask_tokens(rng, micro["input_ids"], micro["segment_ids"], masking, token_weights)

    def inputs(masked, micro):
        return masked["input_ids"], micro["segment_ids"], micro["positions"]

    def teacher_forward(teacher_params, masked, micro):
        return teacher.apply({"params": teacher_params}, *inputs(masked, micro))[1]["hidden"]

    def student_forward_backward(params, masked, micro, cotangent):
        def f(p):
            _, out = student.apply({"params": p}, *inputs(masked, micro), train=True,
                                   rngs={"dropout": rng})
            return jnp.vdot(out["hidden"].astype(jnp.float32), cotangent)
        return jax.grad(f)(params)

    def heads_and_losses(params, teacher_params, student_hidden, teacher_hidden, masked, micro):
        positions = masked["mlm_positions"]
        real = (micro["segment_ids"] > 0).astype(jnp.float32)

        def rows(hidden):
            return hidden if on_all else jnp.take_along_axis(hidden, positions[..., None], 1)

        def slots(x):
            return jnp.take_along_axis(x, positions[..., None], 1) if on_all else x

        method = Encoder.mlm_head_inputs if loss.head_chunk else Encoder.mlm_logits
        teacher_head = jax.lax.stop_gradient(
            teacher.apply({"params": teacher_params}, rows(teacher_hidden), method=method))
        common = dict(ce_weights=real if on_all else masked["mlm_weights"],
                      mlm_labels=masked["mlm_labels"], mlm_weights=masked["mlm_weights"],
                      teacher_hidden=teacher_hidden, token_weights=real)

        def f(p, student_hidden):
            head = student.apply({"params": p}, rows(student_hidden), method=method)
            if loss.head_chunk:
                return losses.fused_distillation_loss(
                    loss, student_head=head, teacher_head=teacher_head,
                    label_positions=positions if on_all else None,
                    student_hidden=student_hidden, **common)[0]
            return losses.distillation_loss(
                loss, student_logits=head, teacher_logits=teacher_head,
                student_mlm_logits=slots(head), teacher_mlm_logits=slots(teacher_head),
                student_hidden=student_hidden, **common)[0]
        return jax.grad(f, argnums=(0, 1))(params, student_hidden)

    params, teacher_params = bench.state.params, bench.teacher_params
    with bench.context():
        masked = jax.jit(do_masking)(rng, micro, bench.token_weights)
        teacher_hidden = jax.jit(teacher_forward)(teacher_params, masked, micro)
    student_hidden = teacher_hidden.astype(student.dtype)
    parts = {
        "masking": (do_masking, (rng, micro, bench.token_weights)),
        "teacher_forward": (teacher_forward, (teacher_params, masked, micro)),
        "student_forward_backward": (
            student_forward_backward,
            (params, masked, micro, jnp.ones(student_hidden.shape, jnp.float32))),
        "heads_and_losses": (heads_and_losses, (params, teacher_params, student_hidden,
                                                teacher_hidden, masked, micro)),
        "optimizer": (bench.optimizer.update,
                      (jax.tree.map(jnp.zeros_like, params), bench.state.opt_state, params)),
    }
    result = {}
    for name, (fn, fn_args) in parts.items():
        with bench.context():
            compiled = jax.jit(fn).lower(*fn_args).compile()
        for _ in range(args.warmup):
            jax.block_until_ready(compiled(*fn_args))
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*fn_args))
            times.append(time.perf_counter() - start)
        result[name] = _summary(times)["step_ms"]
    return {"system": "distil_flax", "kind": "breakdown", "mode": bench.mode,
            "batch": bench.batch // args.accum, "seq": bench.seq, "head_chunk": loss.head_chunk,
            "attention_selected": bench.attention_selected(), "parts_ms": result,
            "sum_ms": sum(result.values())}


def _failure(config: dict, error: Exception, kind: str | None) -> dict:
    """The record of a configuration that did not run; the sweep goes on without it."""
    first_line = (str(error).splitlines() or [""])[0][:300]
    reason = "out of memory: " if not _fits(error) else f"{type(error).__name__}: "
    return {"system": "distil_flax", **({"kind": kind} if kind else {}),
            "device": jax.devices()[0].device_kind, **config, "error": reason + first_line}


def main(argv=None) -> int:
    """Runs the sweep; returns 1 if a configuration failed other than by running out of memory.

    A failing configuration (a kernel this GPU's cuDNN lacks, say) is recorded with its error
    and the sweep continues: one bad configuration must not cost the rest of a GPU session.
    """
    args = parse_args(argv)
    keys = ("batch", "seq", "mode", "attention", "attention_mask", "head_chunk", "remat")
    kind = "max_batch" if args.find_max_batch else "compile_only" if args.compile_only else None
    failed = False
    for values in itertools.product(*(getattr(args, k) for k in keys)):
        config = dict(zip(keys, values))
        if config["batch"] % args.accum:
            raise SystemExit(f"--batch={config['batch']} is not a multiple of --accum={args.accum}")
        bench = None
        try:
            if args.find_max_batch:
                record = find_max_batch(args, config)
            elif args.compile_only:
                record = compile_only(args, config)
            else:
                bench = Bench(args, **config)
                record = measure(bench, args)
        except Exception as error:  # noqa: BLE001 — recorded, and the sweep goes on.
            if _fits(error):
                traceback.print_exc()
                failed = True
            record, bench = _failure(config, error, kind), None
        print(json.dumps(record), flush=True)
        if args.breakdown and bench is not None:
            try:
                parts = breakdown(bench, args)
                parts["step_ms"] = record["step_ms"] / args.accum  # One micro-batch's share.
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                failed = True
                parts = _failure(config, error, "breakdown")
            print(json.dumps(parts), flush=True)
        bench = None
        gc.collect()
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
