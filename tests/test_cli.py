import json

import pytest
import torch

from metaflow_ws.cli import main


def run_json(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0
    return json.loads(out.strip().splitlines()[-1])


def test_tasks_json(capsys):
    res = run_json(capsys, ["tasks", "--json"])
    names = {t["name"] for t in res["tasks"]}
    assert {"breast_cancer", "digits", "mnist1d", "sinusoid", "gaussian_toy"} <= names
    bc = next(t for t in res["tasks"] if t["name"] == "breast_cancer")
    assert bc["architecture"] == "MLP 30-16-16-2 (relu)" and bc["sizes"]["test"] == 114
    digits = next(t for t in res["tasks"] if t["name"] == "digits")
    assert bc["flow"] == {"d_model": 32, "num_layers": 3, "lr": 1e-2}  # library defaults: no [flow] table
    assert digits["flow"] == {"d_model": 64, "num_layers": 5, "lr": 5e-3}  # the task file's [flow] table


def test_zoo_then_evaluate_end_to_end(capsys, tmp_path):
    out = tmp_path / "zoo.safetensors"
    res = run_json(capsys, ["zoo", "breast_cancer", "--runs", "4", "--epochs", "12", "--out", str(out), "--json",
                            "--device", "cpu"])
    for key in ("task", "runs", "checkpoints", "params", "test_accuracy_mean", "test_accuracy_std", "seconds"):
        assert key in res
    assert res["runs"] == 4 and res["params"] == 802 and res["test_accuracy_mean"] > 0.85
    ev = run_json(capsys, ["evaluate", "--task", "breast_cancer", "--weights", str(out), "--final", "--json"])
    assert ev["n"] == 4 and abs(ev["accuracy_mean"] - res["test_accuracy_mean"]) < 1e-6
    assert {"nll_mean", "nll_std", "accuracy_std"} <= set(ev)


def test_regression_zoo_reports_mse(capsys, tmp_path):
    res = run_json(capsys, ["zoo", "sinusoid", "--runs", "2", "--epochs", "2", "--out", str(tmp_path / "s.st"), "--json"])
    assert "test_mse_mean" in res


@pytest.mark.parametrize(
    "argv, message",
    [
        (["zoo", "no_such_task", "--out", "x.safetensors"], "unknown task 'no_such_task'"),
        (["evaluate", "--task", "breast_cancer", "--weights", "missing.safetensors"], "does not exist"),
        (["zoo", "breast_cancer", "--runs", "0", "--out", "x.safetensors"], "runs must be"),
        (["zoo", "mnist", "--data-dir", "/nonexistent-folder", "--out", "x.safetensors"], "train-images-idx3-ubyte"),
    ],
)
def test_bad_input_exits_2_with_message(capsys, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_evaluate_wrong_architecture(capsys, tiny_bc_zoo, tmp_path):
    tiny_bc_zoo.save(tmp_path / "z.safetensors")
    assert main(["evaluate", "--task", "digits", "--weights", str(tmp_path / "z.safetensors")]) == 2
    assert "64-10-10" in capsys.readouterr().err


def test_threads_option_sets_torch_threads(capsys):
    import torch

    before = torch.get_num_threads()
    try:
        run_json(capsys, ["--threads", "1", "tasks", "--json"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_threads_option_rejects_non_positive(capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(["--threads", value, "tasks"])
    assert exc.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_the_split_travels_from_zoo_to_flow_to_samples_to_evaluate(capsys, tmp_path):
    """Networks trained on split 3 are scored on split 3's test set unless told otherwise (and then warned)."""
    from metaflow_ws.flows import WeightFlow
    from metaflow_ws.io import Zoo

    zoo = tmp_path / "zoo.safetensors"
    res = run_json(capsys, ["zoo", "breast_cancer", "--runs", "3", "--epochs", "3", "--data-seed", "3",
                            "--out", str(zoo), "--json"])
    ev = run_json(capsys, ["evaluate", "--task", "breast_cancer", "--weights", str(zoo), "--final", "--json"])
    assert ev["data_seed"] == 3 and ev["accuracy_mean"] == pytest.approx(res["test_accuracy_mean"], abs=1e-6)
    ev0 = run_json(capsys, ["evaluate", "--task", "breast_cancer", "--weights", str(zoo), "--final",
                            "--data-seed", "0", "--json"])
    assert ev0["data_seed"] == 0
    main(["evaluate", "--task", "breast_cancer", "--weights", str(zoo), "--data-seed", "0"])
    assert "trained on split 3" in capsys.readouterr().err

    flow = tmp_path / "flow"
    assert main(["train", "--zoo", str(zoo), "--flow", "euclidean", "--steps", "2", "--batch-size", "4",
                 "--d-model", "8", "--layers", "1", "--out", str(flow), "--json"]) == 0
    loaded = WeightFlow.from_pretrained(flow)
    assert loaded.meta["zoo_data_seed"] == 3 and loaded.meta["zoo_task"] == "breast_cancer"
    assert main(["sample", "--flow", str(flow), "-n", "2", "--steps", "2", "--out", str(tmp_path / "s.safetensors"),
                 "--json"]) == 0
    assert Zoo.load(tmp_path / "s.safetensors").data_seed == 3
    capsys.readouterr()
    ev = run_json(capsys, ["evaluate", "--task", "breast_cancer", "--weights", str(tmp_path / "s.safetensors"),
                           "--json"])
    assert ev["data_seed"] == 3
    # --fit-scale: the same draws with every last layer times the c fitted on split 3's validation set
    from metaflow_ws.evaluation import fit_output_scale
    from metaflow_ws.tasks import get_task

    fs = run_json(capsys, ["sample", "--flow", str(flow), "-n", "2", "--steps", "2", "--fit-scale", "--task",
                           "breast_cancer", "--out", str(tmp_path / "fs.safetensors"), "--json"])
    raw, fitted = Zoo.load(tmp_path / "s.safetensors"), Zoo.load(tmp_path / "fs.safetensors")
    _, c = fit_output_scale(raw.spec, raw.params, *get_task("breast_cancer").data(3).split("val"))
    assert fs["output_scale"] == pytest.approx(c, rel=1e-5) and fitted.info["output_scale"] == fs["output_scale"]
    for k, v in raw.params.items():
        torch.testing.assert_close(fitted.params[k], v * c if k.startswith("layers.2.") else v)
    for argv, message in ((["--fit-scale"], "--fit-scale needs --task TASK"),
                          (["--fit-scale", "--task", "sinusoid"], "needs a classification task")):
        assert main(["sample", "--flow", str(flow), "-n", "2", "--steps", "2", *argv,
                     "--out", str(tmp_path / "bad.safetensors")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_architecture_transfer_from_the_command_line(capsys, tmp_path):
    """`sample --widths` draws networks of another depth from a flow (guided by the task at that depth too),
    `evaluate` scores them as they are, and `zoo --widths` trains their reference."""
    from metaflow_ws.io import Zoo
    from metaflow_ws.nets import NetworkSpec

    zoo, flow, out = tmp_path / "zoo.safetensors", tmp_path / "flow", tmp_path / "deep.safetensors"
    run_json(capsys, ["zoo", "breast_cancer", "--runs", "3", "--epochs", "2", "--out", str(zoo), "--json"])
    assert main(["train", "--zoo", str(zoo), "--flow", "geometric", "--steps", "2", "--batch-size", "4",
                 "--d-model", "8", "--layers", "1", "--out", str(flow), "--json"]) == 0
    capsys.readouterr()
    run_json(capsys, ["sample", "--flow", str(flow), "--widths", "30-8-8-8-2", "-n", "3", "--steps", "2",
                      "--guidance", "1", "--task", "breast_cancer", "--out", str(out), "--json"])
    deep = Zoo.load(out)
    assert deep.spec == NetworkSpec((30, 8, 8, 8, 2)) and deep.task == "breast_cancer[30-8-8-8-2]"
    ev = run_json(capsys, ["evaluate", "--task", "breast_cancer", "--weights", str(out), "--json"])
    assert ev["n"] == 3 and ev["task"] == "breast_cancer[30-8-8-8-2]" and 0 <= ev["accuracy_mean"] <= 1
    ref = run_json(capsys, ["zoo", "breast_cancer", "--widths", "30-8-8-8-2", "--runs", "2", "--epochs", "1",
                            "--out", str(tmp_path / "ref.safetensors"), "--json"])
    assert ref["params"] == NetworkSpec((30, 8, 8, 8, 2)).num_params
    # other input sizes are clear errors; so is text that is not a list of widths
    assert main(["sample", "--flow", str(flow), "--widths", "31-8-2", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "30 inputs" in capsys.readouterr().err
    assert main(["zoo", "breast_cancer", "--widths", "30-8-3", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "must be positive, start with 30 and end with 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["zoo", "breast_cancer", "--widths", "30-x-2", "--out", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2 and "expected layer widths like 30-16-16-2" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    # --grow: the flow's own samples (same seed) grown to W compute the same functions
    own, grown = tmp_path / "own.safetensors", tmp_path / "grown.safetensors"
    run_json(capsys, ["sample", "--flow", str(flow), "-n", "3", "--steps", "2", "--out", str(own), "--json"])
    run_json(capsys, ["sample", "--flow", str(flow), "--widths", "30-24-16-16-2", "--grow", "-n", "3", "--steps", "2",
                      "--out", str(grown), "--json"])
    a, b = Zoo.load(own), Zoo.load(grown)
    assert b.spec == NetworkSpec((30, 24, 16, 16, 2)) and b.info["grown_from"] == [30, 16, 16, 2]
    x = torch.randn(20, 30)
    torch.testing.assert_close(b.spec.batched_forward(b.params, x), a.spec.batched_forward(a.params, x),
                               rtol=1e-4, atol=1e-4)
    assert main(["sample", "--flow", str(flow), "--widths", "30-8-16-2", "--grow",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "grow only adds neurons" in capsys.readouterr().err
    assert main(["sample", "--flow", str(flow), "--grow", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--grow needs --widths" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
