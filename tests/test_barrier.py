"""Loss barriers: exact endpoints, zero self-barrier, alignment lowers the barrier, the `barrier` CLI."""

import json

import pytest
import torch

from metaflow_ws.cli import main
from metaflow_ws.evaluation import batch_metrics
from metaflow_ws.symmetry import (
    apply_permutation,
    loss_barrier,
    random_pairs,
    random_permutation,
    weight_matching,
    zoo_barrier,
)
from metaflow_ws.tasks import get_task
from metaflow_ws.train.losses import prediction_loss


@pytest.fixture(scope="module")
def bc_zoo():
    """breast_cancer, 8 runs × 15 epochs (≈ 1–2 s): trained far enough to show a clear barrier."""
    from metaflow_ws.train import train_population

    return train_population("breast_cancer", 8, epochs=15, seed=4)


def pair_params(zoo, i, j, dtype=torch.float64):
    fin = zoo.final()
    return ({n: t[i : i + 1].to(dtype) for n, t in fin.params.items()},
            {n: t[j : j + 1].to(dtype) for n, t in fin.params.items()})


def test_endpoints_and_midpoint_match_direct_evaluation(bc_zoo):
    task = get_task("breast_cancer")
    fin = bc_zoo.final()
    a = {n: t[:4] for n, t in fin.params.items()}
    b = {n: t[4:8] for n, t in fin.params.items()}
    res = loss_barrier(task, a, b, grid=5, chunk=7)  # a chunk smaller than one pair's grid still works
    assert res.losses.shape == (4, 5) and res.alphas.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    x, y = task.data(0).split("test")
    torch.testing.assert_close(res.loss_a, batch_metrics(task.spec, a, x, y, task.kind)["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.loss_b, batch_metrics(task.spec, b, x, y, task.kind)["loss"], rtol=1e-5, atol=1e-6)
    for p in range(4):  # vmapped path == loop of single forward passes
        mid = {n: 0.5 * a[n][p] + 0.5 * b[n][p] for n in a}
        want = prediction_loss(task.spec.forward(mid, x), y, task.kind)
        assert float(res.midpoint_loss[p]) == pytest.approx(float(want), rel=1e-5)
        assert float(res.losses[p, 2]) == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(res.barrier, res.midpoint_loss - (res.loss_a + res.loss_b) / 2)
    assert (res.max_barrier >= res.barrier - 1e-6).all() and (res.max_barrier >= 0).all()


def test_barrier_of_a_network_with_itself_is_zero(bc_zoo):
    a, _ = pair_params(bc_zoo, 0, 1)
    res = loss_barrier("breast_cancer", a, a)
    assert res.barrier.abs().max() < 1e-12 and res.max_barrier.abs().max() < 1e-12
    # ... and with a permuted copy of itself too, once aligned (but not before)
    perm = random_permutation(bc_zoo.spec, 1, torch.Generator().manual_seed(0))
    b = apply_permutation(bc_zoo.spec, a, perm)
    assert float(loss_barrier("breast_cancer", a, b).barrier[0]) > 1e-3
    aligned = weight_matching(bc_zoo.spec, b, a).params
    assert float(loss_barrier("breast_cancer", a, aligned).barrier[0]) == pytest.approx(0.0, abs=1e-12)


def test_unbatched_pair_and_errors(bc_zoo):
    a, b = pair_params(bc_zoo, 0, 1)
    one = loss_barrier("breast_cancer", {n: t[0] for n, t in a.items()}, {n: t[0] for n, t in b.items()})
    assert one.barrier.shape == (1,)
    with pytest.raises(ValueError, match="grid must hold at least 2"):
        loss_barrier("breast_cancer", a, b, grid=1)
    with pytest.raises(ValueError, match="same number of networks; got 1 and 2"):
        loss_barrier("breast_cancer", a, {n: torch.cat([t, t]) for n, t in b.items()})
    with pytest.raises(ValueError, match="params_a do not fit task 'digits'"):
        loss_barrier("digits", a, b)
    with pytest.raises(ValueError, match="synthetic"):
        loss_barrier("gaussian_toy", a, b)
    bad = {n: t.clone() for n, t in b.items()}
    bad["layers.0.bias"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="params_b contain NaN"):
        loss_barrier("breast_cancer", a, bad)
    with pytest.raises(ValueError, match="unknown split"):
        loss_barrier("breast_cancer", a, b, split="dev")


@pytest.mark.parametrize("method", ["weight", "activation"])
@pytest.mark.parametrize("align_to", ["pair", "reference"])
def test_alignment_lowers_the_barrier_of_a_trained_zoo(bc_zoo, method, align_to):
    raw = zoo_barrier(bc_zoo, pairs=20, generator=torch.Generator().manual_seed(1))
    aligned = zoo_barrier(bc_zoo, pairs=20, align=method, align_to=align_to,
                          generator=torch.Generator().manual_seed(1))
    assert torch.equal(raw.run_pairs, aligned.run_pairs)
    torch.testing.assert_close(aligned.result.loss_a, raw.result.loss_a)  # same endpoint functions
    torch.testing.assert_close(aligned.result.loss_b, raw.result.loss_b)
    r, s = raw.result.summary(), aligned.result.summary()
    assert r["barrier_mean"] > 0.02
    assert s["barrier_mean"] < 0.5 * r["barrier_mean"] and s["max_barrier_mean"] < 0.5 * r["max_barrier_mean"]


def test_random_pairs():
    pairs = random_pairs(10, 45, torch.Generator().manual_seed(0))
    assert pairs.shape == (45, 2) and (pairs[:, 0] != pairs[:, 1]).all()
    assert pairs.min() >= 0 and pairs.max() <= 9
    assert pairs.sort(1).values.unique(dim=0).shape[0] == 45  # every unordered pair exactly once
    assert torch.equal(random_pairs(10, 7, torch.Generator().manual_seed(3)),
                       random_pairs(10, 7, torch.Generator().manual_seed(3)))
    big = random_pairs(10_000, 50, torch.Generator().manual_seed(0))  # no n² table
    assert (big[:, 0] != big[:, 1]).all() and big.max() < 10_000
    with pytest.raises(ValueError, match=r"\[1, 45\]"):
        random_pairs(10, 46)
    with pytest.raises(ValueError, match="at least 2"):
        random_pairs(1, 1)


# ----------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def zoo_file(bc_zoo, tmp_path_factory):
    path = tmp_path_factory.mktemp("barrier") / "bc.safetensors"
    bc_zoo.save(path)
    return path


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_barrier_json(capsys, zoo_file):
    raw = run_json(capsys, ["barrier", "--zoo", str(zoo_file), "--pairs", "10", "--json"])
    for key in ("barrier_mean", "barrier_std", "max_barrier_mean", "max_barrier_std", "midpoint_loss_mean",
                "pairs", "aligned", "seconds", "task"):
        assert key in raw
    assert raw["pairs"] == 10 and raw["aligned"] is False and raw["task"] == "breast_cancer"
    al = run_json(capsys, ["barrier", "--zoo", str(zoo_file), "--pairs", "10", "--align", "--method", "activation",
                           "--task", "breast_cancer", "--json"])
    assert al["aligned"] is True and al["method"] == "activation" and al["barrier_mean"] < raw["barrier_mean"]
    default = run_json(capsys, ["barrier", "--zoo", str(zoo_file), "--json", "--align-to", "reference", "--align"])
    assert default["pairs"] == 28  # all pairs of 8 runs when fewer than 100
    assert main(["barrier", "--zoo", str(zoo_file), "--pairs", "3"]) == 0
    assert "barrier" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "does not exist"),
        (["--pairs", "29"], "[1, 28]"),
        (["--task", "digits"], "64-10-10"),
        (["--task", "no_such_task"], "unknown task"),
    ],
)
def test_cli_barrier_errors_exit_2(capsys, zoo_file, tmp_path, extra, message):
    path = str(tmp_path / "missing.safetensors") if not extra else str(zoo_file)
    assert main(["barrier", "--zoo", path, *extra]) == 2
    assert message in capsys.readouterr().err
