import math

import numpy as np
import pytest
import torch

from metaflow_ws.tasks import (
    DataUnavailableError,
    TaskFileError,
    UnknownTaskError,
    get_task,
    list_tasks,
    load_task_file,
    register_task,
)
from metaflow_ws.tasks.datasets import MNIST_FILES, read_idx, write_idx
from conftest import write_mnist

FAMILIES = {"gaussian_toy", "breast_cancer", "digits", "mnist1d", "sinusoid", "digits_permuted", "mnist", "fashion_mnist"}


def test_all_families_registered():
    names = {t.name for t in list_tasks()}
    assert FAMILIES <= names
    bc = get_task("breast_cancer")
    assert bc.spec.widths == (30, 16, 16, 2) and bc.spec.activation == "relu"
    assert bc.recipe.optimizer == "adam" and bc.recipe.runs == 100 and bc.recipe.epochs == 50
    assert math.isclose(bc.recipe.init_std**2, 0.1)
    assert get_task("sinusoid").spec.widths == (1, 40, 40, 1)
    assert get_task("mnist").spec.widths == (784, 10, 10)


def test_unknown_task_lists_names():
    with pytest.raises(UnknownTaskError, match="registered tasks: .*breast_cancer"):
        get_task("cifar100")


@pytest.mark.parametrize("name", ["breast_cancer", "digits", "digits_permuted", "sinusoid"])
def test_splits_are_deterministic_by_seed(name):
    t = get_task(name)
    a, b, c = t.data(0), t.data(0), t.data(1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    s = a.sizes()
    assert s["train"] > 0 and s["test"] > 0


def test_breast_cancer_is_standardized_on_train():
    d = get_task("breast_cancer").data(0)
    assert d.x_train.shape[1] == 30
    assert torch.allclose(d.x_train.mean(0), torch.zeros(30), atol=1e-5)
    assert sum(d.sizes().values()) == 569


def test_sinusoid_matches_closed_form_and_is_indexed_by_parameters():
    t = get_task("sinusoid").variant(amplitude=2.0, phase=0.5)
    d = t.data(3)
    assert d.info == {"amplitude": 2.0, "phase": 0.5}
    assert torch.allclose(d.y_train, 2.0 * torch.sin(d.x_train - 0.5), atol=1e-6)
    assert float(d.x_test.min()) >= -5 and float(d.x_test.max()) <= 5
    drawn = get_task("sinusoid").variant(task_seed=7).data(0).info
    assert 0.1 <= drawn["amplitude"] <= 5.0 and 0 <= drawn["phase"] <= math.pi


def test_digits_permuted_is_a_fixed_pixel_permutation_of_digits():
    plain = get_task("digits").data(0)
    p1 = get_task("digits_permuted").data(0)
    p2 = get_task("digits_permuted").variant(permutation_seed=2).data(0)
    perm = np.random.default_rng(1).permutation(64)
    assert torch.equal(p1.x_train, plain.x_train[:, perm])
    assert torch.equal(p1.y_train, plain.y_train)
    assert not torch.equal(p1.x_train, p2.x_train)


def test_mnist1d_is_generated_offline():
    d = get_task("mnist1d").data(0)
    assert d.x_train.shape[1] == 40 and d.x_test.shape == (1000, 40)
    assert set(d.y_train.unique().tolist()) == set(range(10))


@pytest.mark.parametrize("layout", ["raw", "torchvision"])
def test_mnist_reads_tiny_idx_folder(tmp_path, layout):
    folder = tmp_path if layout == "raw" else tmp_path / "MNIST" / "raw"
    write_mnist(folder)
    d = get_task("mnist").variant(root=str(tmp_path)).data(0)
    assert d.x_train.shape[1] == 784 and d.x_test.shape == (5, 784)
    assert d.sizes()["train"] + d.sizes()["val"] == 12
    assert float(d.x_train.max()) <= 1.0


def test_missing_mnist_folder_names_folder_and_files(tmp_path):
    with pytest.raises(DataUnavailableError) as e:
        get_task("fashion_mnist").variant(root=str(tmp_path / "nowhere")).data(0)
    msg = str(e.value)
    assert "nowhere" in msg and "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg


def test_truncated_idx_is_an_error(tmp_path):
    write_idx(tmp_path / "a", np.zeros((3, 4), dtype=np.uint8))
    raw = (tmp_path / "a").read_bytes()
    (tmp_path / "b").write_bytes(raw[:-2])
    assert read_idx(tmp_path / "a").shape == (3, 4)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "b")
    (tmp_path / "c").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "c")


def test_register_from_python_and_schema_errors(tmp_path):
    spec = {
        "name": "iris_like_test_task",
        "kind": "classification",
        "dataset": {"builder": "digits", "classes": [0, 1, 2]},
        "architecture": {"widths": [64, 8, 3], "activation": "relu"},
        "recipe": {"optimizer": "sgd", "lr": 0.1, "epochs": 2, "runs": 2},
    }
    t = register_task(spec, overwrite=True)
    assert get_task("iris_like_test_task") is t
    assert set(t.data(0).y_train.unique().tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="already registered"):
        register_task(spec)
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nkind = "classification"\n[dataset]\nbuilder = "digits"\n'
                   '[architecture]\nwidths = [64, 10]\n[recipe]\nlearning_rate = 0.1\n')
    with pytest.raises(TaskFileError, match="unknown keys \\['learning_rate'\\]"):
        load_task_file(bad)
    bad.write_text('name = "x"\nkind = "classification"\n[dataset]\nbuilder = "imagenet"\n[architecture]\nwidths = [3, 2]\n')
    with pytest.raises(TaskFileError, match="unknown dataset builder 'imagenet'"):
        load_task_file(bad)
    bad.write_text("name = [")
    with pytest.raises(TaskFileError, match="invalid TOML"):
        load_task_file(bad)


def test_flow_table_sets_the_default_flow_and_is_checked(tmp_path):
    from metaflow_ws.flows import FlowConfig, TrainConfig, task_flow_defaults

    library = {"d_model": FlowConfig.d_model, "num_layers": FlowConfig.num_layers, "lr": TrainConfig.lr}
    assert task_flow_defaults("breast_cancer") == library  # no [flow] table
    assert task_flow_defaults("not_a_registered_task") == library  # a zoo of a task registered elsewhere
    assert task_flow_defaults("digits") == {"d_model": 64, "num_layers": 5, "lr": 5e-3}
    spec = {"name": "flow_table_test_task", "kind": "classification", "dataset": {"builder": "digits"},
            "architecture": {"widths": [64, 10, 10]}, "flow": {"lr": 3e-3}}
    t = register_task(spec, overwrite=True)
    assert task_flow_defaults(t.name) == library | {"lr": 3e-3}  # a partial table keeps the rest
    assert t.to_dict()["flow"] == {"lr": 3e-3} and "flow" not in get_task("breast_cancer").to_dict()
    head = 'name = "x"\nkind = "classification"\n[dataset]\nbuilder = "digits"\n[architecture]\nwidths = [64, 10]\n'
    bad = tmp_path / "bad.toml"
    for table, match in [("d_model = 0", "flow.d_model must be an integer ≥ 1; got 0"),
                         ("num_layers = 2.5", "flow.num_layers must be an integer ≥ 1; got 2.5"),
                         ("d_model = true", "flow.d_model must be an integer ≥ 1; got True"),
                         ("lr = -1e-3", "flow.lr must be a positive number; got -0.001"),
                         ("lr = nan", "flow.lr must be a positive number; got nan"),
                         ('lr = "fast"', "flow.lr must be a positive number; got 'fast'"),
                         ("layers = 5", "\\[flow\\]: unknown keys \\['layers'\\]; allowed: \\['d_model', 'lr', "
                                        "'num_layers'\\]")]:
        bad.write_text(head + "[flow]\n" + table + "\n")
        with pytest.raises(TaskFileError, match=match):
            load_task_file(bad)
    bad.write_text(head.replace("[dataset]", "flow = 3\n[dataset]"))
    with pytest.raises(TaskFileError, match="\\[flow\\] must be a table"):
        load_task_file(bad)


def test_train_and_compare_take_the_task_flow_table_unless_flags_say_otherwise(tmp_path, capsys):
    import json

    from metaflow_ws.cli import main
    from metaflow_ws.flows import WeightFlow

    register_task({"name": "flow_defaults_cli_task", "kind": "classification",
                   "dataset": {"builder": "digits", "classes": [0, 1, 2]},
                   "architecture": {"widths": [64, 4, 3]}, "recipe": {"epochs": 1, "runs": 2},
                   "flow": {"d_model": 8, "num_layers": 1, "lr": 3e-3}}, overwrite=True)
    zoo = tmp_path / "zoo.safetensors"
    assert main(["zoo", "flow_defaults_cli_task", "--out", str(zoo), "--json"]) == 0
    capsys.readouterr()
    for flags, expect in [([], (8, 1, 3e-3)), (["--d-model", "12", "--lr", "1e-3"], (12, 1, 1e-3))]:
        out = tmp_path / f"flow{len(flags)}"
        assert main(["train", "--zoo", str(zoo), "--flow", "euclidean", "--steps", "2", "--batch-size", "4",
                     *flags, "--out", str(out), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        flow = WeightFlow.from_pretrained(out)
        assert (flow.config.d_model, flow.config.num_layers, summary["lr"]) == expect
        assert (summary["d_model"], summary["layers"]) == expect[:2]
    assert main(["compare", "--zoo", str(zoo), "--flows", "euclidean", "--steps", "2", "-n", "2",
                 "--sample-steps", "2", "--out", str(tmp_path / "cmp"), "--json"]) == 0
    assert "Relational Transformer d=8, 1 layers, 2 steps (batch 32, AdamW lr 0.003)" in (
        tmp_path / "cmp" / "README.md").read_text()


def test_compare_flows_takes_the_task_flow_table_unless_arguments_say_otherwise(monkeypatch):
    from metaflow_ws.experiments import flows_table
    from metaflow_ws.flows import TrainConfig
    from metaflow_ws.train import train_population

    register_task({"name": "flow_defaults_api_task", "kind": "classification",
                   "dataset": {"builder": "digits", "classes": [0, 1, 2]},
                   "architecture": {"widths": [64, 4, 3]}, "recipe": {"epochs": 1, "runs": 2},
                   "flow": {"d_model": 8, "num_layers": 1, "lr": 3e-3}}, overwrite=True)
    zoo = train_population("flow_defaults_api_task", seed=0)
    seen = []

    class Stop(Exception):
        pass

    def fake_train_flow(zoo, cfg, tc, folder, device=None):  # noqa: ANN001, ARG001
        seen.append((cfg.d_model, cfg.num_layers, tc.lr, tc.steps))
        raise Stop

    monkeypatch.setattr(flows_table, "train_flow", fake_train_flow)
    runs = [flows_table.FlowRun("euclidean")]
    for kwargs, expect in [({}, (8, 1, 3e-3, TrainConfig.steps)),
                           ({"d_model": 12, "train": TrainConfig(steps=5, lr=1e-3)}, (12, 1, 1e-3, 5))]:
        with pytest.raises(Stop):
            flows_table.compare_flows(zoo, runs=runs, **kwargs)
        assert seen[-1] == expect
