"""Mixture-of-Experts benchmark: fastkd.nn.Int8Experts against the same experts in bf16.

One MoE block's experts as transformers 5 holds them (3-D stacked weights, gated: gate_up_proj
(E, 2I, H), down_proj (E, H, I)), top-2 routing of T tokens drawn uniformly. Implementations,
timed in the same run (triton.testing.do_bench on CUDA: median with 20th/80th percentiles):
  bf16_loop      the float experts, looped over the experts a batch reaches as transformers'
                 eager forward does (F.linear per expert)
  bf16_grouped   torch._grouped_mm over the experts (what transformers picks by default where it
                 runs), when this torch has it
  w8a8, w8a16    Int8Experts (int8_linear per expert reached: Triton on CUDA)
Weight bytes are reported per implementation (int8 codes + fp32 scales against bf16).

CUDA default: Mixtral-8x7B's experts (E = 8, H = 4096, I = 14336), T in {1, 16, 128, 2048}
(--quick: {16, 2048}). CPU: E = 4, H = 256, I = 704, T = 64, fp32, the torch reference.

    python bench/bench_int8_experts.py [--device D] [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from fastkd.nn import Int8Experts  # noqa: E402


class FloatExperts(nn.Module):
    """Gated experts with transformers' layout and flags (what Int8Experts.from_experts reads)."""

    def __init__(self, e, h, i, device, dtype):
        super().__init__()
        self.num_experts, self.has_gate, self.has_bias = e, True, False
        self.is_transposed, self.has_post_expert_norm, self.is_concatenated = False, False, True
        g = torch.Generator(device=device).manual_seed(0)
        self.gate_up_proj = nn.Parameter(
            torch.randn(e, 2 * i, h, device=device, generator=g).mul_(h ** -0.5).to(dtype))
        self.down_proj = nn.Parameter(
            torch.randn(e, h, i, device=device, generator=g).mul_(i ** -0.5).to(dtype))
        self.act_fn = nn.SiLU()

    def _apply_gate(self, x):
        gate, up = x.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, x, idx, w):  # transformers' eager loop
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            token, slot = torch.where(idx == e)
            h = self._apply_gate(nn.functional.linear(x[token], self.gate_up_proj[e]))
            h = nn.functional.linear(h, self.down_proj[e]) * w[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out

    def grouped(self, x, idx, w):  # one grouped GEMM per projection over tokens sorted by expert
        flat = idx.reshape(-1)
        order = torch.argsort(flat)
        token = order // idx.shape[1]
        counts = torch.bincount(flat, minlength=self.num_experts)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[token]
        h = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs)
        h = torch._grouped_mm(self._apply_gate(h), self.down_proj.transpose(1, 2), offs=offs)
        h = h * w.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, h.to(x.dtype))


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def run(device: str = "cuda", quick: bool = False) -> list:
    if device == "cuda":
        e, h, i, dt, backend = 8, 4096, 14336, torch.bfloat16, "auto"
        tokens = [16, 2048] if quick else [1, 16, 128, 2048]
    else:
        e, h, i, dt, backend = 4, 256, 704, torch.float32, "torch"
        tokens = [64]
    experts = FloatExperts(e, h, i, device, dt)
    impls = {"bf16_loop" if dt == torch.bfloat16 else "float_loop": (experts, experts.forward)}
    if device == "cuda" and hasattr(torch, "_grouped_mm"):
        impls["bf16_grouped"] = (experts, experts.grouped)
    for mode in ("w8a8", "w8a16"):
        q = Int8Experts.from_experts(experts, mode=mode, backend=backend)
        impls[mode] = (q, q.forward)
    g = torch.Generator(device=device).manual_seed(1)
    records = []
    for t in tokens:
        x = torch.randn(t, h, device=device, dtype=dt, generator=g)
        idx = torch.rand(t, e, device=device, generator=g).topk(2, dim=-1).indices
        w = torch.rand(t, 2, device=device, generator=g).to(dt)
        first = len(records)
        ref = None
        for name, (module, fn) in impls.items():
            rec = {"op": "moe_experts", "impl": name, "tokens": t, "experts": e, "hidden": h,
                   "inner": i, "top_k": 2, "dtype": str(dt).replace("torch.", ""),
                   "device": device, "weight_bytes": _nbytes(module)}
            try:
                with torch.no_grad():
                    out = fn(x, idx, w)
                    ref = out if ref is None else ref
                    rec["rel_err_vs_float"] = float((out.float() - ref.float()).norm()
                                                    / ref.float().norm())
                    rec.update(common.time_stats(lambda: fn(x, idx, w), device, cpu_reps=3))
            except Exception as exc:
                rec["error"] = ("OOM: " if common.is_oom(exc) else "") + repr(exc)[:200]
            records.append(rec)
            print(rec, flush=True)
        base = records[first].get("ms")
        # transformers' default experts path (the one a user runs) is the grouped one: the
        # ratio to quote
        grouped = next((r.get("ms") for r in records[first:] if r.get("impl") == "bf16_grouped"),
                       None)
        for r in records[first:]:
            if r.get("ms") and base:
                r["speedup_vs_float_loop"] = base / r["ms"]
            if r.get("ms") and grouped:
                r["speedup_vs_grouped"] = grouped / r["ms"]
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="JSON file path (default: print only)")
    args = p.parse_args(argv)
    records = run(args.device, args.quick)
    common.print_table(records, ["impl", "tokens", "dtype", "ms", "ms_p20", "ms_p80",
                                 "speedup_vs_float_loop", "weight_bytes", "rel_err_vs_float",
                                 "error"])
    if args.out:
        print("wrote", common.write_json(records, args.out, {"benchmark": "int8_experts"}))


if __name__ == "__main__":
    main()
