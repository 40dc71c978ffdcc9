"""``metaflow-ws report``: a tiny end-to-end run on breast_cancer, reuse of saved flows, CLI wiring and errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from metaflow_ws.cli import main
from metaflow_ws.evaluation import noise_baseline_matched_accuracy
from metaflow_ws.experiments.report import ReportConfig, run_report
from metaflow_ws.experiments.report import _argmax_finite as rep_argmax
from metaflow_ws.flows.train import TrainConfig

PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ("bma", "accuracy_histogram", "steps", "guidance", "noise", "time_grid", "barrier", "likelihood")


def _tiny(out, **kw) -> ReportConfig:
    base = dict(task="breast_cancer", out_dir=out, quick=True, runs=3, epochs=2, steps=2, d_model=4, num_layers=1,
                samples=4, sample_steps=2, step_sweep=(1, 2), guidance_sweep=(0.0, 0.1), noise_sweep=(0.0, 0.1), rho_sweep=(1.0, 3.0),
                sweep_samples=3, guidance_points=16, lik_networks=2, lik_steps=1, lik_probes=1, barrier_pairs=2,
                bma_max=4, bma_orderings=1, average_k=(2,))
    base.update(kw)
    return ReportConfig(**base)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    res = run_report(_tiny(out), command="metaflow-ws report --task breast_cancer --quick (test budget)")
    return out, res


def test_report_writes_readme_results_and_figures(tiny_report):
    out, res = tiny_report
    text = (out / "README.md").read_text()
    for section in ("## Goals", "## Samples and baselines", "Table 4.1", "## Loss barriers", "## Likelihood",
                    "## Wall time", "## Reproduce", "metaflow-ws report --task breast_cancer --quick (test budget)"):
        assert section in text, section
    assert "not** the real results" in text  # quick runs say so
    assert "Geometric flow mean test accuracy ≥ 0.993" in text
    from metaflow_ws.flows.flow import SIGMA

    assert f"path noise {SIGMA:g} (`train --path-noise`)" in text  # the flows' training says what it used
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(PNG)
        assert f"figures/{name}.png" in text
    saved = json.loads((out / "results.json").read_text())
    assert saved["task"] == "breast_cancer" and saved["quick"] is True
    assert set(saved["figures"]) == set(FIGURES)
    assert len(saved["table_4_1"]) == 12  # three flows × {unaligned, aligned, aligned+OT, aligned+OT+perm}
    assert {r["kind"] for r in saved["table"]} >= {"zoo", "ensemble", "heldout", "flow", "noise", "noise_acc", "average"}
    assert set(saved["stage_seconds"]) >= {"zoo", "flow training (or loading)", "likelihood detection"}
    # disagreement of the saved samples, recomputed, is what the report shows next to the noise baseline's
    from metaflow_ws.evaluation import prediction_disagreement
    from metaflow_ws.io.zoo import Zoo
    from metaflow_ws.tasks import get_task

    task = get_task("breast_cancer")
    x_te = task.data(Zoo.load(out / "zoo.safetensors").data_seed).split("test")[0]
    for b in saved["noise_baselines"]:
        smp = Zoo.load(out / "flows" / b["flow"] / "samples.safetensors")
        assert b["flow_disagreement"] == pytest.approx(float(prediction_disagreement(task.spec, smp, x_te)))
        assert 0.0 <= b["matched_accuracy"]["disagreement"] <= 1.0
        assert f"{b['flow_diversity']:.4f} / {b['flow_disagreement']:.3f} / " in text
        d = b.get("matched_diversity")
        if d is not None:  # how many final checkpoints the diversity-matched noise perturbs: all runs, or one
            assert d["centers"] in (1, 3)
            assert f"| {d['sigma']:.3g}, {d['centers']}, {d['accuracy_mean']:.4f}, " in text
    # every guidance / stochastic-noise sweep point has the noise baseline's diversity at its accuracy (NaN where
    # the trained networks themselves are less accurate)
    for key in ("guidance", "noise", "rho"):
        blk = saved["sweeps"][key]
        nb = blk["noise_baseline"]["diversity"]
        acc = next(iter(blk["series"].values()))["accuracy"]
        assert len(nb) == len(blk["values"])
        zoo_acc = saved["table"][0]["accuracy_mean"]
        for a, d in zip(acc, nb):
            if a > zoo_acc + 0.011:
                assert d is None  # NaN in results.json: above what noise on the trained networks reaches
            elif a <= zoo_acc:
                assert d >= 0
    assert text.count("| noise baseline at the same accuracy: div |") == 3
    # output scale fitted on the validation split: the saved samples recomputed, accuracy untouched, validation
    # NLL not above the raw samples'; the NLL goal is stated raw and fitted
    from metaflow_ws.evaluation import batch_metrics, fit_output_scale

    x_val, y_val = task.data(Zoo.load(out / "zoo.safetensors").data_seed).split("val")
    fits = {o["key"]: o for o in saved["output_scale"]}
    assert {"zoo", "heldout"} | {b["flow"] for b in saved["noise_baselines"]} == set(fits)
    for b in saved["noise_baselines"]:
        smp, o = Zoo.load(out / "flows" / b["flow"] / "samples.safetensors"), fits[b["flow"]]
        scaled, c = fit_output_scale(task.spec, smp, x_val, y_val)
        assert o["scale"] == pytest.approx(c) and o["fitted_accuracy_mean"] == o["raw_accuracy_mean"]
        val = [batch_metrics(task.spec, p, x_val, y_val, "classification")["loss"].mean() for p in (scaled, smp.params)]
        assert val[0] <= val[1] + 1e-6
        assert f"| {o['label']} | {o['scale']:.3g} | {o['raw_accuracy_mean']:.4f} | {o['raw_nll_mean']:.4f} → " in text
    assert "## Output scale fitted on the validation split" in text
    ref = saved["heldout_noise_baseline"]  # networks trained anew through the flows' noise comparison
    assert ref["flow_accuracy"] == pytest.approx(next(r for r in saved["table"] if r["kind"] == "heldout")["accuracy_mean"])
    assert f"| Held-out trained networks (reference) | {ref['flow_accuracy']:.4f} / {ref['flow_diversity']:.4f} / " in text
    assert "Geometric flow mean test NLL ≤ the trained networks' |" in text
    assert "Geometric flow mean test NLL ≤ the trained networks', with one output scale" in text
    assert saved["sweeps"]["rho"]["values"] == [1.0, 3.0] and "| ρ | 1 | 3 |" in text
    from metaflow_ws.flows import SampleConfig

    assert f"euler with 2 steps on the time grid ρ = {SampleConfig.rho:g}" in text
    for f in saved["likelihood"]["flows"].values():
        for pop, d in f["nats_per_dim"].items():
            if pop != "positive" and pop != "zoo (training) networks":
                assert 0.0 <= d["auroc"] <= 1.0
    assert len(list((out / "flows").glob("*/flow.safetensors"))) == 12
    assert (out / "zoo.safetensors").is_file()
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_report_reuses_matching_flows(tiny_report):
    out, first = tiny_report
    again = run_report(_tiny(out, reuse=True, ablation=False, figures=False))
    assert all(f["reused"] for f in again["flows"].values())
    assert again["zoo"]["source"].startswith("reused")
    assert len(again["flows"]) == 3 and "table_4_1" not in again
    for name, f in again["flows"].items():  # same flows → same samples → same metrics
        assert f["final_loss"] == pytest.approx(first["flows"][name]["final_loss"])
    t0 = {r["method"]: r for r in first["table"]}
    for r in again["table"]:
        if r["kind"] == "flow":
            assert r["accuracy_mean"] == pytest.approx(t0[r["method"]]["accuracy_mean"])


def test_report_path_noise_reaches_the_flows(tiny_report, tmp_path):
    """Another path noise is another flow: --reuse retrains instead of loading the σ = 0.3 flows, and says σ = 0."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_report[0], out)
    again = run_report(_tiny(out, reuse=True, ablation=False, figures=False, path_noise=0.0))
    assert not any(f["reused"] for f in again["flows"].values())
    assert {f["path_noise"] for f in again["flows"].values()} == {0.0}
    assert "path noise 0 (`train --path-noise`)" in (out / "README.md").read_text()


def test_classification_goals_check_bma_on_the_flow_chosen_for_it(tmp_path, monkeypatch):
    """On digits the BMA goal is checked on the best flow by validation accuracy and, where another flow has the
    higher validation BMA, on that one too; both choices use the validation split only."""
    from metaflow_ws.experiments import report as rep

    val_acc, val_bma = iter([0.9, 0.1, 0.5]), iter([0.1, 0.2, 0.8])  # headline order: Euclidean, Normalized, Geo
    monkeypatch.setattr(rep._Report, "_val_accuracy", lambda self, params: next(val_acc))
    monkeypatch.setattr(rep._Report, "_val_bma_accuracy", lambda self, params: next(val_bma))
    res = run_report(_tiny(tmp_path, task="digits", ablation=False, figures=False))
    assert res["best_flow"].startswith("euclidean") and res["best_bma_flow"].startswith("geometric")
    bma_goals = [g for g in res["goals"] if g["goal"].startswith("BMA")]
    assert [g["flow"] for g in bma_goals] == [res["best_flow"], res["best_bma_flow"]]
    table = {r["flow"]: r for r in res["table"] if r["kind"] == "flow"}
    for g in bma_goals:  # each goal reads its own flow's test BMA curve
        assert g["value"] == pytest.approx(max(table[g["flow"]]["bma"]["accuracy"]))
        assert g["met"] == (g["value"] >= res["table"][0]["accuracy_mean"])
    text = (tmp_path / "README.md").read_text()
    assert "(flow chosen by validation BMA of 4)" in text and "by validation accuracy of the model average" in text
    # the diversity goal names what networks trained anew score in the same comparison
    ref = res["heldout_noise_baseline"]
    div_goal = next(g for g in res["goals"] if g["goal"].startswith("novelty and diversity"))
    assert f"networks trained anew: {ref['flow_diversity']:.4f} vs {ref['matched_accuracy']['diversity']:.4f}" \
        in div_goal["detail"]


def test_validation_bma_picks_a_flow_from_the_validation_split(tiny_report):
    _, res = tiny_report
    val_bma = res["validation_bma_accuracy"]
    assert set(val_bma) == set(res["validation_accuracy"])
    assert all(0.0 <= v <= 1.0 for v in val_bma.values())
    assert val_bma[res["best_bma_flow"]] == max(val_bma.values())
    assert rep_argmax({"a": float("nan"), "b": 0.2, "c": 0.2}) == "b"
    with pytest.raises(ValueError, match="no flows"):
        rep_argmax({})


def test_reuse_needs_a_matching_configuration(tiny_report):
    import dataclasses

    from metaflow_ws.flows.train import saved_flow_matches as _matches
    from metaflow_ws.flows import FlowConfig
    from metaflow_ws.io import Zoo

    out, res = tiny_report
    zoo = Zoo.load(out / "zoo.safetensors")
    folder = out / "flows" / "geometric_ot_aligned_2"
    fcfg = FlowConfig(flow="geometric", widths=zoo.spec.widths, task=zoo.task,
                      prior_std=float(zoo.recipe["init_std"]), d_model=4, num_layers=1)
    tcfg = TrainConfig(steps=2, coupling="ot", align=True, seed=0)
    assert _matches(folder, fcfg, tcfg, zoo)
    assert not _matches(folder, fcfg, dataclasses.replace(tcfg, steps=3), zoo)
    assert not _matches(folder, fcfg, dataclasses.replace(tcfg, lr=1e-3), zoo)
    assert not _matches(folder, dataclasses.replace(fcfg, d_model=8), tcfg, zoo)
    assert not _matches(folder, fcfg, tcfg, zoo.select(torch.arange(3)))  # another zoo
    assert not _matches(out / "flows" / "missing", fcfg, tcfg, zoo)


def test_cli_report_builds_the_config(monkeypatch, tmp_path, capsys):
    import metaflow_ws.experiments.report as report

    seen = {}

    def fake(cfg, *, command, log):
        seen["cfg"], seen["command"] = cfg, command
        return {"seconds": 1.0, "goals": []}

    monkeypatch.setattr(report, "run_report", fake)
    assert main(["report", "--task", "digits", "--quick", "--out", str(tmp_path), "--steps", "7", "--reuse",
                 "--no-ablation", "--json"]) == 0
    cfg = seen["cfg"]
    assert cfg.quick and cfg.steps == 7 and cfg.reuse and cfg.ablation is False and cfg.out_dir == tmp_path
    assert cfg.samples == ReportConfig.quick_budget("digits", tmp_path).samples
    assert seen["command"].startswith("metaflow-ws report --task digits --quick")
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path)
    assert main(["report", "--task", "mnist1d", "--out", str(tmp_path)]) == 0
    full = seen["cfg"]
    assert not full.quick and full.steps == 3000 and full.samples == 100 and full.coupling == "ot-perm"
    assert not full.compile and full.precision == "fp32"
    assert main(["report", "--task", "digits", "--out", str(tmp_path), "--coupling", "ot", "--compile",
                 "--precision", "bf16"]) == 0
    assert seen["cfg"].coupling == "ot" and seen["cfg"].compile and seen["cfg"].precision == "bf16"
    from metaflow_ws.flows.flow import SIGMA

    assert full.path_noise == SIGMA
    assert main(["report", "--task", "digits", "--out", str(tmp_path), "--path-noise", "0"]) == 0
    assert seen["cfg"].path_noise == 0.0
    # unset, the field size and lr come from the task's [flow] table (mnist1d: d=64 x 5, lr 5e-3) ...
    assert (full.d_model, full.num_layers, full.lr) == (64, 5, 5e-3)
    assert main(["report", "--task", "breast_cancer", "--out", str(tmp_path)]) == 0  # ... or the library's
    assert (seen["cfg"].d_model, seen["cfg"].num_layers, seen["cfg"].lr) == (32, 3, TrainConfig.lr)
    assert main(["report", "--task", "digits", "--out", str(tmp_path), "--lr", "2e-3", "--d-model", "48"]) == 0
    assert (seen["cfg"].d_model, seen["cfg"].num_layers, seen["cfg"].lr) == (48, 5, 2e-3)  # flags win
    assert (cfg.d_model, cfg.num_layers, cfg.lr) == (16, 2, 5e-3)  # --quick: tiny field, the task's lr
    from metaflow_ws.flows import SampleConfig

    assert full.rho == SampleConfig.rho  # unset: the sampler's default time grid
    assert main(["report", "--task", "digits", "--out", str(tmp_path), "--rho", "2.5"]) == 0
    assert seen["cfg"].rho == 2.5


def test_report_errors(tmp_path, monkeypatch, capsys):
    assert main(["report", "--task", "sinusoid", "--out", str(tmp_path)]) == 2
    assert "classification tasks" in capsys.readouterr().err
    assert main(["report", "--task", "no_such_task", "--out", str(tmp_path)]) == 2
    monkeypatch.setitem(sys.modules, "metaflow_ws.experiments.gaussian_toy", None)  # import fails
    assert main(["report", "--task", "gaussian_toy", "--quick", "--out", str(tmp_path)]) == 2
    assert "gaussian_toy reproduction is not available" in capsys.readouterr().err
    with pytest.raises(ValueError, match="samples"):
        ReportConfig(task="digits", out_dir=tmp_path, samples=1)
    with pytest.raises(ValueError, match="unknown coupling 'sinkhorn'"):
        ReportConfig(task="digits", out_dir=tmp_path, coupling="sinkhorn")
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="path_noise must be a finite number ≥ 0"):
            ReportConfig(task="digits", out_dir=tmp_path, path_noise=bad)
    assert main(["report", "--task", "digits", "--out", str(tmp_path), "--path-noise", "-1"]) == 2
    assert "path_noise must be a finite number" in capsys.readouterr().err
    assert main(["report", "--task", "digits", "--out", str(tmp_path), "--rho", "0"]) == 2
    assert "rho (time-grid exponent) must be a finite number > 0" in capsys.readouterr().err
    for bad in ("0", "-1e-3", "nan", "inf"):
        with pytest.raises(SystemExit) as e:  # a usage error of the flag, before anything runs
            main(["report", "--task", "digits", "--out", str(tmp_path), f"--lr={bad}"])
        assert e.value.code == 2 and "argument --lr: lr must be a finite number > 0" in capsys.readouterr().err


def test_gaussian_toy_delegates(tmp_path, monkeypatch):
    """The report writes what run_gaussian_toy returns (its section, figures and results)."""
    import types

    fig = tmp_path / "toy.png"

    def fake(out_dir, *, quick, seed=0, device=None):
        fig.write_bytes(PNG)
        return {"markdown": "## Toy section\n\nvariance table", "figures": [fig], "results": {"x": 1}}

    monkeypatch.setitem(sys.modules, "metaflow_ws.experiments.gaussian_toy",
                        types.SimpleNamespace(run_gaussian_toy=fake))
    res = run_report(ReportConfig.quick_budget("gaussian_toy", tmp_path))
    text = (tmp_path / "README.md").read_text()
    assert "## Toy section" in text and "![toy](toy.png)" in text and "not** the real results" in text
    assert res["results"] == {"x": 1}
    assert json.loads((tmp_path / "results.json").read_text())["figures"] == ["toy.png"]


def test_noise_baseline_matched_accuracy(tiny_bc_zoo):
    from metaflow_ws.evaluation import batch_metrics
    from metaflow_ws.tasks import get_task

    x, y = get_task("breast_cancer").data(0).split("test")
    fin_acc = float(batch_metrics(tiny_bc_zoo.spec, tiny_bc_zoo.final().params, x, y, "classification")
                    ["accuracy"].mean())
    target = fin_acc - 0.1
    nb = noise_baseline_matched_accuracy(tiny_bc_zoo, x, y, target, generator=torch.Generator().manual_seed(0),
                                         num_samples=12, atol=5e-3)
    acc = float(batch_metrics(tiny_bc_zoo.spec, nb.params, x, y, "classification")["accuracy"].mean())
    assert nb.info["converged"] and abs(acc - target) <= 5e-3 and nb.info["sigma"] > 1e-4
    assert len(nb) == 12
    # a target better than the trained networks cannot be matched: smallest noise, flagged
    hi = noise_baseline_matched_accuracy(tiny_bc_zoo, x, y, 1.01, generator=torch.Generator().manual_seed(0))
    assert not hi.info["converged"] and hi.info["sigma"] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="kind"):
        noise_baseline_matched_accuracy(tiny_bc_zoo, x, y, 0.5, generator=torch.Generator(), kind="bogus")


@pytest.mark.slow
def test_quick_report_cli_end_to_end(tmp_path):
    """The real `--quick` budget through the CLI (a few minutes on one core)."""
    assert main(["report", "--task", "breast_cancer", "--quick", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["quick"] and len(saved["table_4_1"]) == 12  # three flows × four alignment / coupling columns
    assert all((tmp_path / p).is_file() for p in saved["figures"].values())
