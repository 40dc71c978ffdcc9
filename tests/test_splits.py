"""The split study: one zoo + flow per train/test split, scored on that split's own test set."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from metaflow_ws.evaluation.calibration import full_metrics
from metaflow_ws.experiments.splits import SplitsConfig, main, render, run_splits
from metaflow_ws.tasks.registry import get_task
from metaflow_ws.train import train_population


def test_splits_differ_and_each_row_is_scored_on_its_own_split(tmp_path):
    task = get_task("breast_cancer")
    test0, test3 = task.data(0).split("test")[0], task.data(3).split("test")[0]
    assert test0.shape == test3.shape and not torch.equal(test0, test3)

    cfg = SplitsConfig(data_seeds=(0, 3), steps=3, d_model=8, num_layers=1, runs=3, epochs=2, samples=4,
                       sample_steps=2)
    res = run_splits(cfg, tmp_path, log=lambda s: None)
    assert [r["data_seed"] for r in res["splits"]] == [0, 3]
    assert all(r["test_points"] == test0.shape[0] for r in res["splits"])
    # the trained row of split 3 is the zoo trained on split 3, scored on split 3's test set
    zoo3 = train_population(task, 3, epochs=2, seed=0, data_seed=3)
    ref = full_metrics(task, zoo3.final(), "test", data_seed=3)
    assert res["splits"][1]["trained"]["accuracy_mean"] == pytest.approx(float(ref["accuracy"].mean()), abs=1e-6)
    assert res["splits"][1]["trained"]["nll_mean"] == pytest.approx(float(ref["nll"].double().mean()), rel=1e-5)
    # one output scale per population fitted on the split's validation set: accuracy unchanged, the trained
    # networks' scale is the one fit_output_scale finds for them on split 3
    from metaflow_ws.evaluation import fit_output_scale

    _, c = fit_output_scale(task.spec, zoo3.final().params, *task.data(3).split("val"))
    row3 = res["splits"][1]
    assert row3["trained_fitted"]["scale"] == pytest.approx(c, rel=1e-5)
    for who in ("trained", "flow"):
        assert row3[f"{who}_fitted"]["accuracy_mean"] == pytest.approx(row3[who]["accuracy_mean"], abs=1e-6)
    assert (tmp_path / "flows" / "seed3" / "flow.safetensors").exists()
    # --resume reloads the finished flows: the same samples, no step retrained
    again = run_splits(dataclasses.replace(cfg, resume=True), tmp_path, log=lambda s: None)
    assert [r["resumed_from"] for r in again["splits"]] == [3, 3]
    assert [r["flow"] for r in again["splits"]] == [r["flow"] for r in res["splits"]]
    for r in res["splits"]:
        assert 0.0 <= r["flow"]["accuracy_mean"] <= 1.0 and r["flow"]["nll_mean"] > 0


def _row(seed: int, trained: float, flow: float, flow_nll: float) -> dict:
    return {"data_seed": seed, "test_points": 114, "seconds": 1.0, "flow_seconds": 1.0,
            "trained": {"accuracy_mean": trained, "accuracy_std": 0.0, "nll_mean": 0.05, "nll_std": 0.0},
            "flow": {"accuracy_mean": flow, "accuracy_std": 0.0, "nll_mean": flow_nll, "nll_std": 0.0}}


def test_render_counts_the_goal_per_split_and_averages_over_splits():
    cfg = {"task": "breast_cancer", "flow": "geometric", "runs": None, "d_model": 32, "num_layers": 3,
           "steps": 3000, "coupling": "ot-perm", "samples": 100, "sample_steps": 64}
    res = {"config": cfg, "splits": [_row(0, 0.96, 0.94, 0.2), _row(3, 1.0, 0.995, 0.01)], "wall_seconds": 60.0,
           "device": "cpu", "threads": 2, "torch": torch.__version__}
    text = render(res, "python -m metaflow_ws.experiments.splits")
    assert "no path noise (written before the option existed)" in text  # results.json of an older run
    assert "path noise σ = 0.3)" in render({**res, "config": {**cfg, "path_noise": 0.3}}, "cmd")
    assert "no path noise)" in render({**res, "config": {**cfg, "path_noise": 0.0}}, "cmd")
    assert "met on 1 of 2 splits (3)" in text
    assert "reach 0.993 on 1 of 2" in text
    assert "| 0.9800 ± 0.0200 |" in text  # trained accuracy: mean ± std over the two splits
    assert "from 0.9600 (split 0) to 1.0000 (split 3)" in text
    assert "output scale" not in text  # results written before the fitted columns
    fitted = [{**r, "trained_fitted": {**r["trained"], "nll_mean": nll, "scale": 1.2},
               "flow_fitted": {**r["flow"], "nll_mean": fnll, "scale": 0.5}}
              for r, nll, fnll in zip(res["splits"], (0.06, 0.04), (0.07, 0.045))]
    text = render({**res, "splits": fitted}, "cmd")
    # the flow's fitted NLL against the lower of the trained networks' raw and fitted: 0.07 > 0.05, 0.045 > 0.04
    assert "whichever is lower, on 0 of 2 splits." in text
    assert "flow's test NLL is 0.0575 vs the trained networks' 0.0500 fitted alike" in text
    fitted[1]["flow_fitted"]["nll_mean"] = 0.03
    assert "on 1 of 2 splits (3)." in render({**res, "splits": fitted}, "cmd")


def test_cli_rejects_bad_input_with_exit_code_2(tmp_path, capsys):
    assert main(["--task", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["--data-seeds", "1", "1", "--out", str(tmp_path)]) == 2
    assert "distinct" in capsys.readouterr().err
    assert main(["--path-noise", "-0.1", "--out", str(tmp_path)]) == 2
    assert "path_noise must be a finite number ≥ 0" in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists()


def test_cli_writes_readme_and_results(tmp_path):
    out = tmp_path / "o"
    rc = main(["--out", str(out), "--data-seeds", "1", "--steps", "2", "--runs", "2", "--epochs", "1", "-n", "3",
               "--d-model", "8", "--layers", "1", "--path-noise", "0.2"])
    assert rc == 0
    # the flag reaches the flow itself: the saved flow configuration trains with σ = 0.2
    assert json.loads((out / "flows" / "seed1" / "config.json").read_text())["config"]["sigma"] == 0.2
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["path_noise"] == 0.2
    assert data["command"].startswith("python -m metaflow_ws.experiments.splits --out")
    assert [r["data_seed"] for r in data["splits"]] == [1]
    text = (out / "README.md").read_text()
    assert "flow samples over 1 train/test split\n" in text
    assert "path noise σ = 0.2)" in text
    (out / "README.md").unlink()
    assert main(["--out", str(out), "--rerender"]) == 0  # the README again, from results.json alone
    assert (out / "README.md").read_text() == text
    assert main(["--out", str(tmp_path / "none"), "--rerender"]) == 2
