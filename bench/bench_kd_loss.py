"""KD loss benchmark: fastkd's fused kernel against what a user would otherwise run.

Forward + backward of the full loss (T^2-scaled KL + hard-label CE, alpha = 0.5, T = 2, a few
ignored rows), bf16 logits on CUDA. Implementations, all timed in the same run:
  fastkd       fastkd.functional.kd_loss (Triton on CUDA)
  fastkd reduce=R  the same with the forward's step reductions done another way (CUDA only)
  torch        the loss written in plain torch (log_softmax, kl_div, cross_entropy), eager
  torch.compile  the same function under torch.compile
  liger        LigerKLDIVLoss on torch log-softmax outputs + torch cross-entropy (when installed)
Reported: median ms (do_bench), ratio = baseline ms / fastkd ms, effective GB/s for fastkd's five
passes over N x V (read s, t; read s, t; write grad) and peak extra memory beyond the inputs;
separately, the forward alone for each fastkd variant (fwd_ms), where the variants differ.

    python bench/bench_kd_loss.py --out bench/results/kd_loss-<date>-<device>.json [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as TF

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastkd  # noqa: E402

TEMPERATURE = 2.0
ALPHA = 0.5


def torch_kd_loss(s, t, y, T=TEMPERATURE, alpha=ALPHA):
    """What a user writes without fastkd (fp32 upcast, as training code usually does)."""
    log_ps = TF.log_softmax(s.float() / T, dim=-1)
    log_pt = TF.log_softmax(t.float() / T, dim=-1)
    valid = y != -100
    kl = TF.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1)
    soft = (kl * valid).sum() / valid.sum().clamp_min(1) * T * T
    ce = TF.cross_entropy(s.float(), y, ignore_index=-100)
    return alpha * soft + (1 - alpha) * ce


def liger_kd_loss_factory():
    """The KD loss a Liger-Kernel user assembles: Liger's KL divergence (it takes
    log-probabilities, so the temperature softmax of the counted rows is torch's) and Liger's
    fused cross-entropy. (Until 2026-12-01 the CE here was torch's fp32 cross_entropy: the
    H200 figure of 2026-11-30 was measured that way.)"""
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except Exception:
        return None
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger_ce = LigerCrossEntropyLoss(ignore_index=-100)
    except Exception:  # an older Liger: torch's, as before
        liger_ce = None
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(s, t, y, T=TEMPERATURE, alpha=ALPHA):
        valid = y != -100
        log_ps = TF.log_softmax(s[valid].float() / T, dim=-1)
        log_pt = TF.log_softmax(t[valid].float() / T, dim=-1)
        ce = (liger_ce(s, y) if liger_ce is not None
              else TF.cross_entropy(s.float(), y, ignore_index=-100))
        return alpha * T * T * kl(log_ps, log_pt) + (1 - alpha) * ce

    return loss


class _CompiledPerShape:
    """torch.compile(fn) made anew for every (n, v): Inductor tunes for the shape it times."""

    def __init__(self, fn):
        self.fn, self.shape, self.compiled = fn, None, None

    def __call__(self, s, t, y, **kw):
        if self.compiled is None or self.shape != tuple(s.shape):
            torch._dynamo.reset()
            self.shape, self.compiled = tuple(s.shape), torch.compile(self.fn, dynamic=False)
        return self.compiled(s, t, y, **kw)


def fastkd_loss(s, t, y, T=TEMPERATURE, alpha=ALPHA):
    return fastkd.functional.kd_loss(s, t, y, temperature=T, alpha=alpha)


def fastkd_variant(reduce: int):
    """fastkd with the forward's step reductions done another way (kernels/kd_loss.py REDUCE),
    timed next to the default so a GPU run can decide between them."""
    from fastkd.kernels import kd_loss as kk

    def loss(s, t, y, T=TEMPERATURE, alpha=ALPHA):
        old, kk.FWD_REDUCE = kk.FWD_REDUCE, reduce
        try:
            return fastkd.functional.kd_loss(s, t, y, temperature=T, alpha=alpha)
        finally:
            kk.FWD_REDUCE = old

    return loss


def _inputs(n, v, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    s = (torch.randn(n, v, device=device, generator=g) * 2).to(dtype).requires_grad_()
    t = (torch.randn(n, v, device=device, generator=g) * 2).to(dtype)
    y = torch.randint(0, v, (n,), device=device, generator=g)
    y[:: max(1, n // 16)] = -100
    return s, t, y


def _fwd_bwd(fn, s, t, y):
    def step():
        s.grad = None
        fn(s, t, y).backward()

    return step


def shapes(device: str, quick: bool):
    if device != "cuda":
        return [(64, 4096), (16, 32000)] if not quick else [(32, 4096)]
    if quick:
        return [(4096, 32000), (16384, 128256), (256, 128256)]
    headline = [(16384, 128256)]
    v_sweep = [(4096, v) for v in (1024, 8192, 32000, 50257, 128256, 151936, 256000)]
    n_sweep = [(n, 128256) for n in (1, 16, 256, 1024, 4096, 65536)]
    return headline + v_sweep + n_sweep


def run(device: str = "cuda", quick: bool = False) -> list:
    """Benchmark records (dicts) for the shapes of this device; the `python -m fastkd bench` hook."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    impls = {"fastkd": fastkd_loss, "torch": torch_kd_loss}
    if device == "cuda":
        from fastkd.kernels import kd_loss as kk

        for r in (0, 1, 2):
            if r != kk.FWD_REDUCE:
                impls[f"fastkd reduce={r}"] = fastkd_variant(r)
        # compiled for each shape (static, dynamo reset per shape, compile time outside the
        # timing): one dynamic=True compilation kept the kernels Inductor autotuned for the
        # first shape of the sweep for every later one, the headline included
        impls["torch.compile"] = _CompiledPerShape(torch_kd_loss)
        liger = liger_kd_loss_factory()
        if liger is not None:
            impls["liger"] = liger
    records = []
    for n, v in shapes(device, quick):
        row_ms = {}
        for name, fn in impls.items():
            rec = {"op": "kd_loss", "impl": name, "n": n, "v": v, "dtype": str(dtype)[6:],
                   "temperature": TEMPERATURE, "alpha": ALPHA, "device": device}
            try:
                s, t, y = _inputs(n, v, device, dtype)
                step = _fwd_bwd(fn, s, t, y)
                step()  # compiles / autotunes (torch.compile, Triton) outside what is measured
                rec["peak_extra_mb"] = (
                    None if (b := common.peak_extra_bytes(step, device)) is None else b / 2**20
                )
                rec["ms"] = common.time_ms(step, device)
                row_ms[name] = rec["ms"]
                if name.startswith("fastkd"):  # the forward alone: where the variants differ
                    sd = s.detach()
                    rec["fwd_ms"] = common.time_ms(lambda: fn(sd, t, y), device)
                elem = s.element_size()
                rec["gbps_5pass"] = 5 * n * v * elem / (rec["ms"] * 1e-3) / 1e9
                rec["grad_buffer_mb"] = n * v * elem / 2**20
            except Exception as exc:  # OOM at large shapes or a baseline's API drift is a result
                if name == "fastkd" and not common.is_oom(exc):
                    raise
                rec["error"] = ("out of memory" if common.is_oom(exc)
                                else f"{type(exc).__name__}: {exc}"[:300])
            finally:
                s = t = y = None
                if device == "cuda":
                    torch.cuda.empty_cache()
            records.append(rec)
            if device == "cuda":  # progress through a long sweep; the table comes at the end
                print(f"kd_loss N={n:<6} V={v:<7} {name:<16} "
                      f"{rec.get('ms', float('nan')):.3f} ms (fwd {rec.get('fwd_ms', float('nan')):.3f})"
                      f"  {rec.get('error', '')}", flush=True)
        base = row_ms.get("fastkd")
        for rec in records[-len(impls):]:
            if base and rec.get("ms"):
                rec["speedup_of_fastkd"] = rec["ms"] / base
    return records


def next_token_cases(device: str, quick: bool) -> list:
    """Next-token KD on (B, L, V) logits, three ways to line positions up: the [:, :-1] slice read
    in place (two row strides), the same slice copied to rows first (what flattening it costs,
    and what fastkd did before it took two strides), and the labels shifted instead of the logits.
    Peak extra memory includes the gradient autograd builds for the full (B, L, V) student."""
    b, l_, v = (8, 2048, 128256) if device == "cuda" and not quick else (
        (2, 2048, 32000) if device == "cuda" else (2, 17, 4096))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kd = fastkd.functional.kd_loss
    cases = {
        "slice in place": lambda s, t, y: kd(s[:, :-1], t[:, :-1], y[:, 1:]),
        "slice copied": lambda s, t, y: kd(s[:, :-1].reshape(-1, v), t[:, :-1].reshape(-1, v),
                                           y[:, 1:].reshape(-1)),
        "labels shifted": lambda s, t, y: kd(
            s, t, torch.nn.functional.pad(y[:, 1:], (0, 1), value=-100)),
    }
    records = []
    for name, fn in cases.items():
        rec = {"op": "kd_loss_next_token", "impl": name, "b": b, "l": l_, "v": v,
               "dtype": str(dtype)[6:], "device": device}
        try:
            s, t, y = _inputs(b * l_, v, device, dtype)
            s = s.detach().view(b, l_, v).requires_grad_()
            t, y = t.view(b, l_, v), y.view(b, l_)
            step = _fwd_bwd(fn, s, t, y)
            step()  # the gradient buffer exists before the peak is taken, as in training
            rec["peak_extra_mb"] = (
                None if (m := common.peak_extra_bytes(step, device)) is None else m / 2**20)
            rec["ms"] = common.time_ms(step, device)
        except Exception as exc:  # recorded: the sweep's figures must not be lost with it
            rec["error"] = ("out of memory" if common.is_oom(exc)
                            else f"{type(exc).__name__}: {exc}"[:300])
        finally:
            s = t = y = None
            if device == "cuda":
                torch.cuda.empty_cache()
        records.append(rec)
    base = records[0].get("ms")
    for rec in records:
        if base and rec.get("ms"):
            rec["ms_over_in_place"] = rec["ms"] / base
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = p.parse_args(argv)
    records = run(args.device, args.quick)
    common.print_table(records, ["impl", "n", "v", "dtype", "ms", "fwd_ms", "speedup_of_fastkd",
                                 "gbps_5pass", "peak_extra_mb", "grad_buffer_mb", "error"])
    if args.out:  # the sweep first: a cut-off run still leaves it
        common.write_json(records, args.out, {"benchmark": "kd_loss"})
    shifted = next_token_cases(args.device, args.quick)
    common.print_table(shifted, ["impl", "b", "l", "v", "dtype", "ms", "ms_over_in_place",
                                 "peak_extra_mb", "error"])
    records += shifted
    if args.out:
        print("wrote", common.write_json(records, args.out, {"benchmark": "kd_loss"}))


if __name__ == "__main__":
    main()
