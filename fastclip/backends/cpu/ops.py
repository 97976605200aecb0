"""The cpu backend's op table (``fastclip.backends.dispatch.get_ops("cpu")`` calls ``op_table()``), as
kernels/ops.py is the triton backend's."""
from __future__ import annotations

from .attention import attention  # first import of .common: ImportError where the kernels cannot run
from .bias_act import bias_act
from .layer_norm import layer_norm
from .linear import linear, linear_act
from .normalize_project import normalize_project


def op_table() -> dict:
    """{op name: C++-backed op} for the dispatcher (ops not listed here run the reference)."""
    return {"attention": attention, "layer_norm": layer_norm, "bias_act": bias_act,
            "normalize_project": normalize_project, "linear": linear, "linear_act": linear_act}
