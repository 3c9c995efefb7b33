"""``python -m fastkd demo`` in quick mode (--epochs 1), and the command line around it."""

from __future__ import annotations

import json

import pytest
import torch

from fastkd.__main__ import main as cli_main
from fastkd.demo import (
    ROW_NAMES,
    count_parameters,
    make_mlp,
    parse_pattern,
    resolve_sparsity,
    run_demo,
    state_dict_bytes,
)

from _util import DEVICE

# run_demo picks CUDA when it is available, else the CPU; on the CPU (only) its report notes that
# the pruned and int8 layers ran the plain-torch reference paths.
REFERENCE_PATHS_NOTE = "reference paths"

TEACHER_PARAMS = 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
STUDENT_PARAMS = 64 * 32 + 32 + 32 * 10 + 10


def _check_common_rows(report: dict) -> dict:
    rows = {r["model"]: r for r in report["rows"]}
    teacher, hard, distilled = rows["teacher"], rows["hard labels"], rows["distilled"]
    assert teacher["parameters"] == teacher["nonzero"] == TEACHER_PARAMS
    for r in (hard, distilled):
        assert r["parameters"] == STUDENT_PARAMS
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0
        assert r["latency_ms"] > 0
        # fp32 tensors at least; the pickle framing is on top
        assert r["state_dict_bytes"] > r["nonzero"]
    assert teacher["state_dict_bytes"] > 4 * TEACHER_PARAMS
    assert teacher["agreement"] == 1.0
    # one epoch of Adam on digits already puts the teacher far above chance (10 %)
    assert teacher["accuracy"] > 0.5
    assert teacher["vs_hard_labels"] is None
    assert hard["vs_hard_labels"] == 0.0
    assert distilled["vs_hard_labels"] == pytest.approx(distilled["accuracy"] - hard["accuracy"])
    n_test = report["settings"]["n_test"]
    assert n_test == 540 and report["settings"]["n_train"] == 1797 - 540
    # accuracies are fractions of the 540 test digits
    for r in rows.values():
        assert abs(r["accuracy"] * n_test - round(r["accuracy"] * n_test)) < 1e-6
    # the note states the comparison whichever way it went
    note = report["notes"][0]
    if distilled["accuracy"] > hard["accuracy"]:
        assert "Distillation beat hard labels" in note
    elif distilled["accuracy"] == hard["accuracy"]:
        assert "Distillation tied with hard labels" in note
    else:
        assert "Distillation did NOT beat hard labels" in note
    assert f"{100 * distilled['vs_hard_labels']:+.2f} points" in note
    return rows


def _check_files(out_dir, n_rows: int) -> dict:
    data = json.loads((out_dir / "demo.json").read_text())
    assert [r["model"] for r in data["rows"]] == list(ROW_NAMES[:n_rows])
    table = (out_dir / "demo.txt").read_text()
    for name in ROW_NAMES[:n_rows]:
        assert name in table
    assert "vs hard" in table and "note:" in table
    png = (out_dir / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(str(out_dir / "demo.png"))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas
    return data


@pytest.fixture(scope="module")
def three_row_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo3")
    report = run_demo(epochs=1, seed=0, out=str(out), compress=False, log=lambda *a: None)
    return report, out


def test_demo_teacher_and_students_quick(three_row_run):
    report, out = three_row_run
    assert [r["model"] for r in report["rows"]] == ["teacher", "hard labels", "distilled"]
    _check_common_rows(report)
    data = _check_files(out, 3)
    assert data["rows"] == json.loads(json.dumps(report["rows"]))
    assert data["settings"]["epochs"] == 1 and data["device"] == DEVICE
    if DEVICE == "cuda":
        assert data["device_name"] == torch.cuda.get_device_name()
        assert data["cpu_threads"] is None
    else:
        assert data["cpu_threads"] >= 1
    assert len(data["history"]["distilled"]) == 1
    assert torch.get_num_threads() >= 1


def test_demo_is_deterministic_for_a_seed(three_row_run):
    report, _ = three_row_run
    again = run_demo(epochs=1, seed=0, out=None, compress=False, log=lambda *a: None)
    for a, b in zip(report["rows"], again["rows"]):
        assert a["accuracy"] == b["accuracy"] and a["agreement"] == b["agreement"]


def test_demo_cli_all_five_rows(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli_main(["demo", "--epochs", "1", "--seed", "0", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    data = _check_files(out, 5)
    rows = _check_common_rows(data)
    distilled, pruned, int8 = rows["distilled"], rows["pruned"], rows["int8"]
    assert pruned["parameters"] == int8["parameters"] == STUDENT_PARAMS
    # half of every weight matrix is pruned (biases are not)
    weights = 64 * 32 + 32 * 10
    assert pruned["nonzero"] <= STUDENT_PARAMS - weights // 2
    assert int8["nonzero"] <= pruned["nonzero"]  # zeros stay zero through quantization
    assert int8["state_dict_bytes"] < distilled["state_dict_bytes"]
    assert data["settings"]["sparsity"] == 0.5 and data["settings"]["pattern"] == "unstructured"
    for name in ROW_NAMES:
        assert name in printed


def test_demo_block_pattern_leaves_indivisible_layers_dense():
    report = run_demo(epochs=1, pattern="4x4", sparsity=0.75, out=None, log=lambda *a: None)
    assert report["settings"]["pruned_layers"] == ["0"]  # the 10x32 output layer stays dense
    rows = {r["model"]: r for r in report["rows"]}
    # 75 % of the 32x64 hidden weight is pruned, nothing else
    assert rows["pruned"]["nonzero"] <= STUDENT_PARAMS - (32 * 64 * 3) // 4
    assert rows["pruned"]["nonzero"] >= STUDENT_PARAMS - (32 * 64 * 3) // 4 - 50
    assert report["device"] == DEVICE
    assert any(f"on {DEVICE}." in n for n in report["notes"])  # the latency note names the device
    # the reference-paths note is there exactly when the compressed models ran on the CPU
    assert any(REFERENCE_PATHS_NOTE in n for n in report["notes"]) == (DEVICE == "cpu")


def test_measurements_on_a_known_model():
    model = make_mlp([3, 4, 2])
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
        model[0].weight[1:].zero_()
    total, nonzero = count_parameters(model)
    assert total == 3 * 4 + 4 + 4 * 2 + 2
    assert nonzero == total - 9
    assert state_dict_bytes(model) > 4 * total


def test_pattern_and_sparsity_arguments():
    assert parse_pattern("unstructured") == "unstructured"
    assert parse_pattern("2:4") == "2:4"
    assert parse_pattern("4x8") == (4, 8)
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern("diagonal")
    assert resolve_sparsity("unstructured", None) == 0.5
    assert resolve_sparsity("1:4", None) == 0.75
    assert resolve_sparsity("2:4", 0.5) == 0.5
    with pytest.raises(ValueError, match="implies sparsity"):
        resolve_sparsity("2:4", 0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        resolve_sparsity((4, 4), 1.5)
    with pytest.raises(ValueError, match="epochs"):
        run_demo(epochs=0, out=None, compress=False)


def test_cli_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("info", "demo", "bench"):
        assert cmd in text
    with pytest.raises(SystemExit):
        cli_main(["demo", "--help"])
    text = capsys.readouterr().out
    for opt in ("--device", "--epochs", "--seed", "--sparsity", "--pattern", "--out"):
        assert opt in text


def test_cli_demo_bad_arguments(tmp_path, capsys):
    rc = cli_main(["demo", "--pattern", "diagonal", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "pattern" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
