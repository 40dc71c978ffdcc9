import json

import pytest
import torch
from safetensors.torch import save_file

from metaflow_ws.io import Zoo, ZooFormatError
from metaflow_ws.nets import NetworkSpec


def test_round_trip_and_metadata(tiny_bc_zoo, tmp_path):
    path = tiny_bc_zoo.save(tmp_path / "z.safetensors")
    z = Zoo.load(path)
    assert z.task == "breast_cancer" and z.spec == tiny_bc_zoo.spec and len(z) == len(tiny_bc_zoo)
    assert torch.equal(z.flat(), tiny_bc_zoo.flat())
    assert torch.equal(z.run_id, tiny_bc_zoo.run_id) and torch.equal(z.step, tiny_bc_zoo.step)
    assert z.recipe["optimizer"] == "adam" and z.seeds["seed"] == 0
    for k in tiny_bc_zoo.metrics:
        assert torch.allclose(z.metrics[k], tiny_bc_zoo.metrics[k])
    assert [p.name for p in tmp_path.iterdir()] == ["z.safetensors"]  # no temp files left behind


def test_networks_load_into_modules(tiny_bc_zoo):
    x = torch.randn(7, 30)
    out = tiny_bc_zoo.spec.batched_forward(tiny_bc_zoo.params, x)
    m = tiny_bc_zoo.module(3)
    assert torch.allclose(m(x), out[3], atol=1e-6)


def test_truncated_and_corrupt_files(tiny_bc_zoo, tmp_path):
    raw = tiny_bc_zoo.save(tmp_path / "z.safetensors").read_bytes()
    for name, data in {"trunc": raw[: len(raw) // 2], "tiny": raw[:5], "junk": b"\x00" * 64}.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(ZooFormatError, match="corrupt or truncated"):
            Zoo.load(p)
    with pytest.raises(FileNotFoundError, match="metaflow-ws zoo"):
        Zoo.load(tmp_path / "missing.safetensors")


def test_wrong_architecture_and_missing_keys(tiny_bc_zoo, tmp_path):
    p = tiny_bc_zoo.save(tmp_path / "z.safetensors")
    with pytest.raises(ZooFormatError, match="MLP 30-16-16-2 .* but MLP 64-10-10"):
        Zoo.load(p, spec=NetworkSpec((64, 10, 10)))
    tensors = {f"params.{k}": v.contiguous() for k, v in tiny_bc_zoo.params.items() if k != "layers.2.bias"}
    tensors |= {"run_id": tiny_bc_zoo.run_id, "step": tiny_bc_zoo.step}
    meta = {"format": "metaflow_ws.zoo", "spec": json.dumps(tiny_bc_zoo.spec.to_dict())}
    save_file(tensors, tmp_path / "m.safetensors", metadata=meta)
    with pytest.raises(ZooFormatError, match="missing \\['layers.2.bias'\\]"):
        Zoo.load(tmp_path / "m.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ZooFormatError, match="not a metaflow_ws zoo"):
        Zoo.load(tmp_path / "other.safetensors")


def test_nan_weights_are_rejected(tiny_bc_zoo, tmp_path):
    flat = tiny_bc_zoo.flat().clone()
    flat[1, 5] = float("nan")
    z = Zoo.from_flat("breast_cancer", tiny_bc_zoo.spec, flat)
    z.save(tmp_path / "nan.safetensors")
    with pytest.raises(ZooFormatError, match="NaN"):
        Zoo.load(tmp_path / "nan.safetensors")


def test_final_and_select(tiny_bc_zoo):
    fin = tiny_bc_zoo.final()
    assert len(fin) == 6 and fin.run_id.tolist() == list(range(6))
    assert bool((fin.step == tiny_bc_zoo.step.max()).all())
