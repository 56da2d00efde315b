"""Official FlowMol v2.0 checkpoint import (key mapping) and our model directories."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import yaml

import flowmol_ext
from flowmol_ext.config import ConfigError
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol
from flowmol_ext.pretrained import (
    QM9_TRAIN_N_ATOMS_HIST,
    REGISTRY,
    is_model_dir,
    load_model_dir,
    load_official_checkpoint,
    load_pretrained,
    map_official_state_dict,
    save_model_dir,
)
from tests.conftest import FLOWMOL_FIXTURES
from tests.flowmol_ext.model._fixtures import fixture_graph, tiny, tiny_model


def _shapes_json() -> dict:
    return json.loads((FLOWMOL_FIXTURES / "qm9_ctmc_state_dict_shapes.json").read_text())


def _official_hparams(js: dict) -> dict:
    hp = json.loads(json.dumps(js["hyper_parameters"]))
    for k in ("n_atoms_hist_file", "marginal_dists_file"):  # pickled as pathlib.PosixPath by Lightning
        hp[k] = pathlib.PosixPath(hp[k])
    return hp


def test_full_config_maps_every_key_one_to_one() -> None:
    js = _shapes_json()
    fake = {e["key"]: torch.zeros(e["shape"]) for e in js["state_dict"]}
    assert len(fake) == js["n_keys"] == 612
    mapped = map_official_state_dict(fake)
    cfg = ModelConfig.from_official(js["hyper_parameters"])
    assert cfg == ModelConfig.from_official(js["config_yaml"]) == ModelConfig.paper()
    model = FlowMol(cfg)
    own = model.state_dict()
    assert list(mapped) == list(own)  # same keys, same order, identity names
    assert all(tuple(own[k].shape) == tuple(v.shape) for k, v in mapped.items())
    assert set(fake) - set(mapped) == {f"vector_field.conv_layers.{i}.dropout.vector_dropout.dummy_param"
                                       for i in range(8)}
    assert model.n_parameters() == js["n_params_total"] == 6_754_432
    counts = {m: sum(p.numel() for k, p in model.named_parameters() if k.startswith(m + "."))
              for m in js["param_counts_by_module"]}
    assert counts == js["param_counts_by_module"]


def test_load_fake_full_checkpoint(tmp_path: pathlib.Path) -> None:
    js = _shapes_json()
    sd = {e["key"]: torch.full(e["shape"], 0.5) for e in js["state_dict"]}
    run = tmp_path / "qm9_ctmc"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = {"epoch": 3, "global_step": 99, "state_dict": sd, "hparams_name": "kwargs",
            "hyper_parameters": _official_hparams(js)}
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text(yaml.safe_dump(js["config_yaml"]))
    for target in (run, run / "checkpoints" / "last.ckpt"):
        model = load_pretrained(str(target))
        assert model.n_parameters() == 6_754_432 and model.cfg.n_bond_types == 5
        assert all(bool((p == 0.5).all()) for p in model.parameters())
        assert model.metadata["stochasticity"] == 10.0 and model.metadata["global_step"] == 99
        assert model.metadata["n_atoms_hist"] == QM9_TRAIN_N_ATOMS_HIST
    # a wrong key is named in the error
    sd.pop("vector_field.to_edge_logits.2.bias")
    sd["vector_field.extra.weight"] = torch.zeros(2)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"missing keys: vector_field\.to_edge_logits\.2\.bias.*unexpected keys: "
                                         r"vector_field\.extra\.weight"):
        load_official_checkpoint(tmp_path / "bad.ckpt")


def test_official_tiny_run_dir_reproduces_fixture(tmp_path: pathlib.Path) -> None:
    fx = tiny()
    run = tmp_path / "tiny_run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": fx["state_dict"]}, run / "checkpoints" / "last.ckpt")  # no hparams: config.yaml
    (run / "config.yaml").write_text(yaml.safe_dump(fx["config"]))
    model = flowmol_ext.load_pretrained(run)
    g = fixture_graph(fx)
    with torch.no_grad():
        out = model.predict(fx["x_t"], fx["a_t"].argmax(-1), fx["c_t"].argmax(-1), fx["e_t"].argmax(-1), fx["t"], g)
    torch.testing.assert_close(out.x1, fx["out_x"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.e, fx["out_e_logits"], atol=1e-5, rtol=1e-5)


def test_model_dir_roundtrip(tmp_path: pathlib.Path) -> None:
    fx = tiny()
    model = tiny_model(fx)
    model.metadata = {"n_atoms_hist": torch.tensor([0, 0, 3, 5])}
    d = save_model_dir(model, tmp_path / "m", extra={"dataset_stats": pathlib.Path("data/qm9/stats.json")})
    assert is_model_dir(d) and not list(d.glob(".*.tmp"))
    loaded = load_pretrained(d)
    assert loaded.cfg == model.cfg and not loaded.training
    assert loaded.metadata == {"n_atoms_hist": [0, 0, 3, 5], "dataset_stats": "data/qm9/stats.json"}
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    # a config/weights mismatch names the offending keys
    doc = yaml.safe_load((d / "config.yaml").read_text())
    doc["model"]["n_hidden_scalars"] = 48
    (d / "config.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="shape mismatches: vector_field.scalar_embedding.0.weight"):
        load_model_dir(d)
    doc["model"]["n_hidden_scalarz"] = 48
    (d / "config.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="n_hidden_scalarz"):
        load_model_dir(d)


def test_registry_and_bad_paths(tmp_path: pathlib.Path) -> None:
    if not is_model_dir(REGISTRY["qm9_small"]):
        with pytest.raises(FileNotFoundError, match="not shipped in this checkout"):
            load_pretrained("qm9_small")
    with pytest.raises(ValueError, match="unknown model 'qm9_ctmc_xl'"):
        load_pretrained("qm9_ctmc_xl")
    with pytest.raises(ValueError, match="neither a model directory"):
        load_pretrained(tmp_path)


def test_default_name_points_at_the_newest_independent_coupling_phase() -> None:
    """``qm9_small`` moves forward as training phases ship; the other names stay fixed. The training history of
    every fixed name the default has superseded must be a prefix of the default's, so the default can never point
    at an older phase or at a model of another lineage. (``qm9_small_16000``, a later phase that measured no better,
    is not one of them.)"""
    if not is_model_dir(REGISTRY["qm9_small"]):
        pytest.skip("pretrained weights not shipped in this checkout")
    default = load_pretrained("qm9_small").metadata["history"]
    for name in ("qm9_small_indep800", "qm9_small_4900", "qm9_small_10000"):
        older = load_pretrained(name).metadata["history"]
        assert default[: len(older)] == older, name  # also fails when the default's history is the shorter


def test_from_official_rejects_unsupported() -> None:
    js = _shapes_json()
    hp = json.loads(json.dumps(js["hyper_parameters"]))
    hp["parameterization"] = "dirichlet"
    with pytest.raises(ConfigError, match="parameterization"):
        ModelConfig.from_official(hp)
    hp = json.loads(json.dumps(js["hyper_parameters"]))
    hp["vector_field_config"]["attention"] = True
    with pytest.raises(ConfigError, match="attention"):
        ModelConfig.from_official(hp)


def test_qm9_histogram_constant() -> None:
    assert sum(QM9_TRAIN_N_ATOMS_HIST) == 97_734 and QM9_TRAIN_N_ATOMS_HIST[28] == 0
    mean = sum(n * c for n, c in enumerate(QM9_TRAIN_N_ATOMS_HIST)) / 97_734
    assert abs(mean - 18.03) < 0.01
