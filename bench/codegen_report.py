"""What the Triton kernels compile to on Hopper, without a GPU.

Compiles fastkd's Triton kernels ahead of time for sm_90 (Triton's own ptxas and cuobjdump; no
device needed) and reports, per kernel configuration: registers per thread, spill/stack bytes, and
for the hottest loop of the SASS its length and counts of barriers (BAR.SYNC), warp shuffles (SHFL),
exp2 (MUFU.EX2) and tensor-core instructions; plus whether the PTX uses tf32 anywhere. This is the
"read what costs no device time" step: a change that should cut barriers or spills can be checked
here before a GPU lease, and tests/test_codegen.py asserts the properties that must hold.

    python bench/codegen_report.py [--json] [--match SUBSTRING ...]

Run it with TRITON_INTERPRET unset (the interpreter replaces @triton.jit functions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_kernel(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int = 3,
                   values: dict | None = None, arch: int = 90):
    """types: type per runtime argument ('*bf16', 'i32', 'fp32', ...). values: representative
    runtime values of integer arguments, specialised the way Triton's launcher does: == 1 becomes
    the constant 1, a multiple of 16 gets the divisibility hint; pointers are taken as 16-byte
    aligned (what torch allocates). Without these the code is not what runs (no vector loads)."""
    values = values or {}
    consts = dict(constexprs)
    consts.update({k: 1 for k, v in values.items() if v == 1})
    sig = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            continue
        if sig[name].startswith("*") or (name in values and values[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v
                                                      for k, v in consts.items()}, attrs=attrs)
    target = TARGET if arch == 90 else GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def sass_of(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def resources_of(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    get = lambda key: max((int(v) for v in re.findall(rf"{key}:(\d+)", out)), default=0)  # noqa: E731
    return {"registers": get("REG"), "stack_bytes": get("STACK"), "local_bytes": get("LOCAL"),
            "shared_bytes": get("SHARED")}


def _loops(sass: str) -> list:
    """(start, end) address ranges of the backward branches' bodies, largest first."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA\s+(?:`\()?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            loops.append(body)
    return sorted(loops, key=len, reverse=True), [t for _, t in ins]


def analyse(kernel) -> dict:
    cubin = kernel.asm["cubin"]
    loops, all_ins = _loops(sass_of(cubin))
    hot = loops[0] if loops else []

    def count(body, pat):
        return sum(1 for t in body if re.search(pat, t))

    rec = resources_of(cubin)
    rec.update({
        "instructions": len(all_ins),
        "loop_instructions": len(hot),
        "loop_bar_sync": count(hot, r"\bBAR\.SYNC"),
        "loop_shfl": count(hot, r"\bSHFL"),
        "loop_mufu_ex2": count(hot, r"MUFU\.EX2"),
        "loop_mma": count(hot, r"\b(HMMA|IMMA|HGMMA|IGMMA)"),
        "loop_sts": count(hot, r"\bSTS\b|\bSTS\."),  # shared-memory stores by the threads
        "ptx_uses_tf32": ".tf32" in kernel.asm["ptx"],
        # fp32 max instructions that keep a nan operand, and those that drop it (return the other)
        "ptx_max_nan": len(re.findall(r"\bmax\.NaN\.f32\b", kernel.asm["ptx"])),
        "ptx_max_dropping_nan": len(re.findall(r"\bmax(?:\.ftz)?\.f32\b", kernel.asm["ptx"])),
        # IEEE round-to-nearest fp32 divisions (what torch's tensor / tensor does; the
        # approximate div.full would make codes differ from the reference's)
        "ptx_div_rn": len(re.findall(r"\bdiv\.rn(?:\.ftz)?\.f32\b", kernel.asm["ptx"])),
    })
    return rec


def cases():
    """(name, thunk compiling one kernel configuration)."""
    from fastkd.kernels import int8_linear, kd_loss

    kd_types = {"student_ptr": "*bf16", "teacher_ptr": "*bf16", "target_ptr": "*i64",
                "loss_ptr": "*fp32", "stats_ptr": "*fp32", "rows_inner": "i32",
                "stride_s0": "i32", "stride_s1": "i32", "stride_t0": "i32", "stride_t1": "i32",
                "n_cols": "i32", "scale2": "fp32", "temp_sq": "fp32", "alpha": "fp32",
                "ignore_index": "i32", "beta": "fp32", "lb2": "fp32", "l1b2": "fp32",
                "grad_rows_ptr": "*fp32", "stride_g": "i32", "grad_ptr": "*bf16",
                "stride_out": "i32", "c_kl": "fp32", "c_ce": "fp32"}
    v = 128256  # a Llama-3 vocabulary; rows contiguous (one run of 16384 rows)
    kd_values = {"rows_inner": 16384, "stride_s0": 0, "stride_s1": v, "stride_t0": 0,
                 "stride_t1": v, "n_cols": v, "stride_out": v, "stride_g": 0}
    out = []
    for block, warps, reduce in [(8192, 16, 0), (8192, 16, 1), (8192, 16, 2), (4096, 8, 0)]:
        consts = {"HAS_TARGET": True, "SEPARATE_CE": True, "DIVERGENCE": 0, "N_STATS": 3,
                  "BLOCK_V": block}
        fwd = kd_loss._kd_loss_fwd_kernel
        out.append((f"kd_loss fwd REDUCE={reduce} BLOCK_V={block} warps={warps}",
                    lambda c=dict(consts, REDUCE=reduce), w=warps: compile_kernel(
                        fwd, kd_types, c, w, values=kd_values)))
        if reduce == 0:
            bwd = kd_loss._kd_loss_bwd_kernel
            out.append((f"kd_loss bwd BLOCK_V={block} warps={warps}",
                        lambda c=consts, w=warps: compile_kernel(bwd, kd_types, c, w,
                                                                 values=kd_values)))
    # the top-k teacher kernels (k = 64), forward with and without a tail bucket, both backwards
    from fastkd.kernels import kd_topk

    topk_types = dict(kd_types, ids_ptr="*i64", sorted_ids_ptr="*i64", lp_ptr="*fp32",
                      stride_ids="i32", stride_sorted="i32", stride_lp="i32", k="i32")
    topk_values = dict(kd_values, stride_ids=64, stride_sorted=64, stride_lp=64, k=64)
    block, warps = kd_topk._launch_config(v)
    for has_tail in (True, False):
        consts = {"HAS_TARGET": True, "SEPARATE_CE": True, "HAS_TAIL": has_tail,
                  "BLOCK_V": block, "BLOCK_K": 64}
        out.append((f"kd_topk fwd tail={has_tail}", lambda c=consts: compile_kernel(
            kd_topk._kd_topk_fwd_kernel, topk_types, c, warps, values=topk_values)))
    common = {"HAS_TARGET": True, "SEPARATE_CE": True}
    out.append(("kd_topk bwd", lambda: compile_kernel(
        kd_topk._kd_topk_bwd_kernel, topk_types, dict(common, BLOCK_V=block), warps,
        values=topk_values)))
    out.append(("kd_topk bwd ids", lambda: compile_kernel(
        kd_topk._kd_topk_bwd_ids_kernel, topk_types, dict(common, BLOCK_K=64), 4,
        values=topk_values)))
    # per-token quantization of bf16 activations, a row in one block (K = 4096) and in two passes
    # (and with SmoothQuant factors divided out in the same pass)
    q_types = {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "smooth_ptr": "*fp32",
               "stride_xm": "i32", "stride_xk": "i32", "stride_qm": "i32", "K": "i32"}
    for k_row, block, one_pass, smooth in ((4096, 4096, True, False), (14336, 4096, False, False),
                                           (4096, 4096, True, True)):
        label = f"int8_linear quantize K={k_row}" + (" smoothed" if smooth else "")
        out.append((label, lambda b=block, o=one_pass, kr=k_row, sm=smooth: (
            compile_kernel(int8_linear._quantize_per_token_kernel, q_types,
                           {"BLOCK_K": b, "ONE_PASS": o, "HAS_SMOOTH": sm}, 8,
                           values={"stride_xm": kr, "stride_xk": 1, "stride_qm": kr, "K": kr}))))
    gemm_types = {"a_ptr": "*fp32", "a_scale_ptr": "*fp32", "w_ptr": "*i8", "w_scale_ptr": "*fp32",
                  "bias_ptr": "*fp32", "c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                  "stride_am": "i32", "stride_ak": "i32", "stride_wn": "i32", "stride_wk": "i32",
                  "stride_cm": "i32", "stride_cn": "i32"}
    k = n = 4096
    gemm_values = {"M": 2048, "N": n, "K": k, "stride_am": k, "stride_ak": 1, "stride_wn": k,
                   "stride_wk": 1, "stride_cm": n, "stride_cn": 1}
    gemm = int8_linear._int8_weight_gemm_kernel
    for dtype in ("fp32", "bf16"):
        types = dict(gemm_types, a_ptr=f"*{dtype}", c_ptr=f"*{dtype}")
        consts = {"A_INT8": False, "HAS_BIAS": True, "IEEE_FP32": dtype == "fp32",
                  "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}
        out.append((f"int8_linear w8a16 {dtype} 64x64x64",
                    lambda t=types, c=consts: compile_kernel(gemm, t, c, 4, values=gemm_values)))
    # Every autotuning candidate of the int8 GEMM (bf16 activations for w8a16, bias bf16)
    for a_int8, table in ((True, int8_linear._W8A8_CONFIGS), (False, int8_linear._W8A16_CONFIGS)):
        types = dict(gemm_types, a_ptr="*i8" if a_int8 else "*bf16", c_ptr="*bf16",
                     bias_ptr="*bf16")
        for bucket, configs in table.items():
            for cfg in configs:
                consts = dict(cfg.kwargs, A_INT8=a_int8, HAS_BIAS=True, IEEE_FP32=False)
                name = (f"int8_linear {'w8a8' if a_int8 else 'w8a16'} bucket {bucket} "
                        f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']}"
                        f" w{cfg.num_warps} s{cfg.num_stages}")
                out.append((name, lambda t=types, c=consts, cfg=cfg: compile_kernel(
                    gemm, t, c, cfg.num_warps, cfg.num_stages, values=gemm_values)))
    # the swapped W8A16 GEMM (weight as wgmma's register A operand), every autotuning candidate
    swapped_types = {k: v for k, v in gemm_types.items()}
    swapped_types.update(a_ptr="*bf16", c_ptr="*bf16", bias_ptr="*bf16")
    for bucket, configs in int8_linear._W8A16_SWAPPED_CONFIGS.items():
        for cfg in configs:
            consts = dict(cfg.kwargs, HAS_BIAS=True)
            name = (f"int8_linear w8a16 swapped bucket {bucket} {cfg.kwargs['BLOCK_M']}x"
                    f"{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']} w{cfg.num_warps} "
                    f"s{cfg.num_stages}")
            out.append((name, lambda c=consts, cfg=cfg: compile_kernel(
                int8_linear._w8a16_gemm_swapped_kernel, swapped_types, c, cfg.num_warps,
                cfg.num_stages, values=gemm_values)))
    # the int8 decode GEMV (M <= 4), every autotuning candidate
    gemv_values = dict(gemm_values, M=1)
    for a_int8 in (True, False):
        types = dict(gemm_types, a_ptr="*i8" if a_int8 else "*bf16", c_ptr="*bf16",
                     bias_ptr="*bf16")
        for cfg in int8_linear._GEMV_CONFIGS:
            consts = dict(cfg.kwargs, A_INT8=a_int8, HAS_BIAS=True)
            name = (f"int8_linear gemv {'w8a8' if a_int8 else 'w8a16'} "
                    f"{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']} w{cfg.num_warps}")
            out.append((name, lambda t=types, c=consts, cfg=cfg: compile_kernel(
                int8_linear._int8_weight_gemv_kernel, t, c, cfg.num_warps, cfg.num_stages,
                values=gemv_values)))
    out.extend(_masked_cases())
    return out


def _masked_cases():
    """The block-sparse masked-linear kernels at the launcher's bf16 configurations (M = 2048)."""
    import torch

    from fastkd.kernels import masked_linear as ml

    m, n, k = 2048, 4096, 4096
    mm_types = {"a_ptr": "*bf16", "w_ptr": "*bf16", "keep_ptr": "*u8", "bias_ptr": "*bf16",
                "out_ptr": "*bf16", "map_ptr": "*i32", "M": "i32", "OUT": "i32", "RED": "i32",
                "stride_am": "i32", "stride_ar": "i32", "stride_wo": "i32", "stride_wr": "i32",
                "stride_ko": "i32", "stride_kr": "i32", "stride_om": "i32", "stride_oo": "i32",
                "count_off": "i32", "nfull_off": "i32", "idx_off": "i32", "list_width": "i32"}
    mm_values = {"M": m, "OUT": n, "RED": k, "stride_am": k, "stride_ar": 1, "stride_wo": k,
                 "stride_wr": 1, "stride_ko": k, "stride_kr": 1, "stride_om": n, "stride_oo": 1,
                 "list_width": 64}
    gw_types = {"g_ptr": "*bf16", "x_ptr": "*bf16", "keep_ptr": "*u8", "out_ptr": "*bf16",
                "map_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "k_tiles": "i32",
                "stride_gm": "i32", "stride_gn": "i32", "stride_xm": "i32", "stride_xk": "i32",
                "stride_kn": "i32", "stride_kk": "i32", "stride_on": "i32", "stride_ok": "i32"}
    gw_values = {"M": m, "N": n, "K": k, "k_tiles": k // ml.TILE, "stride_gm": n, "stride_gn": 1,
                 "stride_xm": k, "stride_xk": 1, "stride_kn": k, "stride_kk": 1, "stride_on": k,
                 "stride_ok": 1}
    out = []
    for tiles in (1, 2):
        bm, bo, warps, stages = ml._mm_config(m, torch.bfloat16, tiles, "cuda")
        consts = {"HAS_BIAS": True, "IEEE_FP32": False, "BLOCK_M": bm, "BLOCK_O": bo,
                  "TILE_R": ml.TILE, "GROUP": ml.GROUP_M}
        out.append((f"masked_linear mm bf16 {bm}x{bo} w{warps} s{stages}",
                    lambda c=consts, w=warps, st=stages: compile_kernel(
                        ml._masked_mm_kernel, mm_types, c, w, st, values=mm_values)))
    bm, warps, stages = ml._grad_weight_config(m, torch.bfloat16, "cuda")
    consts = {"IEEE_FP32": False, "BLOCK_M": bm, "TILE_N": ml.TILE, "TILE_K": ml.TILE}
    out.append((f"masked_linear grad_weight bf16 BLOCK_M={bm} w{warps} s{stages}",
                lambda c=consts: compile_kernel(ml._masked_grad_weight_kernel, gw_types, c, warps,
                                                stages, values=gw_values)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--match", action="append", default=[],
                   help="only kernels whose name contains this (repeatable)")
    args = p.parse_args(argv)
    results = {}
    for name, thunk in cases():
        if args.match and not any(m in name for m in args.match):
            continue
        results[name] = analyse(thunk())
    if args.json:
        print(json.dumps({"triton": triton.__version__, "target": "sm_90", "kernels": results}))
        return 0
    cols = ["registers", "stack_bytes", "loop_instructions", "loop_bar_sync", "loop_shfl",
            "loop_mufu_ex2", "loop_mma", "ptx_uses_tf32"]
    print(f"Triton {triton.__version__}, sm_90, compiled ahead of time")
    print(f"{'kernel':<52}" + "".join(f"{c:>18}" for c in cols))
    for name, r in results.items():
        print(f"{name:<52}" + "".join(f"{str(r[c]):>18}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
