"""Int8Linear benchmark: the whole layer timed (activation quantization + GEMM + scaling + bias).

    python bench/bench_int8_linear.py [--device D] [--quick] [--out FILE.json] [--m 1 16 ...]

CUDA sweep (the numbers the issue asks for): bf16 activations, M in {1, 2, 4, 8, 16, 17, 32, 64, 128,
  512, 2048, 8192} (--quick: {1, 16, 17, 128, 2048}, shorter timing), (K, N) in {(4096, 4096),
  (4096, 14336), (14336, 4096)}. Implementations, all measured in the same run with
  triton.testing.do_bench (median, with 20th/80th percentiles):
    bf16_linear        F.linear in bf16 (cuBLAS): the baseline every ratio is against
    fastkd_w8a8        fastkd.functional.int8_linear(mode="w8a8", backend="triton")
    fastkd_w8a16       fastkd.functional.int8_linear(mode="w8a16", backend="triton")
    torch_int_mm       per-token quantization in torch + torch._int_mm + torch scaling and bias
                       (the fastkd torch reference, which zero-pads M <= 16 to satisfy _int_mm)
    fastkd_*_gemv      the same with the decode kernel (CUDA, M <= 4), not yet the default
    fastkd_w8a16_swapped  W8A16 through the swapped GEMM (C^T = W x^T), not yet the default
    torchao_*          torchao's int8 dynamic-activation and weight-only configs, when importable
    bnb_int8           bitsandbytes Linear8bitLt (LLM.int8, threshold 6), when importable
  Optional baselines that cannot run appear as records with an "error" starting "skipped:".
  `speedup_vs_bf16` = bf16 time / implementation time (> 1 is faster). Each record also has the
  bytes of weight it reads, the achieved GB/s and TFLOP/s, and the max relative error against
  the bf16 output. The JSON's `targets` block checks the issue's goals (W8A16 at M <= 16 >= 1.6x,
  W8A8 at M = 8192 >= 1.5x, never below 0.9x, weight memory <= 0.51x); it reports, never asserts.

CPU (--device cpu, or the old --smoke flag): tiny shapes on the torch reference backend with a
perf_counter timer: checks the script end to end, a few seconds, not a measurement of the kernels.

CPU pytest-benchmark micro-benchmarks of the torch reference live in bench/test_bench_int8_linear.py.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys

import torch
import torch.nn.functional as TF

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

M_SWEEP = [1, 2, 4, 8, 16, 17, 32, 64, 128, 512, 2048, 8192]
KN_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
QUICK_M = [1, 16, 17, 128, 2048]
SMOKE_M = [1, 17]
SMOKE_KN = [(96, 80)]
CPU_M = [1, 17, 64]
CPU_KN = [(96, 80), (256, 384)]


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torchao", "bitsandbytes"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            out[mod] = None
    return out


def _with_kernel_setting(setting: str, value, fn, *args, **kwargs):
    """fn(*args, **kwargs) with kernels/int8_linear.py's `setting` (DECODE_KERNEL,
    W8A16_SWAPPED) set to `value` for the call."""
    from fastkd.kernels import int8_linear as kern

    old = getattr(kern, setting)
    setattr(kern, setting, value)
    try:
        return fn(*args, **kwargs)
    finally:
        setattr(kern, setting, old)


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
        # the decode kernel variant (rows M <= GEMV_MAX_M only; see kernels/int8_linear.py)
        for mode in ("w8a8", "w8a16"):
            impls[f"fastkd_{mode}_gemv"] = (
                lambda x, mode=mode: _with_kernel_setting(
                    "DECODE_KERNEL", "gemv", F.int8_linear, x, wq, ws, bias, mode=mode,
                    backend=backend),
                wq.numel() + ws.numel() * 4,
            )
        # the swapped W8A16 GEMM (weight as wgmma's register operand), every M
        impls["fastkd_w8a16_swapped"] = (
            lambda x: _with_kernel_setting(
                "W8A16_SWAPPED", True, F.int8_linear, x, wq, ws, bias, mode="w8a16",
                backend=backend),
            wq.numel() + ws.numel() * 4,
        )
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
                config_cls = getattr(tq, cfg_name)
                try:  # left as it is, quantize_ sets process-wide Inductor options (and TF32
                    # matmuls) that would change every later compiled or fp32 figure
                    config = config_cls(set_inductor_config=False)
                except TypeError:
                    config = config_cls()
                mod = torch.nn.Sequential(copy.deepcopy(base))
                tq.quantize_(mod, config)
                impls[name] = (mod, wq.numel() + ws.numel() * 4)
                # torchao's documented setting: quantize_ then torch.compile (one dynamic
                # compilation for every M; the first call, untimed, compiles)
                impls[f"{name}_compiled"] = (torch.compile(mod, dynamic=True),
                                             wq.numel() + ws.numel() * 4)
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


def run(device: str = "cuda", quick: bool = False, *, m_values=None, kn_shapes=None,
        dtype: torch.dtype = torch.bfloat16, after_shape=None) -> list:
    """One record per (K, N, M, implementation); the `python -m fastkd bench` hook.
    ``after_shape(rows)``, if given, is called with the records so far after each (K, N)."""
    import fastkd.functional as F
    from fastkd.kernels import int8_linear as kern

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    backend = "triton" if on_cuda else "torch"
    if m_values is None:
        m_values = (QUICK_M if quick else M_SWEEP) if on_cuda else (SMOKE_M if quick else CPU_M)
    if kn_shapes is None:
        kn_shapes = KN_SHAPES if on_cuda else (SMOKE_KN if quick else CPU_KN)
    timing = {"warmup_ms": 25, "rep_ms": 100} if quick else {"warmup_ms": 50, "rep_ms": 300}

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
                    if name.endswith("_gemv") and m > kern.GEMV_MAX_M:
                        continue  # the decode kernel only takes decode-size rows
                    row = {"op": "int8_linear", "impl": name, "M": m, "K": k, "N": n,
                           "dtype": str(dtype)[6:], "device": device.type,
                           "backend": backend if name.startswith("fastkd") else None}
                    try:
                        y = fn(x)
                        row["max_rel_err"] = (
                            (y.float() - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-12)
                        ).item()
                        peak = common.peak_extra_bytes(lambda fn=fn: fn(x), device.type)
                        row["peak_extra_mb"] = None if peak is None else peak / 2**20
                        row.update(common.time_stats(lambda fn=fn: fn(x), device.type, **timing))
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
                    if on_cuda:  # progress through a long sweep; the table comes at the end
                        print(f"K={k:>6} N={n:>6} M={m:>5} {name:<18} {row['ms']:.4f} ms "
                              f"x{row['speedup_vs_bf16'] or 0:.2f} vs bf16  "
                              f"err {row['max_rel_err']:.2e}", flush=True)
        if after_shape is not None:
            after_shape(rows)
    for name, why in skipped_all.items():
        rows.append({"op": "int8_linear", "impl": name, "dtype": str(dtype)[6:],
                     "device": device.type, "error": f"skipped: {why}"})
    return rows


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
    mem = [r["weight_mem_vs_bf16"] for r in rows
           if r["impl"].startswith("fastkd") and "error" not in r]
    out = {
        "w8a16_M<=16_min_speedup (goal >= 1.6)": min(w8a16_small, default=None),
        "w8a8_M=8192_min_speedup (goal >= 1.5)": min(w8a8_big, default=None),
        "best_fastkd_mode_min_speedup_over_sweep (goal >= 0.9)": min(best_per_point.values(),
                                                                      default=None),
        "each_fastkd_mode_min_speedup_over_sweep": min(fastkd_all, default=None),
        "weight_mem_vs_bf16 (goal <= 0.51)": max(mem, default=None),
    }
    # the untimed W8A16 variant against the default, per M (geometric mean over the (K, N)
    # shapes): > 1 means the swapped GEMM is faster there; decides kernels' W8A16_SWAPPED
    swapped = {}
    for r in rows:
        if r["impl"] == "fastkd_w8a16_swapped" and "error" not in r:
            base = [b for b in rows if b["impl"] == "fastkd_w8a16" and "error" not in b
                    and (b["M"], b["K"], b["N"]) == (r["M"], r["K"], r["N"])]
            if base:
                swapped.setdefault(r["M"], []).append(base[0]["ms"] / r["ms"])
    if swapped:
        out["w8a16_swapped_speedup_over_default_by_M"] = {
            m: round(math.prod(v) ** (1 / len(v)), 3) for m, v in sorted(swapped.items())}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="reduced M sweep, shorter timing")
    parser.add_argument("--out", default=None, help="JSON file path (default: print only)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU run of the whole script (same as --device cpu --quick)")
    parser.add_argument("--m", type=int, nargs="*", default=None, help="override the M sweep")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.quick = "cpu", True

    on_cuda = torch.device(args.device).type == "cuda"

    def extra(targets, partial):
        return {
            "benchmark": "int8_linear",
            "versions": _versions(),
            "timing": "triton.testing.do_bench median (p20, p80)" if on_cuda
            else "perf_counter median of 5 (CPU smoke: not a measurement)",
            "what_is_timed": "the whole layer: activation quantization, GEMM, scaling, bias, cast",
            "targets": targets,
            "partial": partial,
        }

    def save_so_far(rows):  # a run cut short by a time limit still leaves its finished shapes
        if args.out:
            common.write_json(list(rows), args.out, extra(check_targets(rows), True))

    records = run(args.device, args.quick, m_values=args.m or None, after_shape=save_so_far)
    targets = check_targets(records)
    common.print_table(records, ["impl", "M", "K", "N", "dtype", "ms", "ms_p20", "ms_p80",
                                 "speedup_vs_bf16", "GBps", "TFLOPs", "weight_mem_vs_bf16",
                                 "max_rel_err", "error"])
    for key, val in targets.items():
        print(f"{key}: {common._fmt(val)}")
    if args.out:
        print("wrote", common.write_json(records, args.out, extra(targets, False)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
