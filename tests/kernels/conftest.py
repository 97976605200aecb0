"""Kernel tests run the Triton kernels on CPU tensors under the Triton interpreter.

Triton 3.8 reads TRITON_INTERPRET when ``@triton.jit`` decorates a function (``knobs.runtime.interpret``
is looked up from the environment at that moment), so it must be set before triton is first imported:
tests/conftest.py sets it before importing open_clip (which imports triton). It stays set for the
session: nothing else in tests/ runs Triton code, and the compile checks run in a subprocess with
TRITON_INTERPRET unset (see kernels/compile_check.py).

``fastclip.kernels`` is the top-level ``kernels/`` folder, mapped by setup.py: install the checkout
(README, step 1) before running the tests.
"""
import os
import sys

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/conftest.py must set TRITON_INTERPRET=1 before triton is imported")


_already = [m for m in sys.modules if m.startswith("fastclip.kernels.")]
if _already:  # their kernels were decorated in compiled mode and cannot run on CPU tensors
    raise RuntimeError(f"kernel modules {_already} were imported before tests/kernels/conftest.py set "
                       "TRITON_INTERPRET=1; import them inside tests/kernels only")


# ---------------------------------------------------------------- max-error table, printed at the end
_ERRORS: dict[tuple[str, str], list[float]] = {}


@pytest.fixture
def record_error():
    """record_error(op, dtype, err, ref_err=None): err = kernel vs the fp32 reference; ref_err = the
    reference op run in the same low dtype vs the fp32 reference. The summary keeps the worst of each
    and the worst ratio err / ref_err per (op, dtype)."""

    def record(op: str, dtype: str, err: float, ref_err: float | None = None) -> None:
        worst = _ERRORS.setdefault((op, dtype), [0.0, float("nan"), float("nan")])
        worst[0] = max(worst[0], err)
        if ref_err is not None:
            worst[1] = ref_err if worst[1] != worst[1] else max(worst[1], ref_err)
            if ref_err > 0:
                ratio = err / ref_err
                worst[2] = ratio if worst[2] != worst[2] else max(worst[2], ratio)

    return record


def pytest_terminal_summary(terminalreporter):
    if not _ERRORS:
        return
    tr = terminalreporter
    tr.section("kernels (TRITON_INTERPRET=1) vs fp32 reference: worst max-abs error")
    tr.write_line(f"{'op':24} {'dtype':6} {'kernel err':>11} {'ref-in-dtype err':>17} {'worst err/ref-err':>18}")
    for (op, dtype), (err, ref_err, ratio) in sorted(_ERRORS.items()):
        tr.write_line(f"{op:24} {dtype:6} {err:11.3e} {ref_err:17.3e} {ratio:18.2f}")
