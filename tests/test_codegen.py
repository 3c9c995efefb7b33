"""Properties of the Triton kernels' Hopper code, checked without a GPU.

bench/codegen_report.py compiles the kernels ahead of time for sm_90 with Triton's own toolchain;
these tests pin what the interpreter cannot see: fp32 inputs must not go through tf32 tensor-core
math (it did once, in the shared linear, and only a GPU run showed it), and the KD kernels' loops
keep their barrier and spill budget (the forward's per-step block reductions are the suspect for
its 2.6 TB/s on an H200 while the backward streamed at 4.3 TB/s).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

triton = pytest.importorskip("triton")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CUOBJDUMP),
                       reason="this Triton install has no NVIDIA toolchain (cuobjdump)"),
]


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "bench", "codegen_report.py"), "--json",
           "--match", "kd_loss", "--match", "64x64x64"]
    proc = subprocess.run(cmd,
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["kernels"]


def test_fp32_gemm_does_not_use_tf32(report):
    fp32 = report["int8_linear w8a16 fp32 64x64x64"]
    bf16 = report["int8_linear w8a16 bf16 64x64x64"]
    assert not fp32["ptx_uses_tf32"]
    assert bf16["loop_mma"] > 0  # the half-precision path does use the tensor cores


def test_kd_loops_keep_their_barrier_and_spill_budget(report):
    """kl with a target at T != 1 (three exponential streams), sm_90."""
    kd = {k: v for k, v in report.items() if k.startswith("kd_loss")}
    assert len(kd) == 6, sorted(kd)
    for name, r in kd.items():
        # no spills; Triton 3.6 (the H200's) leaves an 8-byte stack slot in forwards 0 and 1
        budget = 8 if "fwd REDUCE=0" in name or "fwd REDUCE=1" in name else 0
        assert r["stack_bytes"] <= budget and r["local_bytes"] <= budget, (name, r)
    bwd = report["kd_loss bwd BLOCK_V=8192 warps=16"]
    assert bwd["loop_bar_sync"] == 0, bwd  # the backward's loop reduces nothing
    # The forward's reduction variants (kernels/kd_loss.py REDUCE): per quantity, tuple, lane sums.
    bars = [report[f"kd_loss fwd REDUCE={r} BLOCK_V=8192 warps=16"]["loop_bar_sync"]
            for r in (0, 1, 2)]
    assert bars[2] <= 4 and bars[1] < bars[0], bars
    # Same exponentials in each: three streams per element, nothing per-lane added by variant 2.
    ex2 = [report[f"kd_loss fwd REDUCE={r} BLOCK_V=8192 warps=16"]["loop_mufu_ex2"]
           for r in (0, 1, 2)]
    assert max(ex2) - min(ex2) <= 4 and max(ex2) <= bwd["loop_mufu_ex2"] + 4, (ex2, bwd)


def test_int8_quantization_keeps_a_nan():
    """A nan activation must make its row's scale nan, so the int8 linear's output row is nan as
    in F.linear. The interpreter cannot show this (numpy's max propagates nan); on the GPU a plain
    max returns the other operand, so the amax must use max.NaN. (The clamp of the codes to
    [-127, 127] may still drop it: the nan scale carries it to the output.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "bench", "codegen_report.py"), "--json",
           "--match", "int8_linear quantize"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])["kernels"]
    assert len(kernels) == 3, kernels  # a row in one block, in two passes, and smoothed
    for name, r in kernels.items():
        assert r["ptx_max_nan"] > 0, (name, r)
    # SmoothQuant's division by the factors is IEEE (div.rn), as the reference's, so the codes
    # agree bit for bit: one more div.rn per element than the plain pass
    plain, smoothed = kernels["int8_linear quantize K=4096"], \
        kernels["int8_linear quantize K=4096 smoothed"]
    assert smoothed["ptx_div_rn"] > plain["ptx_div_rn"] > 0, (plain, smoothed)


def test_swapped_w8a16_gemm_keeps_the_weight_in_registers():
    """The swapped W8A16 GEMM exists to give wgmma the converted weight tile from registers: its
    loop must have no thread stores to shared memory (the plain kernel's has them, one round trip
    per K step) and must still run on the tensor cores, without spills, for every candidate."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "bench", "codegen_report.py"), "--json",
           "--match", "int8_linear w8a16 swapped", "--match", "int8_linear w8a16 bucket 3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])["kernels"]
    swapped = {k: v for k, v in kernels.items() if "swapped" in k}
    plain = {k: v for k, v in kernels.items() if "swapped" not in k}
    assert len(swapped) >= 10 and plain, sorted(kernels)
    for name, r in swapped.items():
        assert r["loop_sts"] == 0 and r["loop_mma"] > 0, (name, r)
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, (name, r)
    assert all(r["loop_sts"] > 0 for r in plain.values()), plain  # what the variant removes


@pytest.mark.parametrize("family", ["int8_linear gemv", "masked_linear", "kd_topk"])
def test_gpu_kernels_compile_for_sm90_without_spills(family):
    """Kernels the interpreter tests but no CI machine compiles: lowering for sm_90 must succeed
    (an interpreter-only pass says nothing about it) and their configurations must not spill."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "bench", "codegen_report.py"), "--json",
           "--match", family]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])["kernels"]
    assert kernels, family
    for name, r in kernels.items():
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, (name, r)
    if family == "masked_linear":  # the block-sparse GEMMs run on the tensor cores
        assert all(r["loop_mma"] > 0 for r in kernels.values()), kernels


def test_shared_linear_kernels_compile_for_sm90():
    """Every shared-linear kernel configuration the launcher picks at M = 16 and 4096 (fused v2 for
    each codebook layout, the dequantize kernel, v1) lowers for sm_90; the bf16 ones do not spill
    (the fp32 exact path is allowed to: it is for correctness, not speed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "bench", "compile_report_shared_linear.py"),
           "--m", "16", "4096"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert not any("FAILED" in ln for ln in lines), proc.stdout[-4000:]
    reports = [(lines[i - 1], ln) for i, ln in enumerate(lines) if ln.strip().startswith("regs=")]
    assert len(reports) >= 12, proc.stdout[-4000:]
    for label, rep in reports:
        if "fp32" not in label:
            assert " local=0 " in f" {rep.strip()} ", (label, rep)
