"""Vocabulary-parallel KD loss: ``kd_loss(..., group=g)`` with the class dimension sharded.

Every rank of ``g`` holds the same rows and a contiguous slice of the classes, in rank order
(rank r holds classes [offset_r, offset_r + V_r); the V_r may differ). Targets are global class ids,
the same on every rank. Only per-row statistics cross ranks:
    1. all_reduce(MAX) of the row maxima of s/T, t/T and s (3 floats per row);
    2. all_reduce(SUM) of the shifted sums of exp(s/T), exp(t/T), exp(s), the forward-KL cross term
       sum exp(t/T - m_t) (t/T - s/T) and the target logit (5 floats per row);
    3. for "reverse_kl" / "jsd" only: all_reduce(SUM) of the divergence terms and sum_i q_i g_i
       (2 floats per row), which need the global normalisers from step 2.
Every rank then has the full row loss (the returned loss is identical on all ranks), and the
backward needs no communication: the gradient of a shard uses the global statistics only.
The local arithmetic is the plain-torch reference (fp32, chunked over rows). The sizes of the shards
are exchanged once per (group, local size, device) and remembered: reading them back is a host
sync, which a training step should not pay every time (tensor-parallel shards do not change size).
"""

from __future__ import annotations


import torch
import torch.distributed as dist
from torch import Tensor

from ._validate import check_class_targets, refuse_create_graph
from .reference.kd_loss import _divergence_terms, _row_chunk, _undefined_to_nan, mix_rows

_NEG_INF = float("-inf")


_SHARDS: dict = {}  # (id(group), n_local, device) -> (group, offset, total)


def shard_offset(n_local: int, group, device) -> tuple[int, int]:
    """(offset of this rank's classes, total classes) from the shard sizes in rank order.

    Gathered on the first call for a (group, local size, device) and remembered afterwards (the
    group is kept with the entry, so a recycled id cannot match another group)."""
    key = (id(group), n_local, str(device))
    hit = _SHARDS.get(key)
    if hit is not None and hit[0] is group:
        return hit[1], hit[2]
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n_local], dtype=torch.long, device=device), group=group)
    sizes = [int(x) for x in sizes]
    rank = dist.get_rank(group)
    offset, total = sum(sizes[:rank]), sum(sizes)
    _SHARDS[key] = (group, offset, total)
    return offset, total


def _shift(m: Tensor) -> Tensor:
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


class VocabParallelKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, target, temperature, alpha, ignore_index, divergence, beta, group,
                offset):
        s32, t32 = s.float(), t.float()
        n_rows, n_cols = s.shape
        inv_t = 1.0 / temperature
        zs, zt = s32 * inv_t, t32 * inv_t
        mx = torch.stack([zs.amax(-1), zt.amax(-1), s32.amax(-1)], 1) if n_cols else torch.full(
            (n_rows, 3), _NEG_INF, device=s.device)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
        m_s, m_t, m_1 = (_shift(mx[:, i : i + 1]) for i in range(3))
        e_t = (zt - m_t).exp()
        cross = torch.where(e_t > 0, e_t * (zt - zs), torch.zeros_like(e_t)).sum(-1)
        sums = torch.stack(
            [(zs - m_s).exp().sum(-1), e_t.sum(-1), (s32 - m_1).exp().sum(-1), cross,
             torch.zeros(n_rows, device=s.device)], 1)
        if target is not None and n_cols:  # (a shard with no classes holds no target logit)
            local = target - offset
            mine = (target != ignore_index) & (local >= 0) & (local < n_cols)
            s_y = s32.gather(1, torch.where(mine, local, 0)[:, None]).squeeze(1)
            sums[:, 4] = torch.where(mine, s_y, torch.zeros_like(s_y))
        dist.all_reduce(sums, group=group)
        lse_s = m_s[:, 0] + sums[:, 0].log()
        lse_t = m_t[:, 0] + sums[:, 1].log()
        lse_1 = m_1[:, 0] + sums[:, 2].log()
        dot = None
        if divergence == "kl":
            div = sums[:, 3] / sums[:, 1] - lse_t + lse_s
        else:
            terms, qg = _divergence_terms(zt - lse_t[:, None], zs - lse_s[:, None], divergence,
                                          beta)
            red = torch.stack([terms.sum(-1), qg.sum(-1)], 1)
            dist.all_reduce(red, group=group)
            # nan on rows with no distribution, as unsharded: the terms drop q = 0 entries
            div, dot = _undefined_to_nan(red[:, 0], lse_s, lse_t), red[:, 1]
        soft = temperature * temperature * div.clamp_min(0.0)
        if target is None:
            rows = soft
        else:
            valid = target != ignore_index
            rows = torch.where(valid, mix_rows(soft, lse_1 - sums[:, 4], alpha),
                               torch.zeros_like(soft))
        stats = torch.stack([lse_s, lse_t, lse_1] + ([dot] if dot is not None else []), 1)
        ctx.save_for_backward(s, t, target, stats)
        ctx.cfg = (temperature, alpha, ignore_index, divergence, beta, offset)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        refuse_create_graph("kd_loss(group=...)", "its backward holds the row statistics "
                            "gathered across the group constant (a second derivative through "
                            "it would be wrong)")
        s, t, target, stats = ctx.saved_tensors
        temperature, alpha, ignore_index, divergence, beta, offset = ctx.cfg
        n_rows, n_cols = s.shape
        inv_t = 1.0 / temperature
        c_kl = temperature if target is None else alpha * temperature
        grad = torch.empty_like(s)
        if n_cols == 0:  # a shard with no classes: nothing to differentiate
            return grad, None, None, None, None, None, None, None, None, None
        step = _row_chunk(n_rows, n_cols)
        for r0 in range(0, n_rows, step):
            r1 = min(n_rows, r0 + step)
            st = stats[r0:r1]
            s32 = s[r0:r1].float()
            log_q = s32 * inv_t - st[:, 0:1]
            log_p = t[r0:r1].float() * inv_t - st[:, 1:2]
            q = log_q.exp()
            if c_kl == 0.0:  # alpha = 0: no teacher term (not 0 * inf where it is infinite)
                g = torch.zeros_like(q)
            else:
                if divergence == "kl":
                    g = c_kl * (q - log_p.exp())
                else:
                    _, qg = _divergence_terms(log_p, log_q, divergence, beta)
                    g = c_kl * (qg - q * st[:, 3:4])
                # nan on every rank's part of a row with no distribution (a +inf logit on
                # another rank left this rank's q = 0 and its gradient finite)
                g = _undefined_to_nan(g, st[:, 0:1], st[:, 1:2])
            scale = grad_rows[r0:r1].float()
            if target is not None:
                tgt = target[r0:r1]
                valid = tgt != ignore_index
                g = g + (1 - alpha) * (s32 - st[:, 2:3]).exp()
                local = tgt - offset
                mine = valid & (local >= 0) & (local < n_cols)
                hit = torch.zeros_like(g).scatter_(1, torch.where(mine, local, 0)[:, None],
                                                   mine[:, None].to(g.dtype))
                g = g - (1 - alpha) * hit
                g = torch.where(valid[:, None], g, torch.zeros_like(g))
                scale = torch.where(valid, scale, torch.zeros_like(scale))
            grad[r0:r1] = (g * scale[:, None]).to(s.dtype)
        return grad, None, None, None, None, None, None, None, None, None


def vocab_parallel_kd_rows(student, teacher, target, temperature, alpha, ignore_index, divergence,
                           beta, group) -> Tensor:
    """Per-row loss (N,) of the full-vocabulary KD loss from this rank's class shard."""
    offset, total = shard_offset(student.shape[1], group, student.device)
    if target is not None:
        check_class_targets(target, total, ignore_index)
    return VocabParallelKDFunction.apply(student, teacher, target, temperature, alpha,
                                         ignore_index, divergence, beta, group, offset)
