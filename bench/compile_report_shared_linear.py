"""Compile the shared-linear Triton kernels for a GPU architecture on a machine without a GPU and
report what the code does: registers, shared memory, local-memory spills, and instruction counts
from the SASS (vector and scalar global loads, cp.async, shared loads, mma/wgmma, shuffles,
barriers). This is how v2's design was checked before any GPU run (bench/notes_shared_linear.md).

    python bench/compile_report_shared_linear.py [--arch 90] [--sms 132] [--dump DIR]

Uses Triton's ptxas and cuobjdump (shipped in the triton wheel) through bench/codegen_report.py's
helpers. Checked with Triton 3.6 and 3.9.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402

from codegen_report import resources_of, sass_of  # noqa: E402
from codegen_report import compile_kernel as _compile  # noqa: E402
from fastkd.kernels import shared_linear as SL  # noqa: E402

SASS_COUNTS = {
    "LDG": r"\bLDG\.", "LDG.128": r"\bLDG\.E\.128", "LDGSTS": r"\bLDGSTS",
    "LDS": r"\bLDS\b|\bLDS\.",
    "STS": r"\bSTS\b|\bSTS\.", "LDSM": r"\bLDSM", "HMMA": r"\bHMMA", "HGMMA": r"\bHGMMA",
    "SHFL": r"\bSHFL", "BAR": r"\bBAR\.", "total": r"/\*[0-9a-f]{4}\*/ ",
}


def compile_kernel(fn, types: dict, consts: dict, aligned: list, warps: int, stages: int,
                   arch: int):
    """A 4096 x 4096 layer: the `aligned` integers are multiples of 16 (pointers always are)."""
    values = {n: 4096 for n in aligned if not types[n].startswith("*")}
    return _compile(fn, types, consts, warps, stages, values=values, arch=arch)


def report(ck, label: str, dump: str | None = None) -> dict:
    usage = resources_of(ck.asm["cubin"])
    sass = sass_of(ck.asm["cubin"])
    rec = {"regs": usage["registers"], "smem": ck.metadata.shared, "local": usage["local_bytes"],
           **{k: len(re.findall(v, sass)) for k, v in SASS_COUNTS.items()}}
    print(f"{label}\n    " + " ".join(f"{k}={v}" for k, v in rec.items()), flush=True)
    if dump:
        base = os.path.join(dump, re.sub(r"[^A-Za-z0-9_=.-]+", "_", label))
        for ext in ("ttgir", "ptx"):
            with open(f"{base}.{ext}", "w") as out:
                out.write(ck.asm[ext])
        with open(f"{base}.sass", "w") as out:
            out.write(sass)
    return rec


def fused(dtype: str, bits: int, per_channel: bool, cfg: dict, arch: int):
    tdt = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype])
    ints = ["M", "N", "K", "KB", "K_SPLIT", "KB_SPLIT", "stride_xm", "stride_in", "stride_ym",
            "stride_cb"]
    types = {"x_ptr": f"*{dtype}", "idx_ptr": "*u8", "cb_ptr": "*fp32", "bias_ptr": "*fp32",
             "y_ptr": f"*{dtype}", "part_ptr": "*fp32", **{n: "i32" for n in ints}}
    consts = {"BITS": bits, "PER_CHANNEL": per_channel, "HAS_BIAS": False,
              "IEEE_FP32": dtype == "fp32", "LOOKUP": SL._lookup_kind(bits, per_channel, tdt),
              "SPLIT": cfg["split"] > 1, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
              "BLOCK_K": cfg["BLOCK_K"]}
    aligned = [n for n in types if n != "M"]  # a 4096 x 4096 layer: every size and stride % 16 == 0
    return compile_kernel(SL._shared_linear_fwd_kernel, types, consts, aligned, cfg["num_warps"],
                          cfg["num_stages"], arch)


def v1(dtype: str, bits: int, per_channel: bool, m: int, arch: int):
    bm, bn, bk, warps, stages = SL._v1_blocks(m, "cuda")
    ints = ["M", "N", "K", "stride_xm", "stride_xk", "stride_in", "stride_ym", "stride_cb"]
    types = {"x_ptr": f"*{dtype}", "idx_ptr": "*u8", "cb_ptr": "*fp32", "bias_ptr": "*fp32",
             "y_ptr": f"*{dtype}", **{n: "i32" for n in ints}}
    consts = {"BITS": bits, "PER_CHANNEL": per_channel, "HAS_BIAS": False,
              "IEEE_FP32": dtype == "fp32", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
              "stride_xk": 1}
    aligned = [n for n in types if n not in ("M", "stride_xk")]
    return compile_kernel(SL._shared_linear_v1_kernel, types, consts, aligned, warps, stages, arch)


def dequant(bits: int, per_channel: bool, arch: int):
    ints = ["N", "K", "KB", "stride_in", "stride_cb", "stride_wn"]
    types = {"idx_ptr": "*u8", "cb_ptr": "*fp32", "w_ptr": "*bf16", **{n: "i32" for n in ints}}
    consts = {"BITS": bits, "PER_CHANNEL": per_channel,
              "LOOKUP": SL._lookup_kind(bits, per_channel, torch.bfloat16),
              "BLOCK_N": 32, "BLOCK_K": 256}
    return compile_kernel(SL._shared_dequant_kernel, types, consts, list(types), 4, 1, arch)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--sms", type=int, default=132, help="SM count the K split is sized for")
    p.add_argument("--m", type=int, nargs="*", default=[1, 16, 128, 4096])
    p.add_argument("--dump", default=None, help="write TTGIR, PTX and SASS here")
    args = p.parse_args(argv)
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.sms} SMs, N = K = 4096")
    dev = torch.device("cuda", 0)
    SL._SM_COUNT[0] = args.sms  # fused_config asks the device otherwise
    layouts = [("bf16", 4, False), ("bf16", 4, True), ("bf16", 6, False), ("bf16", 6, True),
               ("fp32", 4, False)]
    for m in args.m:
        for dtype, bits, pc in layouts:
            tdt = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype])
            cfg = SL.fused_config(m, 4096, 4096, dev, tdt, SL._lookup_kind(bits, pc, tdt))
            label = f"v2_fused M={m} {dtype} bits={bits} per_channel={pc} {cfg}"
            try:
                report(fused(dtype, bits, pc, cfg, args.arch), label, args.dump)
            except Exception as exc:  # report every case
                print(f"{label}\n    FAILED {type(exc).__name__}: {str(exc)[:500]}")
    for bits, pc in [(4, False), (4, True), (6, True)]:
        report(dequant(bits, pc, args.arch), f"v2_dequant kernel bf16 bits={bits} per_channel={pc}",
               args.dump)
    for m in (16, 4096):
        report(v1("bf16", 4, False, m, args.arch), f"v1 M={m} bf16 bits=4 per_channel=False",
               args.dump)


if __name__ == "__main__":
    sys.exit(main())
