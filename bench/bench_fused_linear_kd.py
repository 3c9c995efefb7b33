"""GPU benchmark: fused linear KD vs lm-head + torch loss, lm-head + fastkd kd_loss, and Liger's
fused-linear JSD (when importable). Forward + backward time (triton.testing.do_bench, median and
quantiles) and peak extra memory, N in {1k, 4k, 16k, 64k}; writes JSON under bench/results/.

    python bench/bench_fused_linear_kd.py [--H 4096] [--V 128256] [--dtype bf16] [--ns 1024,4096]

"Extra memory" is torch.cuda.max_memory_allocated during fwd+bwd minus the memory held by the
inputs and the parameter gradients before the call. The reference point for time is the two lm-head
matmuls and their backward alone ("matmul_floor").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch


def _torch_kd(s, t, y, T=1.0, alpha=0.5):
    ls = torch.log_softmax(s.float() / T, -1)
    lt = torch.log_softmax(t.float() / T, -1)
    kl = torch.nn.functional.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    ce = torch.nn.functional.cross_entropy(s.float(), y, reduction="none")
    return (alpha * T * T * kl + (1 - alpha) * ce).mean()


def main():
    import triton.testing

    import fastkd
    from fastkd.functional import fused_linear_kd_loss, kd_loss

    ap = argparse.ArgumentParser()
    ap.add_argument("--H", type=int, default=4096)
    ap.add_argument("--Ht", type=int, default=None, help="teacher hidden size (default H)")
    ap.add_argument("--V", type=int, default=128256)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--ns", default="1024,4096,16384,65536")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    H, Ht, V = args.H, args.Ht or args.H, args.V
    dev = "cuda"
    sw = (torch.randn(V, H, device=dev, dtype=dtype) * H**-0.5).requires_grad_()
    tw = torch.randn(V, Ht, device=dev, dtype=dtype) * Ht**-0.5

    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)
    except Exception as e:  # not installed or incompatible
        liger = None
        liger_error = repr(e)

    rows = []
    for n in [int(x) for x in args.ns.split(",")]:
        sh = torch.randn(n, H, device=dev, dtype=dtype, requires_grad=True)
        th = torch.randn(n, Ht, device=dev, dtype=dtype)
        y = torch.randint(0, V, (n,), device=dev)

        def matmul_floor():
            s = sh @ sw.t()
            with torch.no_grad():
                t = th @ tw.t()
            (s * t).sum().backward()  # a cheap consumer: time ~ the matmuls alone

        cases = {
            "matmul_floor": matmul_floor,
            "lm_head+torch": lambda: _torch_kd(sh @ sw.t(), th @ tw.t(), y).backward(),
            "lm_head+fastkd": lambda: kd_loss(sh @ sw.t(), th @ tw.t(), y).backward(),
            "fastkd_fused": lambda: fused_linear_kd_loss(sh, sw, th, tw, y).backward(),
            "fastkd_fused_jsd": lambda: fused_linear_kd_loss(
                sh, sw, th, tw, y, divergence="jsd", alpha=1.0).backward(),
        }
        if liger is not None and Ht == H:
            cases["liger_fused_linear_jsd"] = lambda: liger(sh, sw, th, tw).backward()
        for name, fn in cases.items():
            entry = {"N": n, "case": name}
            try:
                sh.grad = None
                sw.grad = None
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                fn()  # warm-up; leaves grads allocated so the baseline includes them
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                entry["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
                ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=[sh, sw])
                entry.update(ms_median=ms[0], ms_p20=ms[1], ms_p80=ms[2])
            except torch.cuda.OutOfMemoryError as e:
                entry["error"] = f"OOM: {e}"[:200]
                torch.cuda.empty_cache()
            except Exception as e:  # e.g. a Liger API change: record it, keep benchmarking
                entry["error"] = repr(e)[:200]
            rows.append(entry)
            print(json.dumps(entry))
        floor = next((r.get("ms_median") for r in rows if r["N"] == n and r["case"] == "matmul_floor"), None)
        for r in rows:
            if r["N"] == n and floor and "ms_median" in r:
                r["ratio_to_matmul_floor"] = r["ms_median"] / floor
        del sh, th, y

    result = {
        "benchmark": "fused_linear_kd",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "fastkd": fastkd.__version__,
        "python": platform.python_version(),
        "shapes": {"H": H, "Ht": Ht, "V": V, "dtype": args.dtype},
        "liger": None if liger is None else "liger_kernel.transformers.LigerFusedLinearJSD",
        "liger_unavailable": None if liger is not None else liger_error,
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"fused_linear_kd-{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
