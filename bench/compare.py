"""Reads the JSON lines of bench/step_throughput.py and bench/peer_pytorch.py; prints tables.

    python bench/compare.py runs/bench/*.jsonl

One row per distil_flax configuration, beside the PyTorch peer (eager and compiled) at the same
mode, sequence length and batch, with the ratio to the compiled peer and the issue's target; then
the step-time breakdowns, the largest batches found and the configurations that failed, if the
files hold any.
"""

import json
import sys

# The targets: tokens/s floor (0: none) and the ratio to the compiled peer.
TARGETS = {("all", 512): (640e3, 2.0), ("masked", 512): (900e3, 2.0)}
DEFAULT_TARGET = (0.0, 2.0)


def read_records(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line.startswith("{"):
                    continue  # Logs that reached the file.
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise SystemExit(f"{path}:{number}: not a JSON record: {error}") from None
    return records


def _rate(record: dict | None) -> str:
    if record is None:
        return "—"
    if "error" in record:
        return "OOM" if record["error"].startswith("out of memory") else "failed"
    rate = record["tokens_per_s"] / 1e3
    text = f"{rate:,.0f} k" if rate >= 100 else f"{rate:.3g} k"
    if record.get("mfu") is not None:
        text += f" · {100 * record['mfu']:.0f} %"
    if record.get("peak_mem_gib") is not None:
        text += f" · {record['peak_mem_gib']:.1f} GiB"
    return text


def _best(records: list[dict], system: str, key: tuple) -> dict | None:
    """The fastest record of `system` at (mode, seq, batch); a failed one if none ran."""
    matching = [r for r in records if r["system"] == system and "kind" not in r
                and (r["mode"], r["seq"], r["batch"]) == key]
    ran = [r for r in matching if "error" not in r]
    if ran:
        return max(ran, key=lambda r: r["tokens_per_s"])
    return matching[0] if matching else None


def comparison_table(records: list[dict]) -> str:
    # The peer runs DistilBERT's recipe only; other recipes' records are not compared with it.
    ours = [r for r in records if r["system"] == "distil_flax" and "kind" not in r
            and r.get("recipe", "distilbert") == "distilbert"]
    lines = [
        "| mode | seq × batch | distil_flax: attention, head_chunk, remat | distil_flax tokens/s"
        " · MFU · peak mem | PyTorch eager | PyTorch compile | × compile | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(ours, key=lambda r: (r["mode"], -r["seq"], r["batch"])):
        key = (r["mode"], r["seq"], r["batch"])
        eager = _best(records, "pytorch-eager", key)
        compiled = _best(records, "pytorch-compile", key)
        floor, ratio_target = TARGETS.get((r["mode"], r["seq"]), DEFAULT_TARGET)
        ratio = None
        if compiled and "error" not in compiled and "error" not in r:
            ratio = r["tokens_per_s"] / compiled["tokens_per_s"]
        goal = f"≥ {ratio_target:.1f}×" + (f", ≥ {floor / 1e3:.0f} k" if floor else "")
        if ratio is not None:
            met = ratio >= ratio_target and r["tokens_per_s"] >= floor
            goal += " — met" if met else " — not met"
        lines.append(
            f"| {r['mode']} | {r['seq']} × {r['batch']} | {r.get('attention_selected', '?')}, "
            f"{r['head_chunk']}, {r['remat']} | {_rate(r)} | {_rate(eager)} | {_rate(compiled)} | "
            f"{'—' if ratio is None else f'{ratio:.2f}×'} | {goal} |")
    return "\n".join(lines)


def breakdown_table(records: list[dict]) -> str:
    rows = [r for r in records if r.get("kind") == "breakdown" and "error" not in r]
    if not rows:
        return ""
    parts = list(rows[0]["parts_ms"])
    lines = ["| mode | seq × micro-batch | head_chunk | step ms | "
             + " | ".join(f"{p} ms (% of step)" for p in parts) + " |",
             "|---|---|---|---|" + "---|" * len(parts)]
    for r in rows:
        cells = [f"{r['parts_ms'][p]:.2f} ({100 * r['parts_ms'][p] / r['step_ms']:.0f} %)"
                 for p in parts]
        lines.append(f"| {r['mode']} | {r['seq']} × {r['batch']} | {r['head_chunk']} | "
                     f"{r['step_ms']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def max_batch_table(records: list[dict]) -> str:
    rows = [r for r in records if r.get("kind") == "max_batch" and "error" not in r]
    if not rows:
        return ""
    lines = ["| mode | seq | head_chunk | remat | largest batch that ran | first that failed |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['seq']} | {r['head_chunk']} | {r['remat']} | "
                     f"{r['max_batch']} | {r['failed_at']} |")
    return "\n".join(lines)


def failures_table(records: list[dict]) -> str:
    """Every configuration that did not run, with its error (out of memory included)."""
    rows = [r for r in records if "error" in r]
    if not rows:
        return ""
    skip = {"system", "device", "error", "kind"}
    lines = ["| system | configuration | error |", "|---|---|---|"]
    for r in rows:
        config = ", ".join(f"{k}={v}" for k, v in r.items() if k not in skip)
        error = r["error"].replace("|", "\\|")
        lines.append(f"| {r['system']}{' ' + r['kind'] if 'kind' in r else ''} | {config} | "
                     f"{error} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python bench/compare.py FILE.jsonl [FILE.jsonl ...]")
    records = read_records(argv)
    devices = sorted({r["device"] for r in records if "device" in r})
    print(f"Device: {', '.join(devices) or 'unknown'}\n")
    tables = (comparison_table(records), breakdown_table(records), max_batch_table(records),
              failures_table(records))
    for table in tables:
        if table:
            print(table + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
