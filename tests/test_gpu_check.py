"""bench/gpu_check.py --smoke: the GPU run's every code path on a CPU (Triton interpreter, tiny shapes and
model, one-shot timings), so the prepared GPU command is known to work before a GPU runs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"check", "timing", "loss", "models"}


def test_smoke_run_writes_ok_results(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTCLIP_BACKEND"}
    env["TRITON_INTERPRET"] = "1"  # read by Triton when the kernels are decorated: before the script imports it
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["ok"] and results["env"]["smoke"] is True
    sections = results["sections"]
    assert set(sections) == SECTIONS
    for name, section in sections.items():
        assert section["status"] == "ok", (name, section.get("error"))
        assert section["rows"], name
        failed = [row for row in section["rows"] if row.get("ok") is False or "error" in row]
        assert not failed, (name, failed)
    ops = {row["op"] for row in sections["check"]["rows"]}
    assert {"attention", "layer_norm", "bias_act", "rotary", "normalize_project", "clip loss fwd+bwd",
            "siglip loss fwd+bwd"} <= ops
    assert {row["dtype"] for row in sections["check"]["rows"]} == {"fp32", "fp16", "bf16"}
    loss = sections["loss"]["rows"][0]
    assert loss["open_clip_oom"] and loss["open_clip_N"] < loss["N"]  # the out-of-memory fallback ran
    assert all("torch.compile_img_s" in row for row in sections["models"]["rows"])
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert all(f"## {name}: ok" in markdown for name in SECTIONS)
