"""Kernel tests run the Triton kernels on ``DEVICE`` (tests/helpers/device.py): compiled, on CUDA tensors,
where there is a CUDA device; else on CPU tensors under the Triton interpreter.

Triton 3.8 reads TRITON_INTERPRET when ``@triton.jit`` decorates a function (``knobs.runtime.interpret``
is looked up from the environment at that moment), so it must be set before triton is first imported:
tests/conftest.py sets it before importing open_clip (which imports triton). It stays as set for the
session, and the compile checks run in a subprocess with TRITON_INTERPRET unset (see
kernels/compile_check.py). Test modules take their device with ``from helpers.device import DEVICE``.

``fastclip.kernels`` is the top-level ``kernels/`` folder, mapped by setup.py: install the checkout
(README, step 1) before running the tests.
"""
import os
import sys

import pytest
import torch

from helpers.device import INTERPRET

if INTERPRET != (os.environ.get("TRITON_INTERPRET") == "1"):
    raise RuntimeError("tests/conftest.py must set TRITON_INTERPRET=1 (no CUDA device) before triton is imported")
if not INTERPRET:  # fp32 references on CUDA in IEEE fp32, as the kernels' fp32 dots are (input_precision="ieee")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


_already = [m for m in sys.modules if m.startswith("fastclip.kernels.")]
if INTERPRET and _already:  # their kernels were decorated in compiled mode and cannot run on CPU tensors
    raise RuntimeError(f"kernel modules {_already} were imported before tests/conftest.py set "
                       "TRITON_INTERPRET=1; import them inside tests/kernels only")


# ---------------------------------------------------------------- max-error table, printed at the end
_ERRORS: dict[tuple[str, str], list[float]] = {}


@pytest.fixture
def record_error():
    """record_error(op, dtype, err, ref_err=None): err = kernel vs the wider reference (float64 for fp32,
    fp32 for fp16/bf16); ref_err = the reference op run in the kernel's dtype vs the same wider reference.
    The summary keeps the worst of each and the worst ratio err / ref_err per (op, dtype)."""

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
    where = "Triton interpreter, CPU tensors" if INTERPRET else "compiled, CUDA tensors"
    tr.section(f"kernels ({where}) vs the reference in float64 (fp32) / fp32 (fp16, bf16): worst max-abs error")
    tr.write_line(f"{'op':24} {'dtype':6} {'kernel err':>11} {'ref-in-dtype err':>17} {'worst err/ref-err':>18}")
    for (op, dtype), (err, ref_err, ratio) in sorted(_ERRORS.items()):
        tr.write_line(f"{op:24} {dtype:6} {err:11.3e} {ref_err:17.3e} {ratio:18.2f}")
