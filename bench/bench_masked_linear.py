"""GPU benchmark of fastkd's masked linear (issue 3): the tile-skipping CUDA kernel and the
block-sparse Triton kernels against dense cuBLAS and PyTorch's semi-structured 2:4 path, all
measured in the same run.

    python bench/bench_masked_linear.py --out F.json    # full sweep, JSON to F.json
    python bench/bench_masked_linear.py --quick         # a few shapes, to smoke-test a GPU box

Sweep: bf16; M in {1, 16, 128, 2048, 8192}; (K, N) in {(4096, 4096), (4096, 14336), (14336, 4096)};
patterns 64x64 blocks at 50/75/90 %, 2:4, unstructured 50/90 %. For each point:
  forward:   dense F.linear(x, W) (the unpruned layer, cuBLAS) | fastkd backend="torch" (cuBLAS on
             W o M, mask applied per call) | backend="cuda" (the WMMA kernel) | backend="triton"
             (the block-sparse Triton kernels, BLOCK_N = 64) | fastkd_triton_n128 (the same with
             BLOCK_N = 128, two map rows per program) | backend="auto" | for 2:4 also F.linear on
             to_sparse_semi_structured(W o M)
  fwd+bwd:   dense F.linear vs fastkd cuda, triton, auto and torch (x and W both need gradients)
Each record has the median milliseconds of the whole call (triton.testing.do_bench: includes the
Python work of argument checks and backend choice, which can exceed the GPU time of a small call),
the same replayed from a CUDA graph (``*_graph_ms``: GPU time only, what a captured training step
would see, calls back to back so the weight may stay in L2; ``*_graph_cold_ms``: each call after
a write over twice the L2), the speedup over dense (dense_ms / ms, > 1 is faster), achieved TFLOP/s of the
dense-equivalent work, the peak extra memory of one sparse forward, and each sparse kernel's max
error against an fp32 reference. The issue's targets are evaluated at the end and stored with the
results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

M_LIST = [1, 16, 128, 2048, 8192]
KN_LIST = [(4096, 4096), (4096, 14336), (14336, 4096)]
PATTERNS = [
    ("block64", 0.5),
    ("block64", 0.75),
    ("block64", 0.9),
    ("2:4", None),
    ("unstructured", 0.5),
    ("unstructured", 0.9),
]


def environment() -> dict:
    import fastkd

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "fastkd": fastkd.__version__,
        "cuda_extension_build": fastkd._extension.build_info(),
    }


def make_mask(weight: torch.Tensor, pattern: str, sparsity):
    from fastkd.prune import magnitude_mask

    if pattern == "block64":
        return magnitude_mask(weight, sparsity, (64, 64))
    return magnitude_mask(weight, sparsity, pattern)


def bench_ms(fn, rep_ms: int) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median"))


class _TritonTiles:
    """Run the Triton backend with `tiles` map tiles per program (BLOCK_N, BLOCK_K = 64 tiles)."""

    def __init__(self, tiles: int):
        self.tiles = tiles

    def __enter__(self):
        from fastkd.kernels import masked_linear as kern

        self.saved = dict(kern.TILES_PER_PROGRAM)
        kern.TILES_PER_PROGRAM.update(forward=self.tiles, grad_input=self.tiles)

    def __exit__(self, *exc):
        from fastkd.kernels import masked_linear as kern

        kern.TILES_PER_PROGRAM.update(self.saved)


def _timed(name, fn, rep_ms, rec, prefix, times, graph_times=None):
    try:
        times[name] = bench_ms(fn, rep_ms)
    except Exception as exc:
        rec[f"{prefix}{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        return
    if graph_times is not None:
        try:
            stats = common.graph_stats(fn, rep_ms)
            graph_times[name] = stats["graph_ms"]  # back to back: weights may stay in L2
            rec.setdefault(f"{prefix or 'fwd_'}graph_cold_ms", {})[name] = stats["graph_cold_ms"]
        except Exception as exc:
            rec[f"{prefix}{name}_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]


def one_point(m, k, n, pattern, sparsity, rep_ms, backward=True) -> dict:
    from fastkd.functional import masked_linear
    from fastkd.reference.masked_linear import build_tile_map

    dev, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
    mask = make_mask(w, pattern, sparsity)
    tiles = build_tile_map(mask)
    x = torch.randn(m, k, device=dev, dtype=dtype)
    flops = 2.0 * m * n * k
    rec = {
        "M": m, "K": k, "N": n, "dtype": "bfloat16", "pattern": pattern, "sparsity": sparsity,
        "density": float(mask.float().mean()), "tile_density": tiles.tile_density,
        "full_tiles": tiles.full / max(1, tiles.n_tiles * tiles.k_tiles),
    }

    # correctness of the sparse kernels at this point (fp32 reference on the same bf16 inputs)
    ref = Fn.linear(x.float(), (w * mask).float())
    rec["torch_bf16_err_vs_fp32"] = float((Fn.linear(x, w * mask).float() - ref).abs().max())
    for backend, key in (("cuda", "max_abs_err_vs_fp32"), ("triton", "triton_max_abs_err_vs_fp32")):
        try:
            y = masked_linear(x, w, mask, backend=backend, tile_map=tiles)
            rec[key] = float((y.float() - ref).abs().max())
        except Exception as exc:
            rec[f"{backend}_check_error"] = f"{type(exc).__name__}: {exc}"[:300]
    del ref

    def triton_n128():
        with _TritonTiles(2):
            return masked_linear(x, w, mask, backend="triton", tile_map=tiles)

    fwd = {
        "dense_linear": lambda: Fn.linear(x, w),
        "fastkd_torch": lambda: masked_linear(x, w, mask, backend="torch"),
        "fastkd_cuda": lambda: masked_linear(x, w, mask, backend="cuda", tile_map=tiles),
        "fastkd_triton": lambda: masked_linear(x, w, mask, backend="triton", tile_map=tiles),
        "fastkd_triton_n128": triton_n128,
        "fastkd_auto": lambda: masked_linear(x, w, mask, backend="auto", tile_map=tiles),
    }
    in_graph = ("dense_linear", "fastkd_cuda", "fastkd_triton", "fastkd_triton_n128")
    if pattern == "2:4":
        try:
            from torch.sparse import to_sparse_semi_structured

            w24 = to_sparse_semi_structured(w * mask)
            fwd["semi_structured_2to4"] = lambda: Fn.linear(x, w24)
        except Exception as exc:  # not every build/GPU/shape supports it
            rec["semi_structured_error"] = f"{type(exc).__name__}: {exc}"[:300]
    times, gtimes = {}, {}
    for name, fn in fwd.items():
        _timed(name, fn, rep_ms, rec, "", times, gtimes if name in in_graph else None)
    rec["fwd_ms"] = times
    rec["fwd_graph_ms"] = gtimes
    if "dense_linear" in times:
        rec["fwd_speedup_vs_dense"] = {k_: times["dense_linear"] / v for k_, v in times.items()}
        rec["fwd_tflops"] = {k_: flops / v / 1e9 for k_, v in times.items()}
    if "dense_linear" in gtimes:
        dense = gtimes["dense_linear"]
        rec["fwd_graph_speedup_vs_dense"] = {k_: dense / v for k_, v in gtimes.items()}
        # the kept tiles' share of the dense work, done at what fraction of cuBLAS's rate
        kept = tiles.tile_density
        rec["fwd_graph_per_kept_tile_vs_cublas"] = {
            k_: dense * kept / v for k_, v in gtimes.items() if k_ != "dense_linear"
        }

    # memory: extra peak of one sparse forward beyond its inputs and output
    for backend in ("cuda", "triton"):
        try:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = masked_linear(x, w, mask, backend=backend, tile_map=tiles)
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base - out.numel() * 2
            rec[f"{'sparse' if backend == 'cuda' else 'triton'}_fwd_extra_peak_bytes"] = extra
            del out
        except Exception:
            pass  # the timing above already recorded why this backend cannot run
    rec["masked_weight_bytes"] = w.numel() * 2
    rec["tile_map_bytes"] = tiles.data.numel() * 4

    if backward:
        xg = x.detach().clone().requires_grad_(True)
        wg = w.detach().clone().requires_grad_(True)
        gy = torch.randn(m, n, device=dev, dtype=dtype)

        # autograd.grad, not .backward(): the gradients come back fresh each call (.backward()
        # accumulated into xg.grad / wg.grad, one more pass per call, dense and sparse alike,
        # pulling every ratio toward 1), and it captures in a CUDA graph as it is
        def grads(y):
            torch.autograd.grad(y, (xg, wg), gy)

        def dense_step():
            grads(Fn.linear(xg, wg))

        def step(backend):
            def run():
                grads(masked_linear(xg, wg, mask, backend=backend, tile_map=tiles))

            return run

        def triton_n128_step():
            with _TritonTiles(2):
                grads(masked_linear(xg, wg, mask, backend="triton", tile_map=tiles))

        bt, bgt = {}, {}
        steps = (
            ("dense_linear", dense_step), ("fastkd_cuda", step("cuda")),
            ("fastkd_triton", step("triton")), ("fastkd_triton_n128", triton_n128_step),
            ("fastkd_auto", step("auto")), ("fastkd_torch", step("torch")),
        )
        for name, fn in steps:
            graphed = name in ("dense_linear", "fastkd_cuda", "fastkd_triton")
            _timed(name, fn, rep_ms, rec, "fwdbwd_", bt, bgt if graphed else None)
        rec["fwdbwd_ms"] = bt
        rec["fwdbwd_graph_ms"] = bgt
        if "dense_linear" in bt:
            rec["fwdbwd_speedup_vs_dense"] = {k_: bt["dense_linear"] / v for k_, v in bt.items()}
        if "dense_linear" in bgt:
            rec["fwdbwd_graph_speedup_vs_dense"] = {
                k_: bgt["dense_linear"] / v for k_, v in bgt.items()
            }
    return rec


def evaluate_targets(records) -> dict:
    """The issue's H100 targets, checked against this run's ratios."""
    out = {}

    def fwd(r, name):
        return r.get("fwd_speedup_vs_dense", {}).get(name)

    for kernel in ("fastkd_cuda", "fastkd_triton"):
        tag = "" if kernel == "fastkd_cuda" else "triton_"
        for sp, target in ((0.5, 1.6), (0.75, 3.0), (0.9, 6.0)):
            got = [fwd(r, kernel) for r in records
                   if r["pattern"] == "block64" and r["sparsity"] == sp and r["M"] >= 2048]
            got = [g for g in got if g is not None]
            out[f"{tag}block64_{int(sp * 100)}_fwd_M>=2048_min_speedup"] = {
                "target": target, "min": min(got) if got else None,
                "met": bool(got) and min(got) >= target}
        got = [r.get("fwdbwd_speedup_vs_dense", {}).get(kernel) for r in records
               if r["pattern"] == "block64" and r["sparsity"] == 0.75 and r["M"] >= 2048]
        got = [g for g in got if g is not None]
        out[f"{tag}block64_75_fwdbwd_M>=2048_min_speedup"] = {
            "target": 1.4, "min": min(got) if got else None, "met": bool(got) and min(got) >= 1.4}
    got = [max(fwd(r, "fastkd_auto") or 0, fwd(r, "semi_structured_2to4") or 0) for r in records
           if r["pattern"] == "2:4" and r["M"] >= 4096]
    out["2to4_fwd_M>=4096_best_speedup"] = {
        "target": 1.15, "min": min(got) if got else None, "met": bool(got) and min(got) >= 1.15}
    autos = [fwd(r, "fastkd_auto") for r in records if fwd(r, "fastkd_auto") is not None]
    out["auto_fwd_min_speedup_anywhere"] = {
        "target": 0.95, "min": min(autos) if autos else None,
        "met": bool(autos) and min(autos) >= 0.95}
    return out


def _sweep(quick: bool):
    if quick:
        return [16, 2048], [(4096, 4096)], [("block64", 0.75), ("2:4", None), ("unstructured", 0.5)]
    return M_LIST, KN_LIST, PATTERNS


def _cpu_points() -> list:
    """The reference path on the CPU, small shapes: dense F.linear vs masked_linear(backend="torch")."""
    from fastkd.functional import masked_linear

    records = []
    for m, k, n, pattern, sparsity in [(64, 512, 384, "unstructured", 0.5),
                                       (64, 512, 384, "block64", 0.75)]:
        torch.manual_seed(0)
        w = torch.randn(n, k) / k**0.5
        mask = make_mask(w, pattern, sparsity)
        x = torch.randn(m, k)
        dense = common.time_ms(lambda: Fn.linear(x, w), "cpu")
        for impl, fn in (("dense_linear", lambda: Fn.linear(x, w)),
                         ("fastkd_torch", lambda: masked_linear(x, w, mask, backend="torch"))):
            ms = dense if impl == "dense_linear" else common.time_ms(fn, "cpu")
            records.append({"op": "masked_linear", "impl": impl, "M": m, "K": k, "N": n,
                            "pattern": pattern, "sparsity": sparsity, "dtype": "float32",
                            "device": "cpu", "ms": ms, "speedup_vs_dense": dense / ms})
    return records


def run(device: str = "cuda", quick: bool = False, rep_ms: int = 100, backward: bool = True,
        after_point=None) -> list:
    """Records for this device (the `python -m fastkd bench` / gpu_check.sh convention).
    ``after_point(records)``, if given, is called with the records so far after each point (a
    run cut off by its time cap keeps them)."""
    if torch.device(device).type != "cuda":
        return _cpu_points()
    # Without fastkd._C the CUDA kernel's timings are recorded as errors; the rest still runs.
    m_list, kn_list, patterns = _sweep(quick)
    records = []
    for k, n in kn_list:
        for m in m_list:
            for pattern, sparsity in patterns:
                rec = one_point(m, k, n, pattern, sparsity, rep_ms, backward)
                records.append(rec)
                if after_point is not None:
                    after_point(records)
                sp = rec.get("fwd_speedup_vs_dense", {})
                gsp = rec.get("fwd_graph_speedup_vs_dense", {})
                bsp = rec.get("fwdbwd_graph_speedup_vs_dense", {})
                nan = float("nan")
                print(
                    f"M={m:<5} K={k:<5} N={n:<5} {pattern:>12} {str(sparsity):>5} "
                    f"cuda x{sp.get('fastkd_cuda', nan):.2f} "
                    f"triton x{sp.get('fastkd_triton', nan):.2f} "
                    f"(graph x{gsp.get('fastkd_triton', nan):.2f}, cold "
                    f"{rec.get('fwd_graph_cold_ms', {}).get('fastkd_triton', nan):.4f} ms vs "
                    f"dense {rec.get('fwd_graph_cold_ms', {}).get('dense_linear', nan):.4f}, "
                    f"n128 x{gsp.get('fastkd_triton_n128', nan):.2f}, "
                    f"fwd+bwd x{bsp.get('fastkd_triton', nan):.2f}) "
                    f"auto x{sp.get('fastkd_auto', nan):.2f} "
                    f"2:4 x{sp.get('semi_structured_2to4', nan):.2f} "
                    f"err cuda {rec.get('max_abs_err_vs_fp32', nan):.3g} "
                    f"triton {rec.get('triton_max_abs_err_vs_fp32', nan):.3g} "
                    f"(torch {rec['torch_bf16_err_vs_fp32']:.3g})",
                    flush=True,
                )
                torch.cuda.empty_cache()
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="M in {16, 2048}, one (K, N), three patterns")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per timing")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--out", default=None, help="JSON file path (default: print only)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out

    def result_of(records, final):
        targets = evaluate_targets(records) if device == "cuda" else {}
        return {"environment": environment(), "results": records, "targets": targets,
                "complete": final}

    def save(records, final=False):
        result = result_of(records, final)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(f"{out}.tmp", "w") as f:  # then rename: never a half-written file
            json.dump(result, f, indent=1)
        os.replace(f"{out}.tmp", out)
        return result

    records = run(device, args.quick, args.rep_ms, not args.no_backward,
                  after_point=save if out is not None else None)
    result = save(records, final=True) if out is not None else result_of(records, True)
    print(json.dumps(result["targets"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
