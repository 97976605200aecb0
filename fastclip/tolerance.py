"""fastclip's one tolerance policy (the numerics contract of DESIGN.md), used by the tests and ``verify``.

- fp32 kernels vs the reference: ``torch.testing.assert_close`` with its fp32 tolerances.
- fp16/bf16 kernels: the max-abs error against the fp32 reference is at most twice the error of the
  reference op run in the same low dtype, plus a small absolute term (the flash-attention rule).
"""
from __future__ import annotations

import torch

LOW_PRECISION_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def low_precision_bound(ref_err: float, dtype: torch.dtype, atol: float | None = None) -> float:
    """Allowed max-abs error of a low-precision result whose reference-in-dtype error is ``ref_err``."""
    return 2 * ref_err + (LOW_PRECISION_ATOL[dtype] if atol is None else atol)


def check_close(out: torch.Tensor, ref32: torch.Tensor, ref_low: torch.Tensor, dtype: torch.dtype, what: str,
                atol: float | None = None, record: dict | None = None) -> float:
    """Assert ``out`` (in ``dtype``) meets the policy against ``ref32`` (the fp32 reference), with
    ``ref_low`` the reference op run in ``dtype``. Returns the max-abs error; ``record`` keeps the
    worst error per dtype."""
    err = (out.float() - ref32.float()).abs().max().item() if out.numel() else 0.0
    if record is not None:
        record[dtype] = max(record.get(dtype, 0.0), err)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, msg=lambda m: f"{what}: {m}")
        return err
    ref_err = (ref_low.float() - ref32.float()).abs().max().item() if out.numel() else 0.0
    bound = low_precision_bound(ref_err, dtype, atol)
    assert err <= bound, (f"{what}: max-abs error {err:.3e} vs the fp32 reference exceeds 2 x {ref_err:.3e} "
                          f"(reference in {dtype}) + atol = {bound:.3e}")
    return err
