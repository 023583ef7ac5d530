"""tools/reproduce_paper.py end to end on a tiny problem: three methods, resume, the table and its verdict."""

import json
import pathlib
import sys

import numpy as np
import pytest

from lean_onnx.train.circle_square import first_images
from tests.helpers import zoo_path

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tools"))
import reproduce_paper  # noqa: E402


def tiny_circle_square(tmp_path):
    """(folder, images): train/val/test .npz of 4/1/1 Circle-Square images of 32 x 32."""
    data_dir = tmp_path / "cs"
    data_dir.mkdir()
    images = first_images(6, image_size=32)
    for split, part in {"train": slice(0, 4), "val": slice(4, 5), "test": slice(5, 6)}.items():
        np.savez(data_dir / f"{split}.npz", **{k: v[part] for k, v in images.items()})
    return data_dir, images


def test_reproduce_paper_runs_resumes_and_reports(tmp_path, zoo_cache):
    msd = zoo_path("msd", False, zoo_cache)
    data_dir, _ = tiny_circle_square(tmp_path)
    work, md = tmp_path / "work", tmp_path / "docs" / "results_tiny.md"
    md.parent.mkdir()
    common = ["--model", str(msd), "--data-dir", str(data_dir), "--work", str(work), "--steps", "2",
              "--keep", "0.08", "--epochs-per-step", "1", "--batch", "2", "--exclude", "", "--threads", "1"]
    assert reproduce_paper.main(common + ["--methods", "lean,sv,l1", "--stop-after", "1"]) == 0
    first = {m: json.loads((work / m / "state.json").read_text())["steps"] for m in ("lean", "sv", "l1")}
    assert all(len(steps) == 1 for steps in first.values())

    assert reproduce_paper.main(common + ["--methods", "lean,sv,l1", "--note", "tiny run"]) == 0  # resumes
    states = {m: json.loads((work / m / "state.json").read_text())["steps"] for m in ("lean", "sv", "l1")}
    for m in states:
        assert [s["step"] for s in states[m]] == [1, 2]
        assert states[m][0] == first[m][0]  # step 1 was not redone

    with pytest.raises(SystemExit, match="other settings: crop None .given 16."):  # the table would lie
        reproduce_paper.main(common + ["--methods", "lean", "--crop", "16", "--report-only", "--write", str(md)])
    assert not md.exists()
    assert reproduce_paper.main(common + ["--methods", "lean,sv,l1", "--report-only", "--write", str(md)]) == 0
    text = md.read_text()
    assert "tiny run" not in text and "--report-only" in text  # the command line, without another run's note
    assert md.with_suffix(".png").stat().st_size > 0 and "(results_tiny.png)" in text
    rows = json.loads(md.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 6
    by = {(r["method"], r["step"]): r["test_accuracy"] for r in rows}
    for step in (1, 2):
        line = next(line for line in text.splitlines() if line.startswith(f"| {step} |"))
        for m in ("lean", "sv", "l1"):
            assert f"{by[(m, step)]:.4f}" in line
    lean_ok = by[("lean", 2)] >= 0.90
    assert f"LEAN at least 0.90 at keep 0.08: **{'met' if lean_ok else 'not met'}**" in text
    beats = by[("lean", 2)] > max(by[("sv", 2)], by[("l1", 2)])  # step 2 (keep 0.08) is the only one <= 0.10
    assert f"(steps 2): **{'met' if beats else 'not met'}**" in text
    assert "## Run times" in text and "* l1:" in text


def test_a_step_that_kept_no_kernel_is_drawn_at_the_zero_tick(tmp_path):
    """A log axis has no 0: a collapsed network (keep 0) goes to the '0 (no kernel)' tick, not off the plot."""
    rows = [{"method": "l1", "keep_achieved": k, "test_accuracy": a} for k, a in ((0.5, .95), (0.08, .85), (0.0, .67))]
    assert reproduce_paper.plot_points(rows, "l1") == [(reproduce_paper.ZERO_KEEP_AT, .67), (0.08, .85), (0.5, .95)]
    assert reproduce_paper.ZERO_KEEP_AT < min(k for k, _ in reproduce_paper.plot_points(rows, "l1")[1:])
    picture = tmp_path / "p.png"
    reproduce_paper.plot(rows, 0.96, str(picture))
    assert picture.stat().st_size > 1000


def test_a_run_without_the_baselines_says_the_comparison_was_not_made(tmp_path):
    """A LEAN-only run (e.g. the full-image run) must not read as if the baselines were still missing steps."""
    import argparse
    rows = [{"method": "lean", "step": s, "keep_target": k, "keep_achieved": k, "test_accuracy": a}
            for s, k, a in ((1, 0.2, 0.95), (2, 0.05, 0.91))]
    lines = reproduce_paper.verdict(rows, argparse.Namespace(methods="lean", steps=2, keep=0.05))
    assert lines[2] == "* LEAN at least 0.90 at keep 0.05: **met** (0.9100)."
    assert lines[3] == "* LEAN above both baselines at every keep <= 0.10: not checked here (this run's methods: lean)."
    lines = reproduce_paper.verdict(rows[:1], argparse.Namespace(methods="lean,sv,l1", steps=2, keep=0.05))
    assert "not reached yet" in lines[2] and "no step with keep <= 0.10 finished by all three" in lines[3]


def test_step_spread_repeats_a_saved_step_exactly_and_leaves_the_folder_alone(tmp_path, zoo_cache):
    """tools/step_spread.py: seed 0 rebuilds the saved step byte for byte (the schedule is deterministic),
    another seed gives another model (on this tiny problem seed 1 happens to shuffle the 4 images into
    the same batches as seed 0: seed 3 does not), and the checkpoint folder is not touched."""
    import step_spread

    msd = zoo_path("msd", False, zoo_cache)
    data_dir, images = tiny_circle_square(tmp_path)
    work = tmp_path / "work"
    assert reproduce_paper.main(["--model", str(msd), "--data-dir", str(data_dir), "--work", str(work), "--steps", "2",
                                 "--keep", "0.3", "--epochs-per-step", "1", "--batch", "2", "--threads", "1",
                                 "--methods", "lean"]) == 0
    before = {p.name: p.read_bytes() for p in (work / "lean").iterdir()}
    out = tmp_path / "spread.json"
    assert step_spread.main(["--folder", str(work / "lean"), "--step", "2", "--seeds", "0,3", "--data-dir",
                             str(data_dir), "--threads", "1", "--write", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in (work / "lean").iterdir()} == before
    summary = json.loads(out.read_text())
    assert [r["seed"] for r in summary["runs"]] == [0, 3] and summary["runs"][0]["kernels_kept"] > 0
    assert summary["runs"][0]["same_bytes_as_saved"] and not summary["runs"][1]["same_bytes_as_saved"]
    assert summary["runs"][0]["test_accuracy"] == summary["saved_test_accuracy"]
    assert summary["min"] <= summary["median"] <= summary["max"]
    assert 0 <= summary["before_finetune_accuracy"] <= 1
    assert step_spread.main(["--folder", str(work / "lean"), "--step", "2", "--seeds", "", "--data-dir", str(data_dir),
                             "--threads", "1", "--write", str(out)]) == 0  # the cut only, no fine-tuning
    only_cut = json.loads(out.read_text())
    assert only_cut["runs"] == [] and only_cut["before_finetune_accuracy"] == summary["before_finetune_accuracy"]
    # Adam carried from step 1 (whose fine-tuning must rebuild its checkpoint) into step 2's masked model
    assert step_spread.main(["--folder", str(work / "lean"), "--step", "2", "--seeds", "0", "--carry-adam",
                             "--data-dir", str(data_dir), "--threads", "1", "--write", str(out)]) == 0
    carried = json.loads(out.read_text())
    assert carried["carry_adam"] and len(carried["runs"]) == 1 and 0 <= carried["runs"][0]["test_accuracy"] <= 1
    assert carried["runs"][0]["kernels_kept"] == summary["runs"][0]["kernels_kept"]
    with pytest.raises(SystemExit, match="--step must be a finished step from 2 to 2"):
        step_spread.main(["--folder", str(work / "lean"), "--step", "3", "--data-dir", str(data_dir)])
    np.savez(data_dir / "train.npz", **{k: v[1:5] for k, v in images.items()})
    with pytest.raises(SystemExit, match="not the data the schedule"):
        step_spread.main(["--folder", str(work / "lean"), "--step", "2", "--data-dir", str(data_dir)])


def test_step_spread_repeats_a_step_of_a_carried_optimizer_run_exactly(tmp_path, zoo_cache):
    """A schedule run with --carry-optimizer: step_spread starts step t from step t-1's saved Adam state,
    so seed 0 rebuilds the saved step byte for byte; --carry-adam (for fresh-Adam runs) is refused."""
    import step_spread

    msd = zoo_path("msd", False, zoo_cache)
    data_dir, _ = tiny_circle_square(tmp_path)
    work = tmp_path / "work"
    assert reproduce_paper.main(["--model", str(msd), "--data-dir", str(data_dir), "--work", str(work), "--steps", "2",
                                 "--keep", "0.3", "--epochs-per-step", "1", "--batch", "2", "--threads", "1",
                                 "--methods", "lean", "--carry-optimizer"]) == 0
    assert (work / "lean" / "step_01.adam.pt").exists()
    out = tmp_path / "spread.json"
    assert step_spread.main(["--folder", str(work / "lean"), "--step", "2", "--seeds", "0", "--data-dir",
                             str(data_dir), "--threads", "1", "--write", str(out)]) == 0
    assert json.loads(out.read_text())["runs"][0]["same_bytes_as_saved"]
    with pytest.raises(SystemExit, match="carried Adam's state already"):
        step_spread.main(["--folder", str(work / "lean"), "--step", "2", "--seeds", "0", "--carry-adam",
                          "--data-dir", str(data_dir), "--threads", "1"])
