"""Communication per distillation step under data parallelism and FSDP, and predicted scaling.

    python bench/comm_model.py                      # BERT-base teacher → 6-layer student, seq 512
    python bench/comm_model.py --json               # the same as JSON lines

Two sources, printed side by side:

1. XLA. The real step (`distil_step`, as training jits it) is compiled for 8 simulated CPU devices
   under `data=8` and under `fsdp=8`; every collective in the optimised HLO is counted with the
   bytes it moves per device (ring algorithms: all-reduce 2·(n−1)/n·S, all-gather and
   reduce-scatter (n−1)/n·S of the full size S, all-to-all (n−1)/n·S), times the trip count of
   every loop it sits in. Compiling needs no accelerator, so this part is measured, here.
2. A hand model of the same collectives from parameter counts, checked against (1) at 8 devices
   and extended to 64 and 256, with a time model of an H100 cluster (NVLink inside 8-GPU nodes,
   InfiniBand between them) and the step's useful FLOPs at an assumed MFU: predicted scaling
   efficiency, without and with overlap of communication and compute. Every assumption is a flag.
"""

import argparse
import json
import math
import os
import re
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import step_throughput  # noqa: E402

from distil_flax.model import init_fn  # noqa: E402
from distil_flax.training import flops, partitioning  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")


# ------------------------------------------------------------------------------------------------
# 1. Collectives in compiled HLO


def _shape_bytes(text: str) -> int:
    """Bytes of an HLO result type: `f32[768,3072]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"\b(pred|[sfu]\d+|bf16)\[([\d,]*)\]", text):
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _group_size(attributes: str, devices: int) -> int:
    """Participants per replica group, from any of XLA's three spellings."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
    if listed:
        return len(listed.group(1).split(","))
    return devices  # replica_groups={}: everyone.


def _moved_bytes(op: str, result_bytes: int, n: int) -> float:
    """Bytes one device sends (= receives) in a ring implementation of `op` over n devices."""
    if n <= 1:
        return 0.0
    if op == "all-reduce":
        return 2 * (n - 1) / n * result_bytes
    if op == "reduce-scatter":
        return (n - 1) * result_bytes  # The result is one shard of n.
    if op == "collective-permute":
        return float(result_bytes)
    return (n - 1) / n * result_bytes  # all-gather (result is whole), all-to-all.


def collectives(hlo: str, devices: int) -> list[dict]:
    """Every collective of an optimised HLO module with its per-device bytes and loop trips."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None:
            computations[current].append(line)
    found: list[dict] = []

    def visit(name: str, trips: int, seen: tuple):
        for line in computations.get(name, []):
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            result_type, op, rest = match.groups()
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base in COLLECTIVES:
                n = _group_size(rest, devices)
                size = _shape_bytes(result_type)
                if op.endswith("-start"):  # Async pairs: the result tuple repeats the operands.
                    size //= 2
                found.append({"op": base, "group": n, "result_bytes": size, "trips": trips,
                              "bytes_per_device": trips * _moved_bytes(base, size, n),
                              "computation": name,
                              "source": (re.search(r'op_name="([^"]*)"', rest) or [None, ""])[1]})
            loop_trips = 1
            if op == "while":
                count = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
                loop_trips = int(count.group(1)) if count else 1
            for callee in re.findall(r"(?:body|condition|calls|to_apply)=%([\w.\-]+)", rest):
                if callee not in seen:
                    visit(callee, trips * (loop_trips if f"body=%{callee}" in rest else 1),
                          seen + (callee,))
            branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
            for callee in re.findall(r"%([\w.\-]+)", branches.group(1) if branches else ""):
                visit(callee, trips, seen + (callee,))

    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    visit(entry, 1, (entry,))
    return found


def xla_collectives(shape_args: list[str], mesh: str, batch: int, mode: str,
                    head_chunk: int) -> dict:
    """Compiles the step for `mesh` on the simulated devices; sums its collectives by kind."""
    args = step_throughput.parse_args(shape_args + [f"--mesh={mesh}", "--steps=1", "--warmup=0"])
    bench = step_throughput.Bench(
        args, batch=batch, seq=args.seq[0], mode=mode, attention="xla",
        attention_mask="lengths", head_chunk=head_chunk, remat="none", allocate=False)
    found = collectives(bench.step.as_text(), jax.device_count())
    by_op: dict[str, float] = {}
    for c in found:
        by_op[c["op"]] = by_op.get(c["op"], 0.0) + c["bytes_per_device"]
    in_loops = sum(c["bytes_per_device"] for c in found if c["trips"] > 1)
    return {"mesh": mesh, "batch": batch, "accum": args.accum, "mode": mode,
            "head_chunk": head_chunk, "bytes_per_device": sum(by_op.values()), "by_op": by_op,
            "bytes_in_loops": in_loops, "collectives": len(found),
            "largest": sorted(found, key=lambda c: -c["bytes_per_device"])[:8],
            "student_params": _count(bench.state.params),
            "teacher_params": _count(bench.teacher_params)}


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _one_device_mesh():
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    return mesh, partitioning.DEFAULT_RULES


# ------------------------------------------------------------------------------------------------
# 2. Hand model and scaling prediction


def hand_model(strategy: str, n: int, student_params: int, teacher_params: int, accum: int,
               reduce_every_micro_batch: bool) -> dict[str, float]:
    """Per-device bytes per optimizer step, ring algorithms over n devices.

    data: an all-reduce of the float32 gradients. fsdp: an all-gather of the student's float32
    and the teacher's bfloat16 parameters (once per step: they do not change between
    micro-batches, and XLA hoists the gathers out of the accumulation loop) and a reduce-scatter
    of the gradients. Gradients are reduced once per step after local accumulation, or — as
    XLA compiles `distil_step`'s accumulation loop today — after every micro-batch.
    """
    s, t = 4 * student_params, 2 * teacher_params
    reductions = accum if reduce_every_micro_batch else 1
    if strategy == "data":
        return {"all-reduce": reductions * 2 * (n - 1) / n * s}
    return {"all-gather": (n - 1) / n * (s + t), "reduce-scatter": reductions * (n - 1) / n * s}


def collective_seconds(op: str, full_bytes: float, n: int, a: argparse.Namespace) -> float:
    """Hierarchical collective on an n-GPU cluster of `a.gpus_per_node`-GPU nodes.

    Inside a node over NVLink, between nodes over each GPU's own NIC: an all-gather of S bytes
    moves (g−1)/g·S per GPU on NVLink and (m−1)/(g·m)·S on the NIC (m nodes of g GPUs), in
    (g−1) + (m−1) ring steps of `a.hop_latency_us` each; reduce-scatter the same; all-reduce is
    both.
    """
    g = min(n, a.gpus_per_node)
    m = max(1, n // a.gpus_per_node)
    one = ((g - 1) / g * full_bytes / (a.nvlink_gbps * 1e9)
           + (m - 1) / (g * m) * full_bytes / (a.nic_gbps * 1e9)
           + (g - 1 + m - 1) * a.hop_latency_us * 1e-6)
    return 2 * one if op == "all-reduce" else one


def scaling(a: argparse.Namespace, student_params: int, teacher_params: int,
            flops_per_token: float) -> list[dict]:
    rows = []
    s, t = 4 * student_params, 2 * teacher_params
    for n in a.chips:
        per_chip = a.global_batch // n
        micro = min(per_chip, a.micro_batch)
        accum = max(1, per_chip // micro)
        compute = per_chip * a.seq * flops_per_token / (a.peak_tflops * 1e12 * a.mfu)
        for strategy in ("data", "fsdp"):
            for every_micro in (False, True):
                reductions = accum if every_micro else 1
                if strategy == "data":
                    comm = reductions * collective_seconds("all-reduce", s, n, a)
                else:
                    comm = (collective_seconds("all-gather", s + t, n, a)
                            + reductions * collective_seconds("reduce-scatter", s, n, a))
                moved = sum(hand_model(strategy, n, student_params, teacher_params, accum,
                                       every_micro).values())
                rows.append({
                    "chips": n, "strategy": strategy,
                    "gradient_reduction": "every micro-batch" if every_micro else "once per step",
                    "sequences_per_chip": per_chip, "accum": accum, "bytes_per_device": moved,
                    "compute_ms": 1e3 * compute, "comm_ms": 1e3 * comm,
                    "efficiency_no_overlap": compute / (compute + comm),
                    "efficiency_overlap": compute / max(compute, comm),
                })
    return rows


# ------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="", help="extra bench/step_throughput.py shape flags, "
                   "e.g. '--vocab=128 --hidden=32 ...' (default: BERT-base → 6 layers)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--xla_batch", type=int, default=16, help="global batch compiled for 8 devices")
    p.add_argument("--xla_accum", type=int, default=2,
                   help="micro-batches in the compiled step (shows what repeats per micro-batch)")
    p.add_argument("--mode", default="all")
    p.add_argument("--head_chunk", type=int, default=128)
    p.add_argument("--skip_xla", action="store_true", help="hand model only")
    model = p.add_argument_group("scaling assumptions (H100 cluster)")
    model.add_argument("--chips", type=lambda s: [int(v) for v in s.split(",")],
                       default=[8, 64, 256])
    model.add_argument("--global_batch", type=int, default=4096,
                       help="sequences per optimizer step (the recipe's 4K)")
    model.add_argument("--micro_batch", type=int, default=64, help="sequences per chip per pass")
    model.add_argument("--peak_tflops", type=float, default=789.0,
                       help="bf16 matmul peak per chip (measured H100, DESIGN.md)")
    model.add_argument("--mfu", type=float, default=0.54, help="assumed MFU (the issue's target)")
    model.add_argument("--gpus_per_node", type=int, default=8)
    model.add_argument("--nvlink_gbps", type=float, default=450.0,
                       help="NVLink GB/s per GPU per direction (H100 SXM: 900 GB/s both ways)")
    model.add_argument("--nic_gbps", type=float, default=50.0,
                       help="inter-node GB/s per GPU per direction (one 400 Gb/s NIC per GPU)")
    model.add_argument("--hop_latency_us", type=float, default=10.0,
                       help="latency of one ring step (collectives combined into one per kind)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of tables")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    shape_args = a.shape.split() + [f"--seq={a.seq}", f"--accum={a.xla_accum}"]
    sizes = step_throughput.parse_args(shape_args)
    teacher, student = step_throughput.make_models(sizes, "xla", "lengths", "none", a.seq)
    fraction = 1.0 if a.mode == "all" else 0.15
    flops_per_token = flops.step_flops_per_token(student, teacher, a.seq, fraction, fraction)
    measured = []
    if not a.skip_xla:
        for mesh in ("data=8,fsdp=1,tensor=1", "data=1,fsdp=8,tensor=1"):
            measured.append(xla_collectives(shape_args, mesh, a.xla_batch, a.mode, a.head_chunk))
        student_params = measured[0]["student_params"]
        teacher_params = measured[0]["teacher_params"]
    else:
        student_params = _count(partitioning.abstract_params(
            init_fn(student), *_one_device_mesh()))
        teacher_params = _count(partitioning.abstract_params(
            init_fn(teacher), *_one_device_mesh()))
    rows = scaling(a, student_params, teacher_params, flops_per_token)
    if a.json:
        for record in measured + rows:
            print(json.dumps(record))
        return
    print(f"Student {student_params / 1e6:.1f} M parameters, teacher {teacher_params / 1e6:.1f} M; "
          f"{flops_per_token / 1e9:.3f} GFLOP per token (mode {a.mode}, seq {a.seq}).\n")
    if measured:
        print(f"XLA, 8 simulated devices, global batch {a.xla_batch} in {a.xla_accum} "
              "micro-batches (MB per device per optimizer step):\n")
        print("| mesh | total | " + " | ".join(COLLECTIVES) + " | inside loops | hand model: "
              "reduce once / every micro-batch |")
        print("|---|---|" + "---|" * len(COLLECTIVES) + "---|---|")
        for m in measured:
            strategy = "data" if m["mesh"].startswith("data=8") else "fsdp"
            hand = [sum(hand_model(strategy, 8, student_params, teacher_params, m["accum"],
                                   every).values()) / 1e6 for every in (False, True)]
            cells = " | ".join(f"{m['by_op'].get(op, 0) / 1e6:.1f}" for op in COLLECTIVES)
            print(f"| {m['mesh']} | {m['bytes_per_device'] / 1e6:.1f} | {cells} | "
                  f"{m['bytes_in_loops'] / 1e6:.1f} | {hand[0]:.1f} / {hand[1]:.1f} |")
        print()
        for m in measured:
            print(f"Largest collectives under {m['mesh']}:")
            for c in m["largest"]:
                print(f"  {c['op']:>14} {c['result_bytes'] / 1e6:9.2f} MB × {c['trips']} trips "
                      f"over {c['group']}: {c['bytes_per_device'] / 1e6:9.2f} MB  "
                      f"({c['source'][-90:]})")
            print()
    print(f"Predicted, H100 cluster: {a.global_batch} × {a.seq} tokens per step, micro-batch "
          f"≤ {a.micro_batch} per GPU, MFU {a.mfu:.0%} of {a.peak_tflops:.0f} TFLOP/s, NVLink "
          f"{a.nvlink_gbps:.0f} GB/s, NIC {a.nic_gbps:.0f} GB/s per GPU:\n")
    print("| chips | strategy | gradients reduced | seq/chip | micro-batches | MB/device/step "
          "| compute ms | comm ms | efficiency (no overlap) | efficiency (full overlap) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["accum"] == 1 and r["gradient_reduction"] != "once per step":
            continue  # One micro-batch: the same row.
        print(f"| {r['chips']} | {r['strategy']} | {r['gradient_reduction']} | "
              f"{r['sequences_per_chip']} | {r['accum']} | "
              f"{r['bytes_per_device'] / 1e6:.0f} | {r['compute_ms']:.1f} | {r['comm_ms']:.2f} | "
              f"{r['efficiency_no_overlap']:.1%} | {r['efficiency_overlap']:.1%} |")


if __name__ == "__main__":
    main()
