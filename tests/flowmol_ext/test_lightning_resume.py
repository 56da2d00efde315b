"""Pretraining reliability: exact resume (data order, priors, step randomness), fallback from a
corrupt last.ckpt, no stale best checkpoints, no duplicated log rows, config checks before any
output, and SIGTERM/SIGINT exit codes with a checkpoint."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from flowmol_ext.config import ConfigError, validate_config
from flowmol_ext.data.qm9 import process_qm9
from flowmol_ext.lightning import PretrainConfig, check_pretrain_config, pretrain
from flowmol_ext.pretrained import load_model_dir
from tests.conftest import QM9_SAMPLE_DIR
from tests.flowmol_ext.test_lightning import TINY

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qm9")
    process_qm9(source="csv", path=QM9_SAMPLE_DIR / "qm9_sample.csv", data_dir=d, cache_dir=d / "cache", workers=1,
                progress=False)
    return d


def _cfg_dict(data_dir: Path, run_dir: Path, max_steps: int, **train: object) -> dict:
    # 226 training molecules in batches of 64: 4 batches per epoch, so resumes land mid-epoch
    return {
        "model": TINY,
        "data": {"data_dir": str(data_dir), "batch_size": 64, "num_workers": 0, "max_val_molecules": 32},
        "optim": {"ema_decay": 0.9},
        "train": {"run_dir": str(run_dir), "max_steps": max_steps, "checkpoint_every_n_steps": 3,
                  "val_every_n_steps": 3, "limit_val_batches": 1, "accelerator": "cpu", "num_threads": 1,
                  "log_every_n_steps": 1, **train},
    }


def _cfg(*args: object, **kw: object) -> PretrainConfig:
    return validate_config(PretrainConfig, _cfg_dict(*args, **kw))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def _train_steps(run: Path, column: str = "train/loss") -> list[int]:
    """Logged steps with a value in ``column``, over every log version of the run."""
    steps = []
    for metrics in sorted((run / "logs").glob("v*/metrics.csv")):
        with open(metrics) as fh:
            steps += [int(r["step"]) for r in csv.DictReader(fh) if r.get(column)]
    return steps


@pytest.mark.parametrize(("workers", "every"), [(0, 3), (1, 3), (1, 4)])
def test_resume_after_a_kill_with_a_truncated_last_ckpt_equals_the_uninterrupted_run(
        data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, workers: int, every: int) -> None:
    # every=3: the surviving step checkpoint (6) is mid-epoch; every=4: at an epoch boundary (4 of 4 batches)
    def cfg(run: Path, steps: int) -> PretrainConfig:
        d = _cfg_dict(data_dir, run, steps, checkpoint_every_n_steps=every)
        d["data"]["num_workers"] = workers  # worker processes start the epoch's iterator early
        return validate_config(PretrainConfig, d)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    pretrain(cfg(straight, 10))
    killed_at = 8 if every == 3 else 7
    pretrain(cfg(killed, killed_at))  # a run that got further than its step checkpoint ...
    ckpts = killed / "checkpoints"
    survivor = f"step{killed_at // every * every:07d}.ckpt"
    assert (ckpts / survivor).is_file()
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])  # ... and died writing last.ckpt (full disk)
    shutil.copy(next(ckpts.glob("best-*.ckpt")), ckpts / "best-step0000008-val0.0001.ckpt")  # a best of lost steps
    with caplog.at_level(logging.WARNING):
        pretrain(cfg(killed, 10), resume=True)
    assert any(survivor in r.getMessage() and "last.ckpt" in r.getMessage() for r in caplog.records)
    assert (ckpts / "last.ckpt.corrupt").is_file()  # set aside, named in the log, not overwritten blindly
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst == 0.0, f"resumed weights differ by up to {worst}"  # bit-identical on CPU
    assert load_model_dir(killed / "model_last").metadata["global_step"] == 10
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == sorted(
        p.name for p in (straight / "checkpoints").glob("*.ckpt"))  # one best, one step checkpoint, last
    steps = _train_steps(killed)
    assert len(steps) == len(set(steps)) and sorted(steps) == sorted(_train_steps(straight))
    assert sorted(_train_steps(killed, "val/loss")) == sorted(_train_steps(straight, "val/loss"))


@pytest.mark.parametrize(("section", "key", "value"), [
    ("train", "accelerator", "tpu"), ("train", "max_time", "banana"), ("train", "max_steps", -5),
    ("data", "batch_size", 0), ("optim", "lr", -0.1), ("data", "num_workers", -1),
])
def test_bad_values_are_rejected_at_load_naming_the_key(data_dir: Path, tmp_path: Path, section: str, key: str,
                                                        value: object) -> None:
    d = _cfg_dict(data_dir, tmp_path / "run", 3)
    d[section][key] = value
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        validate_config(PretrainConfig, d)


def test_gpu_without_gpu_and_read_only_run_dir_fail_before_any_output(data_dir: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.accelerator"):
            pretrain(_cfg(data_dir, tmp_path / "run", 3, accelerator="gpu"))
        assert not (tmp_path / "run").exists()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        # root ignores permission bits: use a folder of a read-only file system then
        target = ro / "run" if not os.access(ro, os.W_OK) else Path("/proc/fdc_mol_run")
        with pytest.raises(ValueError, match="train.run_dir: cannot write"):
            check_pretrain_config(_cfg(data_dir, target, 3))
    finally:
        ro.chmod(0o755)


def _cli_pretrain(cfg_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fdc_mol.cli", "pretrain", "-c", str(cfg_path), *extra],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group (killpg reaches only the run)


@pytest.mark.parametrize(("sig", "code", "workers"), [(signal.SIGTERM, 143, 0), (signal.SIGINT, 130, 0),
                                                     (signal.SIGTERM, 143, 1)])
def test_signal_exits_128_plus_signum_after_saving_a_checkpoint(data_dir: Path, tmp_path: Path, sig: int,
                                                                code: int, workers: int) -> None:
    run = tmp_path / "run"
    cfg = _cfg_dict(data_dir, run, 100_000, checkpoint_every_n_steps=2, val_every_n_steps=1000)
    cfg["data"]["num_workers"] = workers
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = _cli_pretrain(tmp_path / "c.yaml")
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "step0000002.ckpt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    if workers:  # as SLURM / Ctrl-C do: the whole process group, DataLoader workers included
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert signal.Signals(sig).name in err.strip().splitlines()[-1]
    step = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert step >= 2
    # the interrupted run resumes and continues where it stopped
    resumed = subprocess.run([sys.executable, "-m", "fdc_mol.cli", "pretrain", "--resume", str(run), "--max-steps",
                              str(step + 2)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert load_model_dir(run / "model_last").metadata["global_step"] == step + 2
    # ... and equals a run that was never interrupted (bit for bit on CPU)
    straight = tmp_path / "straight"
    straight_cfg = _cfg_dict(data_dir, straight, step + 2, checkpoint_every_n_steps=2, val_every_n_steps=1000)
    straight_cfg["data"]["num_workers"] = workers
    pretrain(validate_config(PretrainConfig, straight_cfg))
    a, b = _weights(straight), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    ma, mb = load_model_dir(straight / "model_last").state_dict(), load_model_dir(run / "model_last").state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)  # the final (EMA) weights at step + 2


def test_resume_through_another_spelling_of_the_run_dir(data_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from fdc_mol.cli import main

    run = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_cfg_dict(data_dir, run, 3)))
    assert main(["pretrain", "-c", str(tmp_path / "c.yaml")]) == 0
    saved = (run / "config.yaml").read_text()
    (tmp_path / "link").symlink_to(run)
    assert main(["pretrain", "--resume", str(tmp_path / "link"), "--max-steps", "5"]) == 0, capsys.readouterr().err
    assert load_model_dir(run / "model_last").metadata["global_step"] == 5
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["run_dir"] == str(run)
    assert yaml.safe_load(saved)["train"]["max_steps"] == 3


def test_full_disk_while_checkpointing_keeps_the_previous_last_ckpt(data_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import flowmol_ext.io_utils as io_utils

    real_save = torch.save
    calls = {"last": 0}

    def save(obj: object, path: object) -> None:  # the disk fills up during the 2nd write of last.ckpt
        if ".last.ckpt." in str(path):
            calls["last"] += 1
            if calls["last"] == 2:
                Path(path).write_bytes(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(io_utils.torch, "save", save)
    run = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        pretrain(_cfg(data_dir, run, 9, val_every_n_steps=1000))
    monkeypatch.setattr(io_utils.torch, "save", real_save)
    ckpts = run / "checkpoints"
    assert not list(ckpts.glob(".*.tmp"))  # no temporary file left
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
    pretrain(_cfg(data_dir, run, 6, val_every_n_steps=1000), resume=True)  # and the run resumes from it
    assert load_model_dir(run / "model_last").metadata["global_step"] == 6
