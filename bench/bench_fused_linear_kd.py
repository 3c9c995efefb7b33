"""Fused linear KD benchmark: fastkd.functional.fused_linear_kd_loss against materialising the logits.

Forward + backward of the whole loss (student lm-head, teacher lm-head, KD loss), all implementations
timed in the same run (triton.testing.do_bench on CUDA: median with 20th/80th percentiles):
  matmul_floor            the two lm-head matmuls and the student backward alone, with a trivial
                          consumer: the time reference ("ratio_to_matmul_floor")
  lm_head+torch           logits materialised, KD loss in plain torch (fp32 upcast)
  lm_head+fastkd          logits materialised, fastkd.functional.kd_loss
  fastkd_fused            fastkd.functional.fused_linear_kd_loss (KL + CE, no N x V logits)
  fastkd_fused_jsd        the same with divergence="jsd", alpha=1
  liger_fused_linear_jsd  Liger's LigerFusedLinearJSD (CUDA, when importable): the JSD alone, so its
                          speedup_of_fastkd_fused is taken against fastkd_fused_jsd (same loss)
"Peak extra memory" is the peak allocated during fwd+bwd, with no gradients held before the call,
minus what was allocated before it and minus the new gradients of the hidden states and weight
(the step's output): its workspace. (Until 2026-12-01 the warm-up's gradients were kept, and the
figure held one weight-gradient-sized buffer too many: 1002 MiB at V = 128256, H = 4096, bf16.)

CUDA default: bf16, H = Ht = 4096, V = 128256, N in {1k, 4k, 16k, 64k} (--quick: N in {1k, 4k}).
CPU: the torch reference (backend="torch"), fp32, H = 128, V = 4096, N in {64, 256}
(--quick: H = 64, V = 2048, N = 64), median of 3 calls.

    python bench/bench_fused_linear_kd.py [--device D] [--quick] [--out FILE.json]
        [--H 4096] [--Ht H] [--V 128256] [--dtype bf16|fp16|fp32] [--ns 1024,4096]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from fastkd.functional import fused_linear_kd_loss, kd_loss  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUDA_NS = [1024, 4096, 16384, 65536]
CUDA_QUICK_NS = [1024, 4096]
CPU_NS = [64, 256]
CPU_QUICK_NS = [64]


def _torch_kd(s, t, y, T=1.0, alpha=0.5):
    ls = torch.log_softmax(s.float() / T, -1)
    lt = torch.log_softmax(t.float() / T, -1)
    kl = torch.nn.functional.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    ce = torch.nn.functional.cross_entropy(s.float(), y, reduction="none")
    return (alpha * T * T * kl + (1 - alpha) * ce).mean()


def liger_status():
    """(LigerFusedLinearJSD instance or None, reason it is unavailable or None)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        return LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0), None
    except Exception as e:  # not installed or incompatible
        return None, repr(e)[:200]


def default_config(device: str, quick: bool) -> dict:
    if device == "cuda":
        return {"H": 4096, "Ht": 4096, "V": 128256, "dtype": "bf16",
                "ns": CUDA_QUICK_NS if quick else CUDA_NS}
    return {"H": 64 if quick else 128, "Ht": 64 if quick else 128, "V": 2048 if quick else 4096,
            "dtype": "fp32", "ns": CPU_QUICK_NS if quick else CPU_NS}


def run(device: str = "cuda", quick: bool = False, *, H: int | None = None, Ht: int | None = None,
        V: int | None = None, dtype: str | None = None, ns=None) -> list:
    """One record per (N, implementation); the `python -m fastkd bench` hook."""
    cfg = default_config(device, quick)
    H = H or cfg["H"]
    Ht = Ht or H
    V = V or cfg["V"]
    dtype_name = dtype or cfg["dtype"]
    dt = DTYPES[dtype_name]
    ns = list(ns or cfg["ns"])
    backend = "auto" if device == "cuda" else "torch"
    g = torch.Generator(device=device).manual_seed(0)
    kw = {"device": device, "dtype": dt, "generator": g}
    sw = (torch.randn(V, H, **kw) * H**-0.5).requires_grad_()
    tw = torch.randn(V, Ht, **kw) * Ht**-0.5
    liger = liger_status()[0] if device == "cuda" else None

    records = []
    for n in ns:
        sh = torch.randn(n, H, **kw).requires_grad_()
        th = torch.randn(n, Ht, **kw)
        y = torch.randint(0, V, (n,), device=device, generator=g)

        def matmul_floor():
            s = sh @ sw.t()
            with torch.no_grad():
                t = th @ tw.t()
            (s * t).sum().backward()  # a cheap consumer: time ~ the matmuls alone

        cases = {
            "matmul_floor": matmul_floor,
            "lm_head+torch": lambda: _torch_kd(sh @ sw.t(), th @ tw.t(), y).backward(),
            "lm_head+fastkd": lambda: kd_loss(sh @ sw.t(), th @ tw.t(), y,
                                              backend=backend).backward(),
            "fastkd_fused": lambda: fused_linear_kd_loss(sh, sw, th, tw, y,
                                                         backend=backend).backward(),
            "fastkd_fused_jsd": lambda: fused_linear_kd_loss(
                sh, sw, th, tw, y, divergence="jsd", alpha=1.0, backend=backend).backward(),
        }
        if liger is not None:
            # shift_labels is a required argument since liger-kernel 0.8 (None: no ignored rows;
            # the labels here hold none, so both are the same loss as fastkd_fused_jsd; its
            # student and teacher hidden sizes may differ, as ours)
            cases["liger_fused_linear_jsd"] = lambda: liger(sh, sw, th, tw, y).backward()
        first = len(records)
        for name, fn in cases.items():
            rec = {"op": "fused_linear_kd", "impl": name, "n": n, "h": H, "ht": Ht, "v": V,
                   "dtype": dtype_name, "device": device}
            try:
                sh.grad = None
                sw.grad = None
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    fn()  # warm-up (autotuning, caches) outside the measurement
                # Without grads, as a training step starts after zero_grad(set_to_none=True):
                # with the warm-up's grads kept, autograd built the new ones beside them and
                # added them in, and the peak held one weight gradient too many (1 GB at
                # V = 128256, H = 4096). The new grads (sh's and sw's size) are the step's
                # output, not its workspace: left out.
                sh.grad = None
                sw.grad = None
                grads = (sh.numel() + sw.numel()) * sh.element_size()
                peak = common.peak_extra_bytes(fn, device)
                peak = None if peak is None else peak - grads
                rec["peak_extra_bytes"] = peak
                rec["peak_extra_mb"] = None if peak is None else peak / 2**20
                rec.update(common.time_stats(fn, device, cpu_reps=3, grad_to_none=[sh, sw]))
                rec["logits_mb"] = n * V * sh.element_size() / 2**20  # what the fused path avoids
            except Exception as e:  # OOM of a baseline, a Liger API change: record it, keep going
                rec["error"] = ("OOM: " if common.is_oom(e) else "") + repr(e)[:200]
                if device == "cuda":
                    torch.cuda.empty_cache()
            records.append(rec)
            print(rec, flush=True)  # a run cut off at its time cap still leaves it in the log
        row = records[first:]
        floor = next((r.get("ms") for r in row if r["impl"] == "matmul_floor"), None)
        fused = next((r.get("ms") for r in row if r["impl"] == "fastkd_fused"), None)
        # Liger's fused-linear JSD computes the JSD alone: its ratio is to fastkd's JSD row, the
        # same loss (dividing it by the KL + CE row reported equal work as a 1.6x win)
        fused_jsd = next((r.get("ms") for r in row if r["impl"] == "fastkd_fused_jsd"), None)
        for r in row:
            if r.get("ms"):
                r["ratio_to_matmul_floor"] = r["ms"] / floor if floor else None
                same_loss = fused_jsd if "jsd" in r["impl"] else fused
                r["speedup_of_fastkd_fused"] = r["ms"] / same_loss if same_loss else None
        del sh, th, y
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer N values (smaller shapes on CPU)")
    p.add_argument("--out", default=None, help="JSON file path (default: print only)")
    p.add_argument("--H", type=int, default=None, help="student hidden size")
    p.add_argument("--Ht", type=int, default=None, help="teacher hidden size (default H)")
    p.add_argument("--V", type=int, default=None, help="vocabulary size")
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    p.add_argument("--ns", default=None, help="comma-separated N values (token rows)")
    args = p.parse_args(argv)
    ns = [int(x) for x in args.ns.split(",")] if args.ns else None
    records = run(args.device, args.quick, H=args.H, Ht=args.Ht, V=args.V, dtype=args.dtype,
                  ns=ns)
    common.print_table(records, ["impl", "n", "h", "ht", "v", "dtype", "ms", "ms_p20", "ms_p80",
                                 "ratio_to_matmul_floor", "speedup_of_fastkd_fused",
                                 "peak_extra_mb", "logits_mb", "error"])
    if args.out:
        extra = {"benchmark": "fused_linear_kd",
                 "backend": "auto" if args.device == "cuda" else "torch"}
        if args.device == "cuda":
            liger, why = liger_status()
            extra["liger"] = None if liger is None else "liger_kernel.transformers.LigerFusedLinearJSD"
            extra["liger_unavailable"] = why
        print("wrote", common.write_json(records, args.out, extra))


if __name__ == "__main__":
    main()
