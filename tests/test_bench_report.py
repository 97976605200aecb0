"""bench/report.py: the best peer of each precision and the speed targets, read off a benchmark JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import report  # noqa: E402  (bench/report.py)


def _bench(group: str, impl: str, items_per_s: float, batch: int, **extra) -> dict:
    info = {"impl": impl, "items_per_s": items_per_s, "latency_ms": 1e3 * batch / items_per_s, **extra}
    return {"group": group, "name": impl, "extra_info": info, "stats": {"mean": batch / items_per_s}}


def _write(tmp_path: Path, benches: list[dict]) -> str:
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps({"benchmarks": benches}))
    return str(path)


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_targets_use_the_best_peer_of_each_precision(tmp_path):
    b1, b32 = "ViT-B-32 images, batch 1", "ViT-B-32 images, batch 32"
    path = _write(tmp_path, [
        _bench(b1, "fastclip", 20.0, 1), _bench(b1, "ort-fp32", 10.0, 1), _bench(b1, "ov-fp32", 15.0, 1),
        _bench(b1, "fastclip-int8", 40.0, 1, min_cosine_to_fp32=0.9999),
        _bench(b1, "ov-int8", 50.0, 1, min_cosine_to_fp32=0.9995),
        _bench(b1, "ort-int8", 90.0, 1, min_cosine_to_fp32=0.95),  # faster but too inaccurate: not eligible
        _bench(b32, "fastclip", 30.0, 32), _bench(b32, "open_clip", 20.0, 32), _bench(b32, "ov-fp32", 26.0, 32),
    ])
    text = report.report(path)
    # batch 1: 1000 / 20 = 50 ms against ov-fp32's 66.7 ms -> 1.33x, over the 1.25x (latency <= 0.8x) bar
    assert _line(text, "| ViT-B-32 images, batch 1: latency").endswith("(ov-fp32) | 1.33x | met |")
    # int8 at batch 1 against ov-int8 (ort-int8 is below the cosine bar): 0.80x, under 1.1x
    assert "(ov-int8), cosine >= 0.99 | 0.80x, cosine 0.9999 | not met |" in _line(text, "| int8, ViT-B-32 images, batch 1")
    assert _line(text, "| ViT-B-32 images, batch 32: ").endswith("(ov-fp32) | 1.15x | not met |")
    assert "not run" in _line(text, "| ViT-B-16 images, batch 32: ")
    assert _line(text, f"| {b1} |").startswith(f"| {b1} | ov-fp32 (66.7 ms) | 1.33x | ov-int8 (20.0 ms) | 0.80x |")
