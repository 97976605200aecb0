"""`fastclip verify`: passes on the backends here, and reports a backend that computes wrongly."""
import dataclasses

import pytest

from fastclip import ref
from fastclip.backends import dispatch as ops
from fastclip.backends import verify
from fastclip.cli import main


def test_verify_cli_passes_and_runs_triton_interpreter(capsys):
    assert main(["verify", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("triton (interpreter)")]
    assert len(rows) == len(verify.VERIFY_CONFIGS) and all(r[-1] == "pass" for r in rows)
    assert [line for line in out.splitlines() if line.startswith("ref")] == []  # fp32 has no baseline row


def test_baseline_rows_are_not_counted(monkeypatch, capsys):
    """The reference run in bf16 is shown as the baseline; with no backend to check, verify fails."""
    monkeypatch.setattr(verify, "available_backends", lambda: [])
    assert verify.main(["bf16"], interpreter=False, gpu_targets=[]) == 1
    out = capsys.readouterr().out
    baseline = [line.split() for line in out.splitlines() if line.startswith("ref (baseline)")]
    assert len(baseline) == len(verify.VERIFY_CONFIGS) and all(r[-1] == "baseline" for r in baseline)
    assert "nothing was checked" in out and "pass" not in out


def test_verify_detects_a_wrong_backend(monkeypatch):
    def bad_layer_norm(x, weight, bias, eps, residual=None, upcast=False):
        out = ref.layer_norm(x, weight, bias, eps * 1e4, residual=residual)  # a plausible-looking bug
        return out

    broken = dataclasses.replace(ops.get_ops("ref"), backend="cpu", layer_norm=bad_layer_norm)
    monkeypatch.setattr("fastclip.models.clip.resolve_backend", lambda backend, device: backend or "ref")
    monkeypatch.setattr("fastclip.models.clip.get_ops", lambda backend: broken if backend == "cpu" else ops.get_ops("ref"))
    rows = verify.check("cpu", "cpu", "fp32")
    assert rows and not any(r["ok"] for r in rows)
    assert all(max(r["image_err"], r["text_err"]) > r["bound"] for r in rows)  # failed on the errors, not a crash


def test_verify_rejects_unknown_gpu_target():
    with pytest.raises(SystemExit, match="sm_75"):
        main(["verify", "--gpu-targets", "sm_75"])
