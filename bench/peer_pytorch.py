"""The PyTorch peer: the reference distiller's step with `transformers` models, timed like ours.

    python bench/peer_pytorch.py --mode=all,masked --batch=64 --seq=512 [--compile]

What a PyTorch user runs today (Hugging Face's research_projects/distillation `Distiller.step`),
written the fastest way we know without leaving PyTorch:

- teacher `BertForMaskedLM` (bf16 weights, eval, `no_grad`), student `DistilBertForMaskedLM`
  (fp32 master weights), both with SDPA attention, under `torch.autocast(bfloat16)`;
- masking on the GPU inside the step, with static shapes (Gumbel top-k per row, 80/10/10, as
  ours), so `torch.compile` sees one graph;
- loss 5·T²·KL(t/T ‖ s/T) + 2·CE + 1·(1 − cos) on last hidden states, T = 2; KL on every
  real token (`--mode=all`, the released recipe) or on the masked ones (`--mode=masked`, where
  both MLM heads run only on the gathered masked positions);
- gradient clipping at 5.0 and fused AdamW; `--compile` compiles the forward + loss.

Prints one JSON line per configuration with the same fields as bench/step_throughput.py (useful
FLOPs from distil_flax/training/flops.py, which needs no JAX). Needs torch and transformers only.
"""

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from shape_args import add_shape_args, comma_list  # noqa: E402

from distil_flax.training import flops  # noqa: E402  (plain Python: no JAX import)

GIB = 2**30
MASK_PROB, TEMPERATURE = 0.15, 2.0
ALPHA_CE, ALPHA_MLM, ALPHA_COS = 5.0, 2.0, 1.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_shape_args(p)
    p.add_argument("--batch", type=comma_list(int), default=[64])
    p.add_argument("--seq", type=comma_list(int), default=[512])
    p.add_argument("--mode", type=comma_list(str), default=["all", "masked"])
    p.add_argument("--compile", action="store_true", help="torch.compile the forward + loss")
    p.add_argument("--compile_mode", default="default",
                   help="torch.compile mode: default | max-autotune-no-cudagraphs | ...")
    p.add_argument("--dtype", default="",
                   help="autocast dtype; default bfloat16 on CUDA, float32 (no autocast) on CPU")
    p.add_argument("--attention", default="sdpa", help="transformers attn_implementation")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=0.0)
    return p.parse_args(argv)


def make_models(args, device, dtype):
    teacher_config = transformers.BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.teacher_layers,
        num_attention_heads=args.heads, intermediate_size=args.intermediate,
        max_position_embeddings=max(512, max(args.seq)))
    student_config = transformers.DistilBertConfig(
        vocab_size=args.vocab, dim=args.hidden, n_layers=args.student_layers, n_heads=args.heads,
        hidden_dim=args.intermediate, max_position_embeddings=max(512, max(args.seq)))
    teacher = transformers.BertForMaskedLM._from_config(
        teacher_config, attn_implementation=args.attention)
    student = transformers.DistilBertForMaskedLM._from_config(
        student_config, attn_implementation=args.attention)
    teacher = teacher.to(device=device, dtype=dtype).eval()  # Forward only: half the reads.
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, student.to(device).train()


def mask_tokens(ids: torch.Tensor, token_probs: torch.Tensor, mask_id: int, vocab: int):
    """ceil(15 %) of each row's tokens, drawn ∝ token_probs, corrupted 80/10/10 (static shapes)."""
    batch, length = ids.shape
    k = max(1, math.ceil(MASK_PROB * length))
    gumbel = -torch.log(-torch.log(torch.rand(ids.shape, device=ids.device).clamp_min(1e-20)))
    positions = torch.topk(torch.log(token_probs[ids]) + gumbel, k, dim=1).indices
    labels = torch.gather(ids, 1, positions)
    u = torch.rand(positions.shape, device=ids.device)
    random_ids = torch.randint(5, vocab, positions.shape, device=ids.device)
    corrupted = torch.where(u < 0.8, torch.full_like(labels, mask_id),
                            torch.where(u < 0.9, random_ids, labels))
    return ids.scatter(1, positions, corrupted), positions, labels


def _kl(student_logits, teacher_logits, weights):
    """T²·KL(teacher ‖ student) per position in fp32, weighted mean (the reference's KLDivLoss)."""
    log_p_s = F.log_softmax(student_logits.float() / TEMPERATURE, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / TEMPERATURE, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return TEMPERATURE**2 * (kl * weights).sum() / weights.sum().clamp_min(1.0)


def _gather(x, positions):
    return torch.gather(x, 1, positions[..., None].expand(-1, -1, x.shape[-1]))


def make_loss_fn(teacher, student, mode: str, token_probs, mask_id: int, vocab: int,
                 dtype, device_type: str):
    autocast = dtype != torch.float32

    def loss_fn(ids, attention_mask):
        masked_ids, positions, labels = mask_tokens(ids, token_probs, mask_id, vocab)
        with torch.autocast(device_type, dtype=dtype, enabled=autocast):
            with torch.no_grad():
                t_hidden = teacher.bert(input_ids=masked_ids,
                                        attention_mask=attention_mask).last_hidden_state
            s_hidden = student.distilbert(input_ids=masked_ids,
                                          attention_mask=attention_mask).last_hidden_state

            def student_head(h):
                h = student.vocab_layer_norm(student.activation(student.vocab_transform(h)))
                return student.vocab_projector(h)

            weights = attention_mask.float()
            if mode == "all":  # The released recipe: both heads and L_ce on every real token.
                s_logits = student_head(s_hidden)
                with torch.no_grad():
                    t_logits = teacher.cls(t_hidden)
                loss_ce = _kl(s_logits, t_logits, weights)
                s_slots = _gather(s_logits, positions)
            else:  # Heads only where a loss reads: the masked positions.
                s_slots = student_head(_gather(s_hidden, positions))
                with torch.no_grad():
                    t_slots = teacher.cls(_gather(t_hidden, positions))
                loss_ce = _kl(s_slots, t_slots, torch.ones_like(labels, dtype=torch.float32))
            loss_mlm = F.cross_entropy(s_slots.float().flatten(0, 1), labels.flatten())
            cos = F.cosine_similarity(s_hidden.float(), t_hidden.float(), dim=-1)
            loss_cos = ((1.0 - cos) * weights).sum() / weights.sum()
        return ALPHA_CE * loss_ce + ALPHA_MLM * loss_mlm + ALPHA_COS * loss_cos

    return loss_fn


class Bench:
    def __init__(self, args, *, batch: int, seq: int, mode: str, device):
        self.args, self.batch, self.seq, self.mode, self.device = args, batch, seq, mode, device
        cuda = device.type == "cuda"
        self.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
        self.teacher, self.student = make_models(args, device, self.dtype)
        self.optimizer = torch.optim.AdamW(
            self.student.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
            fused=cuda)
        specials = (0, 100, 101, 102, 103) if args.vocab > 103 else (0, 1, 2, 3, 4)
        token_probs = torch.ones(args.vocab, device=device)  # Smoothing on, uniform (as ours).
        token_probs[list(specials)] = 0.0
        loss_fn = make_loss_fn(self.teacher, self.student, mode, token_probs, specials[-1],
                               args.vocab, self.dtype, device.type)
        self.loss_fn = (torch.compile(loss_fn, mode=args.compile_mode) if args.compile
                        else loss_fn)
        generator = torch.Generator().manual_seed(0)
        self.batches = [
            torch.randint(max(specials) + 1, args.vocab, (batch, seq), generator=generator)
            .to(device) for _ in range(2)]
        self.attention_mask = torch.ones(batch, seq, dtype=torch.long, device=device)

    def step(self, ids) -> torch.Tensor:
        loss = self.loss_fn(ids, self.attention_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 5.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, steps: int) -> tuple[list[float], float]:
        times, loss = [], torch.tensor(float("nan"))
        for i in range(steps):
            start = time.perf_counter()
            loss = self.step(self.batches[i % 2])
            self._sync()
            times.append(time.perf_counter() - start)
        return times, float(loss.detach())


def flops_per_token(args, seq: int, mode: str) -> float:
    fraction = 1.0 if mode == "all" else MASK_PROB
    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate,
                 vocab_size=args.vocab)
    teacher = types.SimpleNamespace(num_layers=args.teacher_layers, **shape)
    student = types.SimpleNamespace(num_layers=args.student_layers, **shape)
    return flops.step_flops_per_token(student, teacher, seq, fraction, fraction)


def measure(args, config: dict, device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bench = Bench(args, device=device, **config)
    start = time.perf_counter()
    bench.run(1)  # Compilation, when --compile, happens here.
    compile_s = time.perf_counter() - start
    bench.run(args.warmup)
    times, loss = bench.run(args.steps)
    ms = sorted(t * 1e3 for t in times)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    step_ms = statistics.median(ms)
    tokens_per_s = config["batch"] * config["seq"] / (step_ms / 1e3)
    useful = tokens_per_s * flops_per_token(args, config["seq"], config["mode"])
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = (args.peak_tflops * 1e12) if args.peak_tflops else flops.peak_flops_of_kind(kind)
    return {
        "system": "pytorch-compile" if args.compile else "pytorch-eager", "device": kind,
        "devices": 1, **config, "attention": args.attention, "dtype": str(bench.dtype)[6:],
        "tokens_per_s": tokens_per_s, "useful_tflops": useful / 1e12,
        "mfu": useful / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / GIB
        if device.type == "cuda" else None,
        "step_ms": step_ms, "step_ms_p10": pick(0.1), "step_ms_p90": pick(0.9),
        "compile_s": compile_s, "loss": loss,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def main(argv=None) -> int:
    """Runs the sweep; returns 1 if a configuration failed other than by running out of memory."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (loss) on tensor cores.
    failed = False
    for batch, seq, mode in itertools.product(args.batch, args.seq, args.mode):
        config = {"batch": batch, "seq": seq, "mode": mode}
        try:
            record = measure(args, config, device)
        except Exception as error:  # noqa: BLE001 — recorded, and the sweep goes on.
            out_of_memory = isinstance(error, torch.cuda.OutOfMemoryError)
            if not out_of_memory:
                traceback.print_exc()
                failed = True
            reason = "out of memory: " if out_of_memory else f"{type(error).__name__}: "
            record = {"system": "pytorch-compile" if args.compile else "pytorch-eager",
                      "device": torch.cuda.get_device_name(device)
                      if device.type == "cuda" else "cpu", **config,
                      "error": reason + (str(error).splitlines() or [""])[0][:300]}
        print(json.dumps(record), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.compile:
            torch._dynamo.reset()
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
