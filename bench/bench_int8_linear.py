"""Int8Linear benchmarks.

GPU sweep (the numbers the issue asks for), whole layer timed: quantization + GEMM + scaling + bias:

    python bench/bench_int8_linear.py --out bench/results/int8_linear_<gpu>.json

  bf16 activations, M in {1, 2, 4, 8, 16, 17, 32, 64, 128, 512, 2048, 8192},
  (K, N) in {(4096, 4096), (4096, 14336), (14336, 4096)}. Implementations, all measured in the same
  run with triton.testing.do_bench (median, with 20th/80th percentiles):
    bf16_linear        F.linear in bf16 (cuBLAS): the baseline every ratio is against
    fastkd_w8a8        fastkd.functional.int8_linear(mode="w8a8", backend="triton")
    fastkd_w8a16       fastkd.functional.int8_linear(mode="w8a16", backend="triton")
    torch_int_mm       per-token quantization in torch + torch._int_mm + torch scaling and bias
                       (the fastkd torch reference, which zero-pads M <= 16 to satisfy _int_mm)
    torchao_*          torchao's int8 dynamic-activation and weight-only configs, when importable
    bnb_int8           bitsandbytes Linear8bitLt (LLM.int8, threshold 6), when importable
  `speedup_vs_bf16` = bf16 time / implementation time (> 1 is faster). Each row also records
  the bytes of weight it reads, the achieved GB/s and TFLOP/s, and the max relative error against
  the bf16 output. A `targets` block checks the issue's goals (W8A16 at M <= 16 >= 1.6x,
  W8A8 at M = 8192 >= 1.5x, never below 0.9x, weight memory <= 0.51x); it reports, never asserts.

  --quick runs a reduced sweep; --smoke runs tiny shapes on the CPU (reference backend, timer
  instead of do_bench) to check the script end to end without a GPU.

CPU micro-benchmarks of the torch reference on small shapes (pytest-benchmark):

    pytest bench/bench_int8_linear.py --benchmark-enable
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as TF

M_SWEEP = [1, 2, 4, 8, 16, 17, 32, 64, 128, 512, 2048, 8192]
KN_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
QUICK_M = [1, 16, 17, 128, 2048]
SMOKE_M = [1, 17]
SMOKE_KN = [(96, 80)]


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    for mod in ("triton", "torchao", "bitsandbytes", "fastkd"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            out[mod] = None
    return out


def _time_ms(fn, device_type: str, quick: bool) -> dict:
    if device_type == "cuda":
        from triton.testing import do_bench

        med, lo, hi = do_bench(fn, warmup=25 if quick else 50, rep=100 if quick else 300,
                               quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "ms_p20": lo, "ms_p80": hi}
    fn()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return {"ms": statistics.median(samples), "ms_p20": samples[1], "ms_p80": samples[-2]}


def _baselines(k: int, n: int, w_bf16, bias, wq, ws, device, backend: str) -> dict:
    """name -> (callable(x), weight bytes it holds). Optional ones are skipped with a reason."""
    import fastkd.functional as F
    from fastkd.reference import int8_linear as ref

    impls = {
        "bf16_linear": (lambda x: TF.linear(x, w_bf16, bias), w_bf16.numel() * 2),
        "fastkd_w8a8": (
            lambda x: F.int8_linear(x, wq, ws, bias, mode="w8a8", backend=backend),
            wq.numel() + ws.numel() * 4,
        ),
        "fastkd_w8a16": (
            lambda x: F.int8_linear(x, wq, ws, bias, mode="w8a16", backend=backend),
            wq.numel() + ws.numel() * 4,
        ),
        "torch_int_mm": (
            lambda x: ref.int8_linear_w8a8(x, wq, ws, bias), wq.numel() + ws.numel() * 4
        ),
    }
    skipped = {}
    if device.type == "cuda":
        try:
            import copy

            import torchao.quantization as tq

            base = torch.nn.Linear(k, n, bias=True, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                base.weight.copy_(w_bf16)
                base.bias.copy_(bias)
            for name, cfg_name in (("torchao_int8_dyn", "Int8DynamicActivationInt8WeightConfig"),
                                   ("torchao_int8_wo", "Int8WeightOnlyConfig")):
                if not hasattr(tq, cfg_name):
                    skipped[name] = f"torchao {_versions()['torchao']} has no {cfg_name}"
                    continue
                mod = torch.nn.Sequential(copy.deepcopy(base))
                tq.quantize_(mod, getattr(tq, cfg_name)())
                impls[name] = (mod, wq.numel() + ws.numel() * 4)
        except Exception as exc:  # noqa: BLE001 - report why, keep benchmarking
            skipped["torchao"] = f"{type(exc).__name__}: {exc}"
        try:
            import bitsandbytes as bnb

            lin = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False, threshold=6.0)
            lin.weight = bnb.nn.Int8Params(w_bf16.detach().cpu().to(torch.float16),
                                           requires_grad=False, has_fp16_weights=False)
            lin.bias = torch.nn.Parameter(bias.detach().cpu().to(torch.float16))
            lin = lin.to(device)
            impls["bnb_int8"] = (lambda x, lin=lin: lin(x), n * k + n * 4)
        except Exception as exc:  # noqa: BLE001
            skipped["bitsandbytes"] = f"{type(exc).__name__}: {exc}"
    return impls, skipped


def run_sweep(device: torch.device, dtype: torch.dtype, m_values, kn_shapes, quick: bool,
              backend: str) -> dict:
    import fastkd.functional as F

    rows = []
    skipped_all = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    for k, n in kn_shapes:
        w = (torch.randn(n, k, generator=g) / k**0.5).to(device)
        w_bf16 = w.to(dtype)
        bias = (torch.randn(n, generator=g) * 0.1).to(device, dtype)
        wq, ws = F.quantize_weight(w_bf16)
        impls, skipped = _baselines(k, n, w_bf16, bias, wq, ws, device, backend)
        skipped_all.update(skipped)
        for m in m_values:
            x = torch.randn(m, k, generator=g).to(device, dtype)
            with torch.no_grad():
                y_ref = TF.linear(x, w_bf16, bias).float()
                base_ms = None
                for name, (fn, weight_bytes) in impls.items():
                    row = {"impl": name, "M": m, "K": k, "N": n, "dtype": str(dtype)[6:]}
                    try:
                        y = fn(x)
                        row["max_rel_err"] = (
                            (y.float() - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-12)
                        ).item()
                        row.update(_time_ms(lambda fn=fn: fn(x), device.type, quick))
                    except Exception as exc:  # noqa: BLE001 - one failing impl must not end the run
                        row["error"] = f"{type(exc).__name__}: {exc}"
                        rows.append(row)
                        continue
                    if name == "bf16_linear":
                        base_ms = row["ms"]
                    sec = row["ms"] * 1e-3
                    bytes_moved = weight_bytes + x.numel() * x.element_size() + m * n * 2
                    row["weight_bytes"] = weight_bytes
                    row["weight_mem_vs_bf16"] = weight_bytes / (n * k * 2)
                    row["GBps"] = bytes_moved / sec / 1e9
                    row["TFLOPs"] = 2.0 * m * n * k / sec / 1e12
                    row["speedup_vs_bf16"] = base_ms / row["ms"] if base_ms else None
                    rows.append(row)
                    print(f"K={k:>6} N={n:>6} M={m:>5} {name:<18} {row['ms']:.4f} ms "
                          f"x{row['speedup_vs_bf16'] or 0:.2f} vs bf16  err {row['max_rel_err']:.2e}",
                          flush=True)
    return {"rows": rows, "skipped": skipped_all}


def check_targets(rows) -> dict:
    def ratio(impl, pred):
        return [r["speedup_vs_bf16"] for r in rows
                if r["impl"] == impl and "error" not in r and pred(r["M"])]

    w8a16_small = ratio("fastkd_w8a16", lambda m: m <= 16)
    w8a8_big = ratio("fastkd_w8a8", lambda m: m == 8192)
    fastkd_all = ratio("fastkd_w8a8", lambda m: True) + ratio("fastkd_w8a16", lambda m: True)
    best_per_point = {}
    for r in rows:
        if r["impl"].startswith("fastkd") and "error" not in r:
            key = (r["M"], r["K"], r["N"])
            best_per_point[key] = max(best_per_point.get(key, 0.0), r["speedup_vs_bf16"])
    mem = [r["weight_mem_vs_bf16"] for r in rows if r["impl"].startswith("fastkd") and "error" not in r]
    out = {
        "w8a16_M<=16_min_speedup (goal >= 1.6)": min(w8a16_small, default=None),
        "w8a8_M=8192_min_speedup (goal >= 1.5)": min(w8a8_big, default=None),
        "best_fastkd_mode_min_speedup_over_sweep (goal >= 0.9)": min(best_per_point.values(),
                                                                      default=None),
        "each_fastkd_mode_min_speedup_over_sweep": min(fastkd_all, default=None),
        "weight_mem_vs_bf16 (goal <= 0.51)": max(mem, default=None),
    }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/...)")
    parser.add_argument("--quick", action="store_true", help="reduced M sweep, shorter timing")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU run of the whole script (no GPU needed)")
    parser.add_argument("--m", type=int, nargs="*", default=None, help="override the M sweep")
    args = parser.parse_args(argv)

    if args.smoke:
        device, backend = torch.device("cpu"), "torch"
        m_values, kn = SMOKE_M, SMOKE_KN
    else:
        if not torch.cuda.is_available():
            print("the GPU sweep needs CUDA; use --smoke for a CPU check", file=sys.stderr)
            return 2
        device, backend = torch.device("cuda"), "triton"
        m_values, kn = (QUICK_M if args.quick else M_SWEEP), KN_SHAPES
    if args.m:
        m_values = args.m
    dtype = torch.bfloat16

    started = datetime.datetime.now(datetime.timezone.utc).isoformat()
    result = run_sweep(device, dtype, m_values, kn, args.quick or args.smoke, backend)
    payload = {
        "benchmark": "int8_linear",
        "started_utc": started,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "device_type": device.type,
        "versions": _versions(),
        "dtype": "bfloat16",
        "timing": "triton.testing.do_bench median (p20, p80)" if device.type == "cuda"
        else "perf_counter median of 5 (smoke only: not a measurement)",
        "what_is_timed": "the whole layer: activation quantization, GEMM, scaling, bias, cast",
        "M_sweep": m_values,
        "KN_shapes": kn,
        "skipped_baselines": result["skipped"],
        "targets": check_targets(result["rows"]),
        "rows": result["rows"],
    }
    out = args.out
    if out is None:
        tag = "smoke" if args.smoke else torch.cuda.get_device_name().replace(" ", "_")
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           f"int8_linear_{tag}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(payload, f, indent=1)
    print(json.dumps(payload["targets"], indent=1))
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# pytest-benchmark: the CPU reference on small shapes (run with --benchmark-enable)
# ---------------------------------------------------------------------------------------------

CPU_SHAPES = [(1, 512, 512), (16, 512, 512), (128, 512, 2048)]


def _cpu_case(m, k, n, dtype=torch.float32):
    import fastkd.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g).to(dtype)
    wq, ws = F.quantize_weight(w)
    return x, w.to(dtype), b, wq, ws


try:
    import pytest

    @pytest.mark.parametrize("m,k,n", CPU_SHAPES)
    @pytest.mark.parametrize("impl", ["float_linear", "w8a8", "w8a16"])
    def test_bench_cpu_reference(benchmark, impl, m, k, n):
        import fastkd.functional as F

        x, w, b, wq, ws = _cpu_case(m, k, n)
        benchmark.group = f"int8_linear cpu M={m} K={k} N={n}"
        if impl == "float_linear":
            y = benchmark(TF.linear, x, w, b)
        else:
            y = benchmark(lambda: F.int8_linear(x, wq, ws, b, mode=impl, backend="torch"))
        assert y.shape == (m, n)

    @pytest.mark.parametrize("m,k", [(16, 512), (512, 2048)])
    def test_bench_cpu_quantize_per_token(benchmark, m, k):
        import fastkd.functional as F

        x = torch.randn(m, k)
        q, s = benchmark(lambda: F.quantize_per_token(x, backend="torch"))
        assert q.shape == (m, k) and s.shape == (m,)

except ImportError:  # running the GPU script without pytest installed
    pass


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001 - print, then a non-zero exit
        traceback.print_exc()
        sys.exit(1)
