"""kd_loss(group=...) with the vocabulary sharded over gloo ranks on the CPU equals the unsharded
loss and gradients (2 and 3 ranks, uneven splits, every divergence, targets, ignore_index)."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastkd.functional import kd_loss

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

CASES = [  # (divergence, beta, temperature, alpha, with_target, reduction)
    ("kl", 0.5, 2.0, 0.3, True, "mean"),
    ("kl", 0.5, 1.0, 0.5, False, "none"),
    ("reverse_kl", 0.5, 1.5, 0.5, True, "sum"),
    ("jsd", 0.3, 2.5, 0.4, True, "none"),
    # alpha = 0 against a teacher with a -inf class the student keeps: the reverse KL is infinite
    # and has weight 0, so the loss is the CE alone (never 0 * inf = nan)
    ("reverse_kl", 0.5, 1.0, 0.0, True, "none"),
]


def _worker(rank, world, splits, out_dir):
    # Rendezvous through a file, not a TCP port picked in advance: a port found free and then
    # released can be taken by another process before the ranks bind it (a flaky failure once
    # in a full run).
    store = os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        V = sum(splits)
        lo = sum(splits[:rank])
        hi = lo + splits[rank]
        g = torch.Generator().manual_seed(0)
        s = torch.randn(3, 5, V, generator=g) * 3
        t = torch.randn(3, 5, V, generator=g) * 3
        s[..., 2] = float("-inf")  # a padded class, in the first shard
        t[..., 2] = float("-inf")
        y = torch.randint(0, V, (3, 5), generator=g)
        y[y == 2] = 3  # never the padded class
        y[0, ::2] = -100
        y[1, 1] = V - 1  # a target in the last shard
        import fastkd._vocab_parallel as vp

        gathers = []
        real_gather = vp.dist.all_gather
        vp.dist.all_gather = lambda *a, **k: gathers.append(1) or real_gather(*a, **k)
        results, undefined = [], []
        for div, beta, T, alpha, with_t, red in CASES:
            tgt = y if with_t else None
            kw = dict(temperature=T, alpha=alpha, reduction=red, divergence=div, beta=beta,
                      backend="torch")
            tt = t.clone()
            if alpha == 0.0:
                tt[..., 1] = float("-inf")
            full = s.clone().requires_grad_()
            ref = kd_loss(full, tt, tgt, **kw)
            w = torch.linspace(0.5, 2.0, ref.numel()).reshape(ref.shape)
            (ref * w).sum().backward()
            part = s[..., lo:hi].clone().requires_grad_()
            out = kd_loss(part, tt[..., lo:hi], tgt, group=dist.group.WORLD, **kw)
            (out * w).sum().backward()
            results.append((ref.detach(), out.detach(), full.grad[..., lo:hi], part.grad))
        # targets on every non-empty shard's first and last class: a target one past a shard's
        # last class (the next shard's first) is not that shard's (random targets never landed
        # on a boundary)
        edges = [c for i, n in enumerate(splits) if n
                 for c in (sum(splits[:i]), sum(splits[:i]) + n - 1)]
        assert 2 not in edges  # not the padded class
        y_edge = torch.tensor(edges).repeat(15)[:15].reshape(3, 5)
        y_edge[2, 0] = -100
        for div in ("kl", "jsd"):
            kw = dict(temperature=1.5, alpha=0.4, reduction="none", divergence=div, beta=0.5,
                      backend="torch")
            full = s.clone().requires_grad_()
            ref = kd_loss(full, t, y_edge, **kw)
            w = torch.linspace(0.5, 2.0, ref.numel()).reshape(ref.shape)
            (ref * w).sum().backward()
            part = s[..., lo:hi].clone().requires_grad_()
            out = kd_loss(part, t[..., lo:hi], y_edge, group=dist.group.WORLD, **kw)
            (out * w).sum().backward()
            results.append((ref.detach(), out.detach(), full.grad[..., lo:hi], part.grad))
        # rows whose distribution is undefined (a student with no mass, a nan teacher logit or
        # a +inf student logit in the last shard) are nan in the loss and in every shard's
        # gradient, as unsharded (reverse KL gave 0 for them, and +inf left the other shards'
        # gradients finite)
        s_bad, t_bad = s.clone(), t.clone()
        s_bad[2, 4] = float("-inf")
        t_bad[2, 3, V - 1] = float("nan")
        s_bad[1, 0, V - 1] = float("inf")
        for div in ("kl", "jsd", "reverse_kl"):
            kw = dict(temperature=2.0, alpha=0.3, reduction="none", divergence=div,
                      backend="torch")
            full = s_bad.clone().requires_grad_()
            ref = kd_loss(full, t_bad, y, **kw)
            ref.nansum().backward()
            part = s_bad[..., lo:hi].clone().requires_grad_()
            out = kd_loss(part, t_bad[..., lo:hi], y, group=dist.group.WORLD, **kw)
            out.nansum().backward()
            undefined.append((ref.detach(), out.detach(), full.grad[..., lo:hi], part.grad))
        # a second derivative is refused (its backward holds the gathered statistics constant,
        # which gave a wrong Hessian-vector product)
        part = s[..., lo:hi].clone().requires_grad_()
        out = kd_loss(part, t[..., lo:hi], y, group=dist.group.WORLD, backend="torch")
        try:
            (g,) = torch.autograd.grad(out, part, create_graph=True)
            g.pow(2).sum().backward()
            refused = ""
        except RuntimeError as err:
            refused = str(err)
        undefined.append(refused)
        # an explicit Triton backend is refused (the shards run the torch reference; it was
        # ignored without a word)
        try:
            kd_loss(part, t[..., lo:hi], y, group=dist.group.WORLD, backend="triton")
            undefined.append("")
        except ValueError as err:
            undefined.append(str(err))
        vp.dist.all_gather = real_gather
        # the shard sizes are gathered once (a host sync), then remembered for this group
        results.append(len(gathers))
        torch.save((results, undefined), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown. About once in 50 runs gloo's threads aborted it
    # there (SIGABRT, "terminate called without an active exception", with no Python frame on
    # the stack), after the results above were written, and mp.spawn failed the test on the
    # exit signal. An exception above still reaches mp.spawn; the parent checks the results.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# (17, 0, 24): a rank holding no classes (it was refused, and the other ranks then waited in
# the collective until gloo gave up)
@pytest.mark.parametrize("splits", [(17, 24), (5, 30, 12), (17, 0, 24)])
def test_vocab_parallel_matches_unsharded(tmp_path, splits):
    world = len(splits)
    mp.spawn(_worker, args=(world, splits, str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        (*cases, n_gathers), undefined = torch.load(tmp_path / f"rank{rank}.pt")
        assert n_gathers == 1
        for ref, out, g_ref, g_out in cases:
            assert torch.isfinite(out).all() and torch.isfinite(g_out).all()
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6)
        *undefined, refused, triton_refused = undefined
        assert "no second derivative" in refused
        assert "backend must be 'auto' or 'torch'" in triton_refused
        for ref, out, g_ref, g_out in undefined:
            bad = torch.zeros_like(out, dtype=torch.bool)
            bad[2, 3] = bad[2, 4] = bad[1, 0] = True
            assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
            assert torch.isnan(g_out[bad]).all() and torch.isfinite(g_out[~bad]).all()
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)
            torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6, equal_nan=True)
