"""Run one step of a finished schedule again with other fine-tuning seeds: how much of a step's test
accuracy is the seed?

A schedule's step t prunes step t-1's checkpoint (deterministically) and fine-tunes it with seed
`seed + t` (lean_onnx/train/schedule.py). This tool loads step t-1's checkpoint from a schedule folder, runs
step t again with the folder's own settings and each given seed (seed s fine-tunes with s + t, so seed
0 repeats the saved step exactly, a check of the tool itself), and measures the test accuracy with ONNX
Runtime as tools/reproduce_paper.py does. Nothing in the folder is changed.

    python tools/step_spread.py --folder .cache/paper4/lean --step 15 --seeds 0,1,2,3,4 --threads 2 \
        --write .cache/paper4/spread_15.json

It also measures the step's pruned model before any fine-tuning (how much the cut itself costs);
`--seeds ""` measures only that. `--epochs` and `--fold-constants` override the folder's settings
(diagnostics: not the schedule's protocol).

`--carry-adam`: the reference keeps one Adam optimizer through its whole schedule (msd_pytorch's model
object, loaded with its training's optimizer state), where our schedule starts a fresh one per step.
This runs step t-1's fine-tuning again (checked to rebuild its checkpoint byte for byte) to get Adam's
final state, then fine-tunes step t's *masked* model (the same shapes as step t-1's model, so the
state maps one to one; the same function as the pruned model) starting from that state. A folder
whose schedule ran with `--carry-optimizer` carried the state already: step t then starts from the saved
`step_{t-1}.adam.pt`, as the run did (seed 0 still rebuilds the saved step), and --carry-adam is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _origin(state: dict) -> dict:
    """What a step needs of the schedule's state: the original's kernel count and MACs."""
    return {"original_kernels": state["original_kernels"], "original_macs": state.get("original_macs")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", required=True, help="a schedule's checkpoint folder (state.json, step_NN.onnx)")
    ap.add_argument("--step", type=int, required=True, help="the step to run again (2 or more)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated base seeds (seed s fine-tunes with s + step)")
    ap.add_argument("--data-dir", default=".cache/cs", help="Circle-Square train/val/test .npz")
    ap.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the folder's epochs per step)")
    ap.add_argument("--fold-constants", action="store_true", help="dead channels keep their constant act(bias)")
    ap.add_argument("--carry-adam", action="store_true", help="start from Adam's state after step t-1's fine-tuning")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    ap.add_argument("--eval-threads", type=int, default=2)
    ap.add_argument("--write", metavar="JSON", help="write the results here")
    args = ap.parse_args(argv)
    import torch

    from lean_onnx.graph.load import read_model
    from lean_onnx.io.save import save_model_atomic
    from lean_onnx.train.circle_square import load_split
    from lean_onnx.train.schedule import ScheduleConfig, _load_adam, _step, data_digest, step_keeps
    from tools.reproduce_paper import test_accuracy

    if args.threads:
        torch.set_num_threads(args.threads)
    with open(os.path.join(args.folder, "state.json")) as f:
        state = json.load(f)
    config = ScheduleConfig(**state["config"])
    if not 2 <= args.step <= len(state["steps"]):
        raise SystemExit(f"{args.folder}: --step must be a finished step from 2 to {len(state['steps'])}")
    split = {s: load_split(os.path.join(args.data_dir, f"{s}.npz")) for s in ("train", "val", "test")}
    train, val, test = ({"inputs": d["inputs"], "targets": d["targets"]} for d in split.values())
    if (data_digest(train), data_digest(val)) != (config.train_data, config.val_data):
        raise SystemExit(f"{args.data_dir}: not the data the schedule in {args.folder} was fine-tuned on")
    if args.epochs is not None:
        config = dataclasses.replace(config, epochs_per_step=args.epochs)
    if args.fold_constants:
        config = dataclasses.replace(config, fold_constants=True)
    saved = state["steps"][args.step - 1]
    previous = read_model(os.path.join(args.folder, state["steps"][args.step - 2]["model"]))
    target = step_keeps(config.keep, config.steps)[args.step - 1]
    saved_accuracy = test_accuracy(os.path.join(args.folder, saved["model"]), test, args.eval_threads)
    print(f"step {args.step} as saved (seed {config.seed}): test accuracy {saved_accuracy:.4f}", flush=True)
    if config.carry_optimizer:  # the run carried one Adam: step t starts from step t-1's saved state
        if args.carry_adam:
            raise SystemExit(f"{args.folder}: this schedule carried Adam's state already (--carry-optimizer); "
                             "--carry-adam is for runs with a fresh Adam per step")
        carried = _load_adam(args.folder, args.step - 1)
    else:
        carried = _carried_state(args.folder, state, ScheduleConfig(**state["config"]), args.step, train, val) \
            if args.carry_adam else None
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        row, model = _step(previous, args.step, target, _origin(state), config,
                           None, None, True, lambda line: None, "cpu")
        save_model_atomic(model, os.path.join(tmp, "pruned.onnx"))
        before = test_accuracy(os.path.join(tmp, "pruned.onnx"), test, args.eval_threads)
        print(f"step {args.step} pruned, before fine-tuning: test accuracy {before:.4f}, {row['kernels_kept']} "
              "kernels", flush=True)
        for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
            start = time.perf_counter()
            row, model = _step(previous, args.step, target, _origin(state),
                               dataclasses.replace(config, seed=seed), train, val, True, lambda line: None, "cpu",
                               optimizer_state=carried, finetune_masked=args.carry_adam)
            path = os.path.join(tmp, f"seed_{seed}.onnx")
            save_model_atomic(model, path)
            accuracy = test_accuracy(path, test, args.eval_threads)
            with open(path, "rb") as f, open(os.path.join(args.folder, saved["model"]), "rb") as g:
                same_as_saved = f.read() == g.read()
            runs.append({"seed": seed, "test_accuracy": accuracy, "kernels_kept": row["kernels_kept"],
                         "val_accuracy": [e.get("val_accuracy") for e in row["finetune"]],
                         "train_loss": [e.get("train_loss") for e in row["finetune"]],
                         "same_bytes_as_saved": same_as_saved, "seconds": time.perf_counter() - start})
            print(f"seed {seed}: test accuracy {accuracy:.4f}, {row['kernels_kept']} kernels, val accuracy per "
                  f"epoch {[round(v, 4) for v in runs[-1]['val_accuracy']]}"
                  f"{', same bytes as the saved step' if same_as_saved else ''} ({runs[-1]['seconds']:.0f} s)",
                  flush=True)
    values = [r["test_accuracy"] for r in runs]
    summary = {"folder": args.folder, "step": args.step, "epochs": config.epochs_per_step,
               "fold_constants": config.fold_constants, "carry_adam": args.carry_adam, "saved_test_accuracy": saved_accuracy,
               "before_finetune_accuracy": before, "runs": runs,
               "argv": list(sys.argv[1:] if argv is None else argv)}
    if values:
        summary.update(median=statistics.median(values), min=min(values), max=max(values),
                       stdev=statistics.stdev(values) if len(values) > 1 else None)
        print(f"step {args.step}, {len(values)} seeds: median {summary['median']:.4f}, range "
              f"{summary['min']:.4f}-{summary['max']:.4f}", flush=True)
    if args.write:
        save_model_atomic((json.dumps(summary, indent=1) + "\n").encode(), args.write)
    return 0


def _carried_state(folder: str, state: dict, config, t: int, train: dict, val: dict) -> dict:
    """Adam's state after step t-1's fine-tuning: step t-1 is run again from step t-2's checkpoint (the
    input model for t = 2) with the folder's settings `config`, and must rebuild its checkpoint exactly."""
    from lean_onnx.graph.load import read_model
    from lean_onnx.train.schedule import _step, step_keeps

    before = read_model(os.path.join(folder, state["steps"][t - 3]["model"]) if t > 2 else state["input"])
    carried = {}
    _, rebuilt = _step(before, t - 1, step_keeps(config.keep, config.steps)[t - 2],
                       _origin(state), config, train, val, True, lambda line: None,
                       "cpu", state_out=carried)
    saved = read_model(os.path.join(folder, state["steps"][t - 2]["model"]))
    if rebuilt.SerializeToString() != saved.SerializeToString():
        raise SystemExit(f"{folder}: step {t - 1} fine-tuned again differs from its checkpoint; its Adam state "
                         "would not be the run's")
    print(f"step {t - 1} fine-tuned again: its checkpoint byte for byte; Adam's state for {len(carried)} "
          "parameters", flush=True)
    return carried


if __name__ == "__main__":
    sys.exit(main())
