"""Markdown results table of the end-to-end benches, with the issue's targets marked met / not met.

    python -m pytest bench/bench_e2e.py bench/bench_jpeg.py --benchmark-json /tmp/e2e.json
    python bench/report.py /tmp/e2e.json

(``FASTCLIP_BENCH_LARGE=1`` before the first command adds the ViT-L-14 rows; bench/bench_int8.py's JSON
reads the same way.) Per group: each implementation's rate (images/s or texts/s; batch-1 groups show
latency), GFLOP/s as a fraction of the sgemm rate measured in the same run, and fastclip's speed-up over
it (> 1: fastclip is faster; int8 rows are compared with fastclip int8, bf16 rows with fastclip bf16). Groups
appear in the order they ran. Then the best peer of each precision per group (fp32: open_clip, torch.compile,
transformers, ONNX Runtime, OpenVINO; int8: ONNX Runtime, OpenVINO; bf16: open_clip in bfloat16, OpenVINO;
int8 and bf16 peers with cosine >= 0.99 only) with fastclip's ratio to the best fp32 peer, fastclip int8's
to the best int8 peer and fastclip bf16's to the best bf16 peer (throughput at batch 32 and for the
captions; latency in batch-1 groups; > 1: fastclip is faster), and the speed targets.

The EVA02-B-16, PE-Core-B-16 and SigLIP 2 NaFlex groups (bench_e2e.py's test_eva_images / test_naflex_images)
read the same way; their GFLOP/s and fraction of peak come from bench/flops.py's counts for those towers.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

FASTCLIP = "fastclip"
# (label, group, impl measured, impl compared with -- "best fp32" / "best int8": the group's fastest peer of
# that precision (best_peers) --, minimum speed-up; in batch-1 groups a speed-up is the inverse latency ratio)
SPEED_TARGETS = [
    *[(f"{arch} images, batch 32: >= 1.2x the best fp32 peer", f"{arch} images, batch 32", FASTCLIP, "best fp32", 1.2)
      for arch in ("ViT-B-32", "ViT-B-16")],
    *[(f"{arch} images, batch 1: latency <= 0.8x the best fp32 peer's", f"{arch} images, batch 1", FASTCLIP,
       "best fp32", 1.25) for arch in ("ViT-B-32", "ViT-B-16")],
    *[(f"int8, {arch} images, batch 32: >= 1.3x the best int8 peer", f"{arch} images, batch 32", "fastclip-int8",
       "best int8", 1.3) for arch in ("ViT-B-32", "ViT-B-16")],
    *[(f"int8, {arch} images, batch 1: >= 1.1x the best int8 peer", f"{arch} images, batch 1", "fastclip-int8",
       "best int8", 1.1) for arch in ("ViT-B-32", "ViT-B-16")],
    ("ViT-B-32 captions: >= 7x open_clip", "ViT-B-32 text, 256 captions", FASTCLIP, "open_clip", 7.0),
]
MIN_COSINE, MIN_JPEG_FRACTION = 0.99, 0.85


def load_rows(path: str) -> tuple[dict[str, dict[str, dict]], float | None]:
    """{group: {impl: extra_info + mean}}, and the sgemm rate of the run."""
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    sgemm = None
    for bench in data["benchmarks"]:
        info = dict(bench.get("extra_info", {}))
        if bench["group"] == "sgemm":
            sgemm = info.get("sgemm_gflops")
            continue
        info["mean_s"] = bench["stats"]["mean"]
        groups[bench["group"]][info.get("impl", bench["name"])] = info
    return groups, sgemm


def _fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _speedup_base(group: str, impl: str, rows: dict[str, dict]) -> dict | None:
    """The fastclip row a row is compared with: fastclip int8 for int8 rows, fastclip bf16 for bf16 rows,
    embed_images' encoder for the JPEG group, else fastclip."""
    if "JPEG" in group:
        return rows.get("embed_images")
    return rows.get({"int8": "fastclip-int8", "bf16": "fastclip-bf16"}.get(precision_of(impl, rows.get(impl, {})),
                                                                         FASTCLIP))


def group_table(group: str, rows: dict[str, dict]) -> list[str]:
    unit = "texts/s" if "text" in group else "img/s"
    batch1 = group.endswith("batch 1")
    head = "latency (ms)" if batch1 else unit
    ratio_head = "embed_images' rate over it" if "JPEG" in group else "fastclip's speed-up over it"
    lines = [f"### {group}", "", f"| implementation | {head} | GFLOP/s | of sgemm | of peak | {ratio_head} |",
             "|---|---|---|---|---|---|"]
    for impl, row in rows.items():
        value = row.get("latency_ms") if batch1 else row.get("items_per_s")
        base = _speedup_base(group, impl, rows)
        ratio = base["items_per_s"] / row["items_per_s"] if base and row.get("items_per_s") else None
        notes = []
        if "min_cosine_to_fp32" in row:
            notes.append(f"cosine to fp32 ≥ {row['min_cosine_to_fp32']:.4f}")
        if "quantization" in row:
            notes.append(row["quantization"])
        if "performance_hint" in row:
            notes.append(f"{row['performance_hint']}, {row.get('inference_precision', '?')}")
        extra = f" ({', '.join(notes)})" if notes else ""
        lines.append(f"| {impl}{extra} | {_fmt(value)} | {_fmt(row.get('gflops_per_s'))} | "
                     f"{_fmt(row.get('fraction_of_sgemm'), '.2f')} | {_fmt(row.get('fraction_of_peak'), '.2f')} | "
                     f"{_fmt(ratio, '.2f', 'x')} |")
    return lines + [""]


def precision_of(impl: str, row: dict) -> str:
    """A row's precision: recorded by the benches, else read off the name (as bench/peers/ does)."""
    return row.get("precision") or ("int8" if "int8" in impl else "bf16" if "bf16" in impl else "fp32")


def is_peer(impl: str) -> bool:
    """Every row but fastclip's own (fastclip, fastclip encode_text, fastclip-int8, the JPEG rows)."""
    return not impl.startswith("fastclip") and impl not in ("embed_images", "encode_image")


def best_peers(rows: dict[str, dict], batch1: bool) -> dict[str, str]:
    """{precision: the fastest peer of it} (lowest latency in batch-1 groups, else highest rate); int8 and
    bf16 peers below MIN_COSINE to fp32 are not eligible."""
    best: dict[str, str] = {}
    for impl, row in rows.items():
        if not is_peer(impl) or row.get("items_per_s") is None:
            continue
        prec = precision_of(impl, row)
        if prec != "fp32" and (row.get("min_cosine_to_fp32") or 0.0) < MIN_COSINE:
            continue
        if prec not in best or _speed(row, batch1) > _speed(rows[best[prec]], batch1):
            best[prec] = impl
    return best


def _speed(row: dict, batch1: bool) -> float:
    """Larger is faster: items/s, or the inverse latency in batch-1 groups."""
    return 1e3 / row["latency_ms"] if batch1 else row["items_per_s"]


def best_peers_row(group: str, rows: dict[str, dict]) -> str:
    """One group's line of the best-peers table."""
    batch1 = group.endswith("batch 1")
    key, unit = ("latency_ms", "ms") if batch1 else ("items_per_s", "texts/s" if "text" in group else "img/s")
    best = best_peers(rows, batch1)

    def cell(prec: str) -> str:
        impl = best.get(prec)
        return "—" if impl is None else f"{impl} ({_fmt(rows[impl].get(key))} {unit})"

    def ratio(ours: str, prec: str) -> str:
        if ours not in rows or prec not in best or rows[ours].get("items_per_s") is None:
            return "—"
        return f"{_speed(rows[ours], batch1) / _speed(rows[best[prec]], batch1):.2f}x"

    return (f"| {group} | {cell('fp32')} | {ratio(FASTCLIP, 'fp32')} | {cell('int8')} | "
            f"{ratio('fastclip-int8', 'int8')} | {cell('bf16')} | {ratio('fastclip-bf16', 'bf16')} |")


def best_peers_table(groups: dict[str, dict[str, dict]]) -> list[str]:
    lines = ["### Best peer of each precision", "",
             "| group | best fp32 peer | fastclip vs it | best int8 peer | fastclip-int8 vs it | best bf16 peer "
             "| fastclip-bf16 vs it |",
             "|---|---|---|---|---|---|---|"]
    lines += [best_peers_row(group, rows) for group, rows in groups.items() if "JPEG" not in group]
    return lines + [""]


def targets_table(groups: dict[str, dict[str, dict]]) -> list[str]:
    lines = ["### Targets", "", "| target | measured | met |", "|---|---|---|"]

    def row(label: str, measured: str, met: bool | None):
        lines.append(f"| {label} | {measured} | {'—' if met is None else ('met' if met else 'not met')} |")

    for label, group, impl, peer, minimum in SPEED_TARGETS:
        rows = groups.get(group, {})
        batch1 = group.endswith("batch 1")
        if peer.startswith("best "):
            peer = best_peers(rows, batch1).get(peer.split()[1], peer)
        if impl not in rows or peer not in rows:
            row(label, f"not run ({', '.join(x for x in (impl, peer) if x not in rows)} missing)", None)
            continue
        speedup = _speed(rows[impl], batch1) / _speed(rows[peer], batch1)
        met = speedup >= minimum
        label = f"{label} ({peer})"
        if "int8" in impl:
            cosine = rows[impl].get("min_cosine_to_fp32")
            met = met and cosine is not None and cosine >= MIN_COSINE
            row(label + f", cosine >= {MIN_COSINE}", f"{speedup:.2f}x, cosine {_fmt(cosine, '.4f')}", met)
        else:
            row(label, f"{speedup:.2f}x", met)
    jpeg = next((rows for group, rows in groups.items() if "JPEG" in group), {})
    fraction = jpeg.get("embed_images", {}).get("fraction_of_encoder_rate")
    row(f"embed_images on JPEG files: >= {MIN_JPEG_FRACTION}x the encoder-only rate",
        _fmt(fraction, ".2f", "x") if fraction else "not run", None if fraction is None else fraction >= MIN_JPEG_FRACTION)
    return lines + [""]


def report(path: str) -> str:
    groups, sgemm = load_rows(path)
    lines = [f"sgemm rate measured in the same run: {_fmt(sgemm)} GFLOP/s (fp32, best of 2048³ and the "
             "encoder's 1600x768 @ 768x3072)", ""]
    for group in groups:
        lines += group_table(group, groups[group])
    return "\n".join(lines + best_peers_table(groups) + targets_table(groups))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(report(sys.argv[1]))
