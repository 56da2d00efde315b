"""Every failure of the ``fdc-mol`` command is one line on stderr naming the option, key or file,
with a nonzero exit status, and is found before long work or any output."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from rdkit import Chem

from fdc_mol.cli import main
from flowmol_ext.pretrained import REGISTRY
from tests.conftest import QM9_SAMPLE_DIR
from tests.flowmol_ext.test_chem import embed


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if "fdc-mol" in ln and "error" in ln]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "http" not in lines[0] and "pydantic" not in lines[0], err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("argv", "needle"), [
    (["--steps", "-5"], "--steps"), (["--device", "tpu"], "--device"), (["-n", "0"], "--n-molecules"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_sample_bad_options(capsys: pytest.CaptureFixture, tmp_path: Path, argv: list[str], needle: str) -> None:
    code, out, err = _run(capsys, "sample", *argv, "-o", str(tmp_path / "m.sdf"))
    assert code == 2 and "wrote" not in out
    _one_line_error(err, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_sample_cuda_without_cuda(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = _run(capsys, "sample", "--device", "cuda", "-o", str(tmp_path / "m.sdf"))
    assert code == 2
    _one_line_error(err, "--device", "no CUDA")


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_model_weights_name_the_file(capsys: pytest.CaptureFixture, tmp_path: Path, damage: str) -> None:
    model = tmp_path / "model"
    shutil.copytree(REGISTRY["qm9_small"], model)
    weights = model / "model.pt"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 3], "empty": b"", "garbage": b"\x80\x04garbage" * 50}[damage])
    code, _, err = _run(capsys, "sample", "-m", str(model), "-n", "2", "--steps", "2", "--device", "cpu",
                        "-o", str(tmp_path / "m.sdf"))
    assert code == 2
    _one_line_error(err, str(weights))


def test_sample_read_only_output_is_refused_before_sampling(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        import os

        target = ro if not os.access(ro, os.W_OK) else Path("/proc")  # root ignores permission bits
        code, out, err = _run(capsys, "sample", "-m", "no-such-model", "-n", "2", "-o", str(target / "m.sdf"))
    finally:
        ro.chmod(0o755)
    assert code == 2 and "wrote" not in out
    _one_line_error(err, "-o/--output", "cannot write")  # not "unknown model": checked first


def _sdf_bytes() -> bytes:
    return "".join(Chem.MolToMolBlock(embed(s)) + "$$$$\n" for s in ("CCO", "CC=O", "C#N")).encode()


def test_evaluate_sniffs_gzip_by_content(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    plain_named_gz = tmp_path / "plain.sdf.gz"
    plain_named_gz.write_bytes(_sdf_bytes())
    gz_named_sdf = tmp_path / "packed.sdf"
    gz_named_sdf.write_bytes(gzip.compress(_sdf_bytes()))
    for path in (plain_named_gz, gz_named_sdf):
        code, out, err = _run(capsys, "evaluate", str(path))
        assert code == 0, err
        assert f"{path}: 3 records" in out and "unparsable:" not in out
    truncated = tmp_path / "cut.sdf.gz"
    truncated.write_bytes(gzip.compress(_sdf_bytes())[:-30])
    code, _, err = _run(capsys, "evaluate", str(truncated))
    assert code == 2
    _one_line_error(err, str(truncated), "truncated or corrupt gzip")


def test_evaluate_record_reasons_have_no_cpp_stack_trace(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    block = Chem.MolToMolBlock(embed("CO")).splitlines()
    block[4] = block[4].replace(" C ", " Xx")
    path = tmp_path / "bad.sdf"
    path.write_text("\n".join(block) + "\n$$$$\n" + Chem.MolToMolBlock(embed("CCO")) + "$$$$\n")
    code, out, _ = _run(capsys, "evaluate", str(path))
    assert code == 0
    (line,) = [ln for ln in out.splitlines() if ln.startswith("unparsable")]
    assert "Element 'Xx' not found" in line and "Stacktrace" not in line and len(line) < 400, line


@pytest.mark.parametrize(("section", "key", "value"), [
    ("train", "max_time", "banana"), ("train", "max_steps", -5), ("train", "accelerator", "tpu"),
    ("data", "batch_size", 0), ("optim", "lr", -0.1), ("data", "num_workers", -1),
])
def test_pretrain_bad_config_names_the_key_before_creating_the_run_dir(
        capsys: pytest.CaptureFixture, tmp_path: Path, section: str, key: str, value: object) -> None:
    run = tmp_path / "run"
    cfg = {"train": {"run_dir": str(run), "accelerator": "cpu"}, "data": {"data_dir": str(tmp_path / "nodata")},
           section: {key: value}}
    if section == "train":
        cfg["train"] = {"run_dir": str(run), key: value}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = _run(capsys, "pretrain", "-c", str(tmp_path / "c.yaml"))
    assert code == 2
    _one_line_error(err, f"{section}.{key}")
    assert not run.exists()


def test_data_qm9_header_only_csv(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    csv = tmp_path / "h.csv"
    csv.write_text((QM9_SAMPLE_DIR / "qm9_sample.csv").read_text().splitlines()[0] + "\n")
    code, _, err = _run(capsys, "data", "qm9", "--source", "csv", "--path", str(csv), "--data-dir",
                        str(tmp_path / "out"), "--workers", "1", "--no-progress")
    assert code == 2
    _one_line_error(err, str(csv), "no molecules")


def test_data_qm9_read_only_data_dir_is_refused_first(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        target = ro if not os.access(ro, os.W_OK) else Path("/proc")  # root ignores permission bits
        code, _, err = _run(capsys, "data", "qm9", "--source", "csv", "--path", str(tmp_path / "missing.csv"),
                            "--data-dir", str(target / "qm9"), "--workers", "1", "--no-progress")
    finally:
        ro.chmod(0o755)
    assert code == 2
    _one_line_error(err, "--data-dir", "cannot write")  # before the missing input is even looked at


def test_a_second_finetune_into_the_same_run_dir_is_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """Two runs into one directory would write the same files at once (found when a shell started one twice):
    the second fails at once naming the directory and the holder; the lock goes with its holder."""
    import os

    from flowmol_ext.io_utils import run_dir_lock

    run_dir = tmp_path / "ft"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run_dir), "device": "cpu", "data_dir": None}))
    with run_dir_lock(run_dir):  # another run holds the directory
        rc = main(["finetune", "-c", str(cfg)])
        err = capsys.readouterr().err
        assert rc != 0 and str(run_dir) in err and f"pid {os.getpid()}" in err, err
        assert len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in run_dir.iterdir()) == [".fdc-mol.run.lock"]  # nothing written
        with pytest.raises(ValueError, match="in use by another run"):
            with run_dir_lock(run_dir):
                pass
    with run_dir_lock(run_dir):  # released: the next run gets it
        pass


def _record_compile_flag(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Make ``sample_molecules`` record whether it got a compiled network, then sample eagerly; returns the record."""
    import flowmol_ext.model.sampler as sampler

    seen: list[bool] = []
    real = sampler.sample_molecules

    def recording(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(model.vector_field.compiled)
        model.set_compile(False)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(sampler, "sample_molecules", recording)
    return seen


@pytest.mark.parametrize("flag", [True, False])
def test_sample_compile_flag_reaches_the_network(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, flag: bool) -> None:
    """``fdc-mol sample --compile`` hands a network under torch.compile to the sampler (here recorded, then sampled
    eagerly for speed: compilation itself is covered by bench/bench_model.py's equal outputs)."""
    seen = _record_compile_flag(monkeypatch)
    out = tmp_path / "m.sdf"
    argv = ["sample", "-n", "2", "--steps", "2", "--device", "cpu", "-o", str(out)] + (["--compile"] if flag else [])
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    assert seen == [flag]
    assert len([m for m in Chem.SDMolSupplier(str(out), sanitize=False)]) == 2


@pytest.mark.parametrize("flag", [True, False])
def test_model_card_compile_flag_reaches_the_network(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                                     flag: bool) -> None:
    """``fdc-mol model-card --compile`` samples every sampler's column with the network under torch.compile
    (recorded, then sampled eagerly for speed, as for ``sample --compile``)."""
    seen = _record_compile_flag(monkeypatch)
    argv = ["model-card", "-n", "2", "--steps", "2", "--energy", "none"] + (["--compile"] if flag else [])
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert seen == [flag, flag]  # ode and sde
    assert "molecule_stability" in out


def test_compare_without_finished_runs_names_the_folder(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = _run(capsys, "compare", "-c", "fdc_effect_cpu", "--seeds", "0", "--out", str(tmp_path / "none"),
                        "--summarize")
    assert code != 0
    _one_line_error(err, "no finished run", str(tmp_path / "none"), "fdc_effect_cpu")


def test_compare_too_few_fixed_graph_molecules_is_refused_before_any_run(capsys: pytest.CaptureFixture,
                                                                         tmp_path: Path) -> None:
    code, _, err = _run(capsys, "compare", "-c", "fdc_effect_cpu", "--seeds", "0", "--out", str(tmp_path / "cmp"),
                        "--fixed-graph-molecules", "4")
    assert code == 2 and not (tmp_path / "cmp").exists()
    _one_line_error(err, "--fixed-graph-molecules", ">= 8", "4")
