"""``python -m fastkd demo``: the whole compression workflow on a real dataset, in seconds.

scikit-learn's handwritten digits (1,797 8x8 images, 10 classes; shipped with the library, no
download) are split 70/30 (stratified, by ``--seed``). Then:

1. teacher      an MLP 64-256-256-10 trained on the labels (cross-entropy, Adam);
2. hard labels  a student MLP 64-32-10 trained on the labels only;
3. distilled    the same student (same initial weights, same batch order, same optimizer, lr and
                epochs) trained with :class:`fastkd.Distiller` (KD loss, T=4, alpha=0.5: the
                Distiller's defaults, not tuned on this data). The hard-label run uses the same
                Distiller with alpha=0, so the two runs differ only in the loss;
4. pruned       the distilled student with ``fastkd.sparsify_`` (``--sparsity``, ``--pattern``),
                fine-tuned with distillation for a third of the epochs (at least one);
5. int8         the pruned student with its masks folded into the weights, then
                ``fastkd.quantize_(mode="w8a8")`` (no further training).

For every model: parameters (weight and bias entries; ``nonzero`` counts the ones not pruned),
the bytes of its saved ``state_dict`` (``torch.save``), test accuracy, agreement with the teacher's
predictions, and the median latency of one forward pass over a batch of 256 test rows on the device.
The table says how the students compare with the hard-label student, whichever way that goes; the
run uses one seed, chosen by the user, and the note line gives the accuracies' standard error.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LATENCY_BATCH = 256
HIDDEN_TEACHER = 256
HIDDEN_STUDENT = 32
LR = 3e-3
BATCH_SIZE = 64
ROW_NAMES = ("teacher", "hard labels", "distilled", "pruned", "int8")


# --------------------------------------------------------------------------- data and models


def load_digits_split(seed: int):
    """(x_train, y_train, x_test, y_test): fp32 features in [0, 1], int64 labels."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - the demo extra installs it
        raise RuntimeError(
            "the demo needs scikit-learn (pip install 'fastkd[demo]' or scikit-learn)"
        ) from e
    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data, data.target, test_size=0.3, random_state=seed, stratify=data.target
    )
    as_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


def make_mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def parse_pattern(text: str):
    """'unstructured', 'N:M' (e.g. '2:4') or a block 'BHxBW' (e.g. '4x4') -> sparsify_'s pattern."""
    text = str(text).strip()
    if text == "unstructured" or re.fullmatch(r"\d+:\d+", text):
        return text
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if m:
        return (int(m.group(1)), int(m.group(2)))
    raise ValueError(
        f"--pattern must be 'unstructured', 'N:M' (e.g. 2:4) or 'BHxBW' (e.g. 4x4), got {text!r}"
    )


def resolve_sparsity(pattern, sparsity: Optional[float]) -> float:
    if isinstance(pattern, str) and ":" in pattern:
        n, m = (int(v) for v in pattern.split(":"))
        if not 0 < n <= m:
            raise ValueError(f"pattern {pattern!r} needs 0 < N <= M")
        implied = 1.0 - n / m
        if sparsity is not None and not math.isclose(sparsity, implied, abs_tol=1e-9):
            raise ValueError(
                f"pattern {pattern} implies sparsity {implied:g}; "
                f"--sparsity {sparsity:g} contradicts it"
            )
        return implied
    sparsity = 0.5 if sparsity is None else float(sparsity)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"--sparsity must lie in [0, 1], got {sparsity}")
    return sparsity


def _pattern_fits(pattern):
    """sparsify_'s filter_fn: a block pattern prunes only layers whose shape the block divides
    (here the 10-class output layer is left dense by 4x4 blocks); N:M needs in_features % M."""
    if isinstance(pattern, tuple):
        bh, bw = pattern
        return lambda m, name: m.out_features % bh == 0 and m.in_features % bw == 0
    if ":" in pattern:
        m_group = int(pattern.split(":")[1])
        return lambda m, name: m.in_features % m_group == 0
    return None


# --------------------------------------------------------------------------- measurements


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, nonzero) over the state_dict's weight and bias entries, float or int8 alike."""
    total = nonzero = 0
    for name, t in model.state_dict().items():
        if name.endswith("weight") or name.endswith("bias"):
            total += t.numel()
            nonzero += int(torch.count_nonzero(t))
    return total, nonzero


def state_dict_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [model(x[i : i + LATENCY_BATCH]).argmax(-1) for i in range(0, len(x), LATENCY_BATCH)]
    )


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 50) -> float:
    """Median wall time of one forward over a batch of LATENCY_BATCH rows (synchronized)."""
    model.eval()
    batch = x[:LATENCY_BATCH]
    sync = torch.cuda.synchronize if batch.device.type == "cuda" else (lambda: None)
    for _ in range(5):
        model(batch)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(batch)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(name: str, model: nn.Module, x_test, y_test, teacher_pred) -> dict:
    total, nonzero = count_parameters(model)
    pred = predictions(model, x_test)
    return {
        "model": name,
        "parameters": total,
        "nonzero": nonzero,
        "state_dict_bytes": state_dict_bytes(model),
        "accuracy": (pred == y_test).double().mean().item(),
        "agreement": (pred == teacher_pred).double().mean().item(),
        "latency_ms": latency_ms(model, x_test),
    }


# --------------------------------------------------------------------------- the pipeline


def _train_teacher(model, make_loader, epochs, device, progress):
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in tqdm(range(epochs), desc="teacher", disable=not progress, leave=False):
        model.train()
        total, steps = torch.zeros((), device=device), 0
        for xb, yb in make_loader(epoch):
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
        history.append({"epoch": epoch + 1, "train_loss": (total / steps).item()})
    return model.eval(), history


def run_demo(
    *,
    device: Optional[str] = None,
    epochs: int = 30,
    seed: int = 0,
    sparsity: Optional[float] = None,
    pattern: str = "unstructured",
    out: Optional[str] = "fastkd-demo",
    compress: bool = True,
    progress: bool = False,
    log=print,
) -> dict:
    """Run the pipeline and return the report dict (also written to ``out`` unless it is None).

    ``compress=False`` stops after the distilled student (three rows); the default runs all five
    and needs ``fastkd.sparsify_`` and ``fastkd.quantize_``.
    """

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"--epochs must be an int >= 1, got {epochs!r}")
    if out is not None:  # checked before training, not after it (the plot is written last)
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise RuntimeError("the demo's plot needs matplotlib (pip install 'fastkd[demo]' "
                               "or matplotlib)") from e
    pattern_arg = parse_pattern(pattern)
    sparsity_val = resolve_sparsity(pattern_arg, sparsity)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    # These models are tiny: extra intra-op threads buy nothing and, on a busy machine, their
    # spin-waits made a run 10x slower. One thread on the CPU; the setting is restored after.
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        report = _run(
            dev, epochs, seed, pattern, pattern_arg, sparsity_val, compress, progress, log
        )
    finally:
        torch.set_num_threads(threads)
    if out is not None:
        write_outputs(report, out)
    return report


def _run(dev, epochs, seed, pattern, pattern_arg, sparsity_val, compress, progress, log) -> dict:
    import fastkd

    from .distill import Distiller

    t_start = time.perf_counter()

    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    train_set = TensorDataset(x_tr, y_tr)

    def make_loader(epoch: int) -> DataLoader:
        # Every run sees the same batch order in a given epoch, whatever ran before it.
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        return DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True, generator=g)

    class _EpochLoaders:
        """A loader whose epoch-th pass uses the epoch-th fixed shuffle."""

        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return math.ceil(len(train_set) / BATCH_SIZE)

        def __iter__(self):
            loader = make_loader(self.epoch)
            self.epoch += 1
            return iter(loader)

    n_features, n_classes = x_tr.shape[1], int(y_tr.max()) + 1
    x_te_dev, y_te_dev = x_te.to(dev), y_te.to(dev)
    test_loader = DataLoader(TensorDataset(x_te, y_te), batch_size=LATENCY_BATCH)
    rows, histories, timings = [], {}, {}

    torch.manual_seed(seed)
    teacher = make_mlp([n_features, HIDDEN_TEACHER, HIDDEN_TEACHER, n_classes]).to(dev)
    t0 = time.perf_counter()
    teacher, histories["teacher"] = _train_teacher(teacher, make_loader, epochs, dev, progress)
    timings["teacher"] = time.perf_counter() - t0
    teacher_pred = predictions(teacher, x_te_dev)
    rows.append(measure("teacher", teacher, x_te_dev, y_te_dev, teacher_pred))
    log(f"teacher      trained ({epochs} epochs): accuracy {rows[-1]['accuracy']:.4f}")

    torch.manual_seed(seed + 1)
    student_init = make_mlp([n_features, HIDDEN_STUDENT, n_classes])
    settings = dict(temperature=4.0, lr=LR, device=dev, progress=progress)

    students = {}
    for name, alpha in (("hard labels", 0.0), ("distilled", 0.5)):
        student = copy.deepcopy(student_init).to(dev)
        d = Distiller(teacher, student, alpha=alpha, **settings)
        t0 = time.perf_counter()
        histories[name] = d.fit(_EpochLoaders(), epochs=epochs, eval_loader=test_loader)
        timings[name] = time.perf_counter() - t0
        students[name] = student.eval()
        rows.append(measure(name, student, x_te_dev, y_te_dev, teacher_pred))
        log(
            f"{name:<12} trained ({epochs} epochs, alpha={alpha}): "
            f"accuracy {rows[-1]['accuracy']:.4f}"
        )

    finetune_epochs = max(1, epochs // 3)
    if compress:
        pruned = fastkd.sparsify_(
            copy.deepcopy(students["distilled"]),
            sparsity=sparsity_val,
            pattern=pattern_arg,
            filter_fn=_pattern_fits(pattern_arg),
        ).to(dev)
        pruned_layers = [
            n for n, m in pruned.named_modules() if isinstance(m, fastkd.nn.MaskedLinear)
        ]
        if not pruned_layers:
            raise ValueError(f"pattern {pattern} fits none of the student's linear layers")
        d = Distiller(teacher, pruned, alpha=0.5, **settings)
        t0 = time.perf_counter()
        histories["pruned"] = d.fit(
            _EpochLoaders(), epochs=finetune_epochs, eval_loader=test_loader
        )
        timings["pruned"] = time.perf_counter() - t0
        pruned.eval()
        rows.append(measure("pruned", pruned, x_te_dev, y_te_dev, teacher_pred))
        log(
            f"pruned       {pattern} at sparsity {sparsity_val:g} (layers "
            f"{', '.join(pruned_layers)}), fine-tuned {finetune_epochs} "
            f"epochs: accuracy {rows[-1]['accuracy']:.4f}"
        )

        quantized = fastkd.quantize_(copy.deepcopy(pruned), mode="w8a8").to(dev)
        rows.append(measure("int8", quantized.eval(), x_te_dev, y_te_dev, teacher_pred))
        log(f"int8         w8a8: accuracy {rows[-1]['accuracy']:.4f}")

    hard_acc = rows[1]["accuracy"]
    for row in rows:
        row["vs_hard_labels"] = None if row["model"] == "teacher" else row["accuracy"] - hard_acc
    n_test = len(y_te)
    se = math.sqrt(max(hard_acc * (1 - hard_acc), 1e-12) / n_test)
    delta = rows[2]["accuracy"] - hard_acc
    verdict = "beat" if delta > 0 else ("tied with" if delta == 0 else "did NOT beat")
    notes = [
        f"Distillation {verdict} hard labels on this run: {100 * delta:+.2f} points of test "
        f"accuracy ({n_test} test digits, seed {seed}, one run; the standard error of one accuracy "
        f"is about {100 * se:.2f} points: differences under about {200 * se:.1f} points, "
        "two standard errors, are within noise).",
        f"latency: median of 50 forward passes over a batch of {LATENCY_BATCH} rows on {dev}.",
        "state_dict bytes: torch.save of the state_dict "
        "(the pruned model also stores its bool mask).",
    ]
    if compress and dev.type == "cpu":
        notes.append(
            "On the CPU the pruned and int8 layers run fastkd's plain-torch reference paths "
            "(a masked dense matmul; an exact int8 matmul with quantization around it), which "
            "are slower than a dense fp32 linear at this size; the fused kernels need a GPU."
        )
    report = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "fastkd": fastkd.__version__,
        "python": platform.python_version(),
        "settings": {
            "dataset": "sklearn digits (8x8, 10 classes), 70/30 stratified split",
            "n_train": len(y_tr),
            "n_test": n_test,
            "epochs": epochs,
            "finetune_epochs": finetune_epochs if compress else None,
            "seed": seed,
            "sparsity": sparsity_val if compress else None,
            "pruned_layers": pruned_layers if compress else None,
            "pattern": pattern if compress else None,
            "optimizer": f"Adam(lr={LR})",
            "batch_size": BATCH_SIZE,
            "temperature": 4.0,
            "alpha": 0.5,
            "teacher": [n_features, HIDDEN_TEACHER, HIDDEN_TEACHER, n_classes],
            "student": [n_features, HIDDEN_STUDENT, n_classes],
        },
        "rows": rows,
        "notes": notes,
        "history": histories,
        "train_seconds": timings,
        "total_seconds": time.perf_counter() - t_start,
        "cpu_threads": torch.get_num_threads() if dev.type == "cpu" else None,
    }
    return report


# --------------------------------------------------------------------------- output


def format_table(report: dict) -> str:
    head = (
        f"{'model':<12} {'params':>8} {'nonzero':>8} {'state_dict B':>12} {'accuracy':>9} "
        f"{'vs hard':>8} {'agree':>7} {'ms/batch':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        vs = "" if r["vs_hard_labels"] is None else f"{100 * r['vs_hard_labels']:+.2f}pt"
        if r["model"] == "hard labels":
            vs = "(ref)"
        lines.append(
            f"{r['model']:<12} {r['parameters']:>8} {r['nonzero']:>8} {r['state_dict_bytes']:>12} "
            f"{r['accuracy']:>9.4f} {vs:>8} {r['agreement']:>7.4f} {r['latency_ms']:>9.4f}"
        )
    lines += [""] + [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def write_outputs(report: dict, out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    paths = {
        "json": os.path.join(out, "demo.json"),
        "table": os.path.join(out, "demo.txt"),
        "plot": os.path.join(out, "demo.png"),
    }
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(paths["table"], "w") as f:
        f.write(format_table(report) + "\n")
    plot(report, paths["plot"])
    report["outputs"] = paths
    return paths


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "state_dict_bytes", "saved state_dict (bytes, log scale)"),
        (axes[1], "latency_ms", f"latency per batch of {LATENCY_BATCH} (ms, log scale)"),
    ):
        for r in rows:
            ax.scatter(r[key], 100 * r["accuracy"], s=40)
            ax.annotate(
                r["model"],
                (r[key], 100 * r["accuracy"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=9,
            )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.margins(x=0.25, y=0.1)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
    s = report["settings"]
    fig.suptitle(
        f"fastkd demo: sklearn digits, {s['epochs']} epochs, seed {s['seed']}, {report['device']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    progress = sys.stderr.isatty() and not args.quiet
    try:
        report = run_demo(
            device=args.device,
            epochs=args.epochs,
            seed=args.seed,
            sparsity=args.sparsity,
            pattern=args.pattern,
            out=args.out,
            progress=progress,
            log=(lambda *a: None) if args.quiet else print,
        )
    except (ValueError, RuntimeError) as e:
        print(f"fastkd demo: error: {e}", file=sys.stderr)
        return 2
    print()
    print(format_table(report))
    print(f"\nwrote {', '.join(report['outputs'].values())} ({report['total_seconds']:.1f} s)")
    return 0


def add_arguments(p) -> None:
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    p.add_argument("--epochs", type=int, default=30, help="training epochs per model (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, init and shuffles")
    p.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="fraction pruned (default 0.5; implied by an N:M pattern)",
    )
    p.add_argument(
        "--pattern",
        default="unstructured",
        help="unstructured, N:M (e.g. 2:4) or a block BHxBW (e.g. 4x4)",
    )
    p.add_argument("--out", default="fastkd-demo", help="output folder (default ./fastkd-demo/)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress or training log: the table, its notes and the output paths")
