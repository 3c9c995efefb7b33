"""Top-k teacher KD benchmark: fastkd.functional.kd_loss_topk against plain torch, forward+backward.

The teacher is stored as its top-k class ids and log-probabilities (offline distillation); the
student's logits are (N, V). Implementations, timed in the same run (triton.testing.do_bench on
CUDA: median with 20th/80th percentiles):
  torch_eager     plain torch: log_softmax of the student at T, gather at the ids, the tail bucket
                  from a masked logsumexp, CE at T = 1 (fp32 upcast), mean over rows
  torch_compile   the same function under torch.compile
  fastkd          kd_loss_topk (Triton on CUDA): one streaming forward pass over the student row
                  (its softmax statistics and the tail classes' sum), one backward pass
Bytes moved by fastkd (its floor): the student logits read twice and the gradient written once,
3 x N x V x 2 bytes in bf16 (GB/s is reported against that).

CUDA default: bf16, V = 128256, k = 64, T = 2, with targets, N in {4096, 16384} (--quick: 4096).
CPU: the torch reference and plain torch, fp32, V = 4096, N = 64, median of 3 calls.

    python bench/bench_kd_topk.py [--device D] [--quick] [--out FILE.json] [--V 128256] [--k 64]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastkd  # noqa: E402
from fastkd.functional import kd_loss_topk  # noqa: E402

T = 2.0
ALPHA = 0.5


def torch_topk_kd(s, ids, lps, y, temperature=T, alpha=ALPHA):
    """The same loss in plain torch: KL(P || Q) over the k ids plus the tail bucket, T^2 scaled,
    mixed with the CE; rows averaged."""
    z = s.float() / temperature
    log_q = torch.log_softmax(z, -1)
    log_q_top = log_q.gather(-1, ids)
    p_top = lps.exp()
    p_tail = (1 - p_top.sum(-1)).clamp_min(0)
    log_q_tail = torch.logsumexp(z.scatter(-1, ids, float("-inf")), -1) - torch.logsumexp(z, -1)
    kl = (p_top * (lps - log_q_top)).sum(-1)
    kl = kl + torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-30).log() - log_q_tail), 0.0)
    ce = torch.nn.functional.cross_entropy(s.float(), y, reduction="none")
    return (alpha * temperature**2 * kl + (1 - alpha) * ce).mean()


def run(device: str = "cuda", quick: bool = False, *, V: int | None = None, k: int = 64,
        ns=None) -> list:
    if device == "cuda":
        V = V or 128256
        dt = torch.bfloat16
        ns = list(ns or ([4096] if quick else [4096, 16384]))
        backend = "auto"
    else:
        V = V or 4096
        dt = torch.float32
        ns = list(ns or [64])
        backend = "torch"
    g = torch.Generator(device=device).manual_seed(0)
    records = []
    for n in ns:
        s = torch.randn(n, V, device=device, dtype=dt, generator=g).requires_grad_()
        ids, lps = fastkd.teacher_topk(torch.randn(n, V, device=device, dtype=dt, generator=g) * 2,
                                       k, T)
        y = torch.randint(0, V, (n,), device=device, generator=g)
        cases = {
            "torch_eager": lambda: torch_topk_kd(s, ids, lps, y).backward(),
            "fastkd": lambda: kd_loss_topk(s, ids, lps, y, temperature=T, alpha=ALPHA,
                                           backend=backend).backward(),
        }
        if device == "cuda":
            compiled = torch.compile(torch_topk_kd)
            cases["torch_compile"] = lambda: compiled(s, ids, lps, y).backward()
        first = len(records)
        for name, fn in cases.items():
            rec = {"op": "kd_loss_topk", "impl": name, "n": n, "v": V, "k": k, "temperature": T,
                   "dtype": str(dt).replace("torch.", ""), "device": device}
            try:
                s.grad = None
                fn()  # warm-up (and compilation)
                rec.update(common.time_stats(fn, device, cpu_reps=3, grad_to_none=[s]))
                rec["peak_extra_bytes"] = common.peak_extra_bytes(fn, device)
                rec["gbps_vs_3_passes"] = 3 * n * V * s.element_size() / (rec["ms"] * 1e6)
            except Exception as e:  # an OOM of a baseline: record it, keep going
                rec["error"] = ("OOM: " if common.is_oom(e) else "") + repr(e)[:200]
                if device == "cuda":
                    torch.cuda.empty_cache()
            records.append(rec)
            print(rec, flush=True)
        row = records[first:]
        ours = next((r.get("ms") for r in row if r["impl"] == "fastkd"), None)
        for r in row:
            if r.get("ms") and ours:
                r["speedup_of_fastkd"] = r["ms"] / ours
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="JSON file path (default: print only)")
    p.add_argument("--V", type=int, default=None)
    p.add_argument("--k", type=int, default=64)
    args = p.parse_args(argv)
    records = run(args.device, args.quick, V=args.V, k=args.k)
    common.print_table(records, ["impl", "n", "v", "k", "dtype", "ms", "ms_p20", "ms_p80",
                                 "speedup_of_fastkd", "gbps_vs_3_passes", "error"])
    if args.out:
        print("wrote", common.write_json(records, args.out, {"benchmark": "kd_loss_topk"}))


if __name__ == "__main__":
    main()
