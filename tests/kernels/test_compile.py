"""Every registered Triton kernel, config and dtype compiles for sm_80 (A100) and sm_90 (H100) with no GPU.

kernels/compile_check.py does the work; it runs one subprocess per target (in parallel, with
TRITON_INTERPRET unset, since conftest.py sets it where there is no GPU). Checks per row: it compiles,
shared memory <= the per-block maximum (A100 163 KiB, H100 227 KiB), ptxas reports zero spill bytes,
and kernels that multiply tiles (attention in fp16/bf16; any spec with tensor_cores=True) use tensor
cores in their SASS: HMMA on sm_80, HGMMA (wgmma) or HMMA (mma.sync fallback) on sm_90.

Runtime: ~150 s on 2 cores with an empty Triton cache (~200 kernels x 2 targets), a few seconds once
~/.triton/cache holds them; the table for docs/gpu.md comes from `python kernels/compile_check.py`.
"""
import pytest

from fastclip.kernels import compile_check as cc

TARGETS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def results():
    return cc.compile_all(TARGETS)


def _describe(rows_and_problems):
    return "\n".join(f"  {r['kernel']} {r['dtype']} {r['config']}: {p}" for r, p in rows_and_problems)


def _compiled(results, target):
    return [r for r in results[target] if not r.get("skipped")]


@pytest.mark.parametrize("target", TARGETS)
def test_every_config_compiles(results, target):
    rows = _compiled(results, target)
    assert any(r["kernel"].startswith("attention") for r in rows), "attention registered no compile specs"
    failed = [(r, r["error"]) for r in rows if not r["ok"]]
    assert not failed, f"{len(failed)}/{len(rows)} configs fail to compile for {target}:\n{_describe(failed)}"


@pytest.mark.parametrize("target", TARGETS)
def test_shared_memory_fits(results, target):
    over = [(r, f"{r['smem']} B > {r['smem_limit']} B") for r in _compiled(results, target)
            if r["ok"] and r["smem"] > r["smem_limit"]]
    assert not over, f"shared memory over the {target} limit:\n{_describe(over)}"


@pytest.mark.parametrize("target", TARGETS)
def test_no_spills(results, target):
    spilling = [(r, f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads")
                for r in _compiled(results, target) if r["ok"] and (r["spill_stores"] or r["spill_loads"])]
    assert not spilling, f"register spills on {target}:\n{_describe(spilling)}"


@pytest.mark.parametrize("target", TARGETS)
def test_tile_products_use_tensor_cores(results, target):
    rows = [r for r in _compiled(results, target) if r["ok"] and r["tensor_cores"]]
    attention_lp = [r for r in rows if r["kernel"].startswith("attention") and r["dtype"] in ("fp16", "bf16")]
    assert attention_lp and all(r in rows for r in attention_lp)
    allowed = {"sm_80": {"HMMA"}, "sm_90": {"HGMMA", "HMMA", "HGMMA+HMMA"}}[target]
    missing = [(r, f"tensor-core instructions: {r['mma']}") for r in rows if r["mma"] not in allowed]
    assert not missing, f"no tensor-core MMA in the SASS on {target}:\n{_describe(missing)}"


def test_skipped_modules_are_only_missing_ones(results):
    skipped = [r for t in TARGETS for r in results[t] if r.get("skipped")]
    assert all(r["skipped"] in ("module not present", "no COMPILE_SPECS") for r in skipped)
    assert "attention" not in {r["kernel"] for r in skipped}


def test_format_table_and_problems():
    base = {"kernel": "k", "dtype": "fp16", "config": "M=64 w4 s2", "ok": True, "error": None, "regs": 100,
            "smem": 1024, "smem_limit": 2048, "spill_stores": 0, "spill_loads": 0, "mma": "HMMA",
            "tensor_cores": True, "gpu": "A100"}
    good = dict(base, target="sm_80")
    bad = dict(base, target="sm_90", gpu="H100", smem=4096, spill_stores=8, spill_loads=4, mma="none")
    assert cc.problems(good) == []
    assert len(cc.problems(bad)) == 3
    table = cc.format_table([good, bad, {"target": "sm_80", "kernel": "bias_act", "skipped": "module not present"}])
    assert "| k | fp16 | M=64 w4 s2 | 100 | 1.0 | 0 | HMMA | 100 | 4.0 | 8/4 | none ! |" in table
    assert "bias_act (sm_80): skipped, module not present" in table
    with pytest.raises(ValueError, match="unknown target"):
        cc.compile_kernel_configs("sm_70")
