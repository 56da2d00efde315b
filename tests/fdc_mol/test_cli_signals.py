"""The ``fdc-mol`` entry point never exits 0 on a signal: 128 + signum with a one-line message, also
for Lightning's own SIGTERM exit (a SystemExit without a code) as ``finetune`` training raises it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from fdc_mol.cli import main
from fdc_mol.commands import sample as sample_cmd


def _last_line(capsys: pytest.CaptureFixture) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_a_command_exits_128_plus_signum(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                       tmp_path: Path, sig: int, code: int) -> None:
    def busy(args: object) -> int:
        os.kill(os.getpid(), sig)
        time.sleep(10)  # interrupted by the handler long before this ends
        return 0

    monkeypatch.setattr(sample_cmd, "run", busy)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    t0 = time.monotonic()
    assert main(["sample", "-o", str(tmp_path / "m.sdf")]) == code
    assert time.monotonic() - t0 < 5
    assert signal.Signals(sig).name in _last_line(capsys)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored


def test_lightning_sigterm_exit_is_not_success(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                               tmp_path: Path) -> None:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    def lightning_stopped(args: object) -> int:
        raise SIGTERMException  # what Trainer.fit raises after SIGTERM: SystemExit(None), i.e. status 0

    monkeypatch.setattr(sample_cmd, "run", lightning_stopped)
    assert main(["sample", "-o", str(tmp_path / "m.sdf")]) == 143
    assert "SIGTERM" in _last_line(capsys)
