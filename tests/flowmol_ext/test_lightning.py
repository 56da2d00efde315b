"""Pretraining: a Lightning run on the processed sample, its model directory, resume, init_from."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flowmol_ext.config import validate_config
from flowmol_ext.data.qm9 import process_qm9
from flowmol_ext.lightning import PretrainConfig, pretrain
from flowmol_ext.pretrained import load_model_dir
from tests.conftest import QM9_SAMPLE_DIR

TINY = {"n_hidden_scalars": 32, "n_vec_channels": 4, "n_hidden_edge_feats": 16, "n_molecule_updates": 2,
        "rbf_dim": 8, "n_cp_feats": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qm9")
    process_qm9(source="csv", path=QM9_SAMPLE_DIR / "qm9_sample.csv", data_dir=d, cache_dir=d / "cache", workers=1,
                progress=False)
    return d


def _cfg(data_dir: Path, run_dir: Path, max_steps: int, **train: object) -> PretrainConfig:
    return validate_config(PretrainConfig, {
        "model": TINY,
        "data": {"data_dir": str(data_dir), "batch_size": 16, "num_workers": 0, "max_val_molecules": 32},
        "train": {"run_dir": str(run_dir), "max_steps": max_steps, "checkpoint_every_n_steps": 3,
                  "val_every_n_steps": 3, "limit_val_batches": 1, "accelerator": "cpu", "num_threads": 1,
                  "log_every_n_steps": 1, **train},
    })


def test_pretrain_writes_a_loadable_model_and_resumes(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    pretrain(_cfg(data_dir, run, 4))
    model = load_model_dir(run / "model_last")
    assert model.metadata["global_step"] == 4
    assert sum(model.metadata["n_atoms_hist"]) == 226  # the sample's train split
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "logs" / "v0" / "metrics.csv").is_file()
    with pytest.raises(ValueError, match="--resume"):
        pretrain(_cfg(data_dir, run, 4))  # never silently overwrite a run
    pretrain(_cfg(data_dir, run, 7), resume=True)
    resumed = load_model_dir(run / "model_last")
    assert resumed.metadata["global_step"] == 7
    assert (run / "logs" / "v1" / "metrics.csv").is_file()  # each resumed session logs separately
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))


def test_init_from_copies_weights_and_rejects_another_architecture(data_dir: Path, tmp_path: Path) -> None:
    pretrain(_cfg(data_dir, tmp_path / "a", 2))
    src = load_model_dir(tmp_path / "a" / "model_last")
    pretrain(_cfg(data_dir, tmp_path / "b", 0, init_from=str(tmp_path / "a" / "model_last"), max_epochs=0))
    copied = load_model_dir(tmp_path / "b" / "model_last")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), copied.state_dict().values()))
    # training-only settings (loss weights, train-time distortion) may differ from the source's
    distorted = _cfg(data_dir, tmp_path / "d", 0, init_from=str(tmp_path / "a" / "model_last"), max_epochs=0)
    distorted.model.distortion.p = 0.2
    distorted.model.loss_weights.x = 2.0
    pretrain(distorted)
    assert load_model_dir(tmp_path / "d" / "model_last").cfg.distortion.p == 0.2
    with pytest.raises(ValueError, match="different model config"):
        pretrain(_cfg(data_dir, tmp_path / "c", 1, init_from="qm9_small"))


def test_ema_update_is_the_ramped_lerp() -> None:
    from flowmol_ext.lightning import FlowMolModule

    cfg = validate_config(PretrainConfig, {"model": TINY, "optim": {"ema_decay": 0.999}})
    module = FlowMolModule(cfg)
    with torch.no_grad():
        for p in module.model.parameters():
            p.fill_(1.0)
        for p in module.ema.parameters():
            p.fill_(0.0)
    module.update_ema()  # no trainer: step n = 0, decay min(0.999, 1/10) = 0.1
    assert all(torch.allclose(p, torch.full_like(p, 0.9)) for p in module.ema.parameters())
    module.update_ema()  # 0.9 + 0.9 * (1 - 0.9)
    assert all(torch.allclose(p, torch.full_like(p, 0.99)) for p in module.ema.parameters())
    assert all(not p.requires_grad for p in module.ema.parameters())
    with pytest.raises(ValueError, match="ema_decay"):
        FlowMolModule(validate_config(PretrainConfig, {"model": TINY, "optim": {"ema_decay": 1.0}}))


def test_train_compile_flag_reaches_the_network_and_its_ema_copy() -> None:
    """train.compile puts the network (and the EMA copy that validation samples with) under torch.compile on the
    first forward; the default stays eager, and the checkpointed state is the same either way."""
    from flowmol_ext.lightning import FlowMolModule

    on = FlowMolModule(validate_config(PretrainConfig, {"model": TINY, "optim": {"ema_decay": 0.999},
                                                        "train": {"compile": True}}))
    off = FlowMolModule(validate_config(PretrainConfig, {"model": TINY}))
    assert on.model.vector_field.compiled and on.ema.vector_field.compiled
    assert not off.model.vector_field.compiled
    assert on.model.state_dict().keys() == off.model.state_dict().keys()
    with pytest.raises(ValueError, match="compile"):
        validate_config(PretrainConfig, {"model": TINY, "train": {"compile": "yes please"}})


def test_cosine_decay_schedule_drives_the_optimiser_learning_rate() -> None:
    """Warm-up 2 then cosine over 4 steps to 0.1: lr(s)/lr = (s+1)/2 for s < 2, then
    0.1 + 0.9 (1 + cos(pi (s-2)/4)) / 2, i.e. 1, 0.8682, 0.55, 0.2318, 0.1, 0.1, ..."""
    from flowmol_ext.lightning import FlowMolModule

    cfg = validate_config(PretrainConfig, {"model": TINY, "optim": {"lr": 1e-3, "warmup_steps": 2,
                                                                      "decay_steps": 4, "final_lr_frac": 0.1}})
    out = FlowMolModule(cfg).configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(9):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cos = [1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * k / 4)) / 2) for k in range(5)]
    expected = [5e-4, 1e-3, *cos, 1e-4, 1e-4]
    assert seen == pytest.approx(expected, rel=1e-9)
    assert cos[1:4] == pytest.approx([8.6820e-4, 5.5e-4, 2.3180e-4], rel=1e-4)
    # Without warm-up or decay the optimiser keeps a constant rate (no scheduler).
    plain = FlowMolModule(validate_config(PretrainConfig, {"model": TINY})).configure_optimizers()
    assert isinstance(plain, torch.optim.Adam)
    with pytest.raises(ValueError, match="final_lr_frac"):
        validate_config(PretrainConfig, {"model": TINY, "optim": {"final_lr_frac": 1.5}})


def test_ema_run_exports_the_average_and_resumes(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "ema"
    cfg = _cfg(data_dir, run, 3).model_copy(deep=True)  # a checkpoint at step 3
    cfg.optim.ema_decay = 0.9
    pretrain(cfg)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    exported = load_model_dir(run / "model_last").state_dict()
    for k, v in exported.items():
        assert torch.equal(v, ckpt[f"ema.{k}"])  # the model directory holds the EMA weights ...
    assert any(not torch.equal(v, ckpt[f"model.{k}"]) for k, v in exported.items())  # ... not the raw ones
    cfg7 = cfg.model_copy(deep=True)
    cfg7.train.max_steps = 6
    pretrain(cfg7, resume=True)
    assert load_model_dir(run / "model_last").metadata["global_step"] == 6
