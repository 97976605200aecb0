"""End to end: tiny CLIP and SigLIP models with backend="triton" on DEVICE (compiled on a GPU, else the Triton
interpreter on CPU tensors) agree with backend="ref" on the same weights under the rules of
fastclip/tolerance.py (fp32: against the model run in float64; fp16/bf16: against the fp32 model), and the
triton backend is refused on a CPU without TRITON_INTERPRET.

Every fused op runs: layer_norm (ln_pre, ln_1/ln_2, ln_post), bias_act (GELU, QuickGELU, tanh-GELU),
attention (causal text, full vision, the SigLIP attention-pool probe) and normalize_project (class
token, end-of-text rows, projection bias, L2 normalisation).
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastclip
from fastclip import tolerance
from fastclip.backends.dispatch import resolve_backend
from fastclip.errors import BackendUnavailableError
from helpers.device import DEVICE, INTERPRET

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

ROOT = Path(__file__).resolve().parents[2]
# The tiny configs' OpenAI-CLIP shape (class token, ln_pre, causal text pooled at argmax, QuickGELU) and SigLIP
# shape (attention-pool head, no vision projection, tanh-GELU, head dim 72, bidirectional text pooled last):
# fastclip/models/tiny.py.
CONFIGS = ["tiny-clip", "tiny-siglip"]


@pytest.fixture(scope="module")
def tiny_models(tiny_config_dir):
    return list(CONFIGS)


def _perturb(model, seed=0, std=0.02):
    """Noise on every parameter, so zero biases and unit LayerNorm weights are not special cases; on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.to(DEVICE)


def _inputs(cfg, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    S, ctx, vocab = cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size
    images = torch.randn(batch, 3, S, S, generator=g)
    tokens = torch.randint(1, vocab - 1, (batch, ctx), generator=g)
    for row, end in enumerate([ctx - 1, 5, ctx // 2][:batch]):  # end-of-text (max id) at varied positions
        tokens[row, end] = vocab - 1
        tokens[row, end + 1:] = 0
    return images.to(DEVICE), tokens.to(DEVICE)


def _encode(model, images, tokens, normalize):
    """(encode_image, encode_text) of ``model``, the images cast to its dtype."""
    with torch.no_grad():
        return (model.encode_image(images.to(model.dtype), normalize=normalize),
                model.encode_text(tokens, normalize=normalize))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_backend_matches_ref(tiny_models, name, record_error):
    model = _perturb(fastclip.create_model(name, backend="ref", seed=0))
    wide = copy.deepcopy(model).to(torch.float64)  # the reference backend on the same weights, in float64
    images, tokens = _inputs(model.cfg)
    want = {n: _encode(model, images, tokens, n) for n in (False, True)}
    want64 = {n: _encode(wide, images, tokens, n) for n in (False, True)}
    model.set_backend("triton")
    assert model.backend == "triton" and "backend='triton'" in repr(model)
    fused = {op: getattr(model.ops, op).__module__
             for op in ("layer_norm", "bias_act", "attention", "normalize_project")}
    assert all(m.startswith("fastclip.kernels.") for m in fused.values()), fused
    got = {n: _encode(model, images, tokens, n) for n in (False, True)}
    for n in (False, True):
        for what, g, w, w64 in zip(("image", "text"), got[n], want[n], want64[n], strict=True):
            errs = tolerance.check_fp32(g, w64, w, f"{name} encode_{what}(normalize={n}) triton vs ref")
            record_error(f"model {name.removeprefix('tiny-')}", "fp32", *errs)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_model_within_twice_the_reference_error(tiny_models, precision, record_error):
    """A low-precision triton model is no further from the fp32 model than 2x the low-precision ref model
    (+ LOW_PRECISION_ATOL, as ``fastclip verify`` holds whole models): the low-precision rule, applied to the
    whole CLIP tower pair."""
    fp32 = _perturb(fastclip.create_model("tiny-clip", backend="ref", seed=0))
    images, tokens = _inputs(fp32.cfg)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    low = _perturb(fastclip.create_model("tiny-clip", backend="ref", seed=0)).to(dtype)
    want = _encode(fp32, images, tokens, True)
    ref_low = _encode(low, images, tokens, True)
    low.set_backend("triton")
    got = _encode(low, images, tokens, True)
    for what, g, r, w in zip(("image", "text"), got, ref_low, want, strict=True):
        assert g.dtype == dtype
        errs = tolerance.check_low_precision(g, w, r, dtype, f"{precision} encode_{what}")
        record_error("model clip", precision, *errs)


def test_auto_never_picks_triton_on_cpu():
    assert resolve_backend("auto", "cpu") != "triton"
    if INTERPRET:
        assert resolve_backend("triton", "cpu") == "triton"  # explicit, interpreter on: allowed (tests)
    else:
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
            resolve_backend("triton", "cpu")


def test_triton_on_cpu_without_interpreter_is_refused():
    """In a fresh process without TRITON_INTERPRET: a clear BackendUnavailableError naming the fix."""
    code = (
        "import fastclip\n"
        "from fastclip.errors import BackendUnavailableError\n"
        "try:\n"
        "    fastclip.create_model('ViT-S-32', backend='triton')\n"
        "except BackendUnavailableError as exc:\n"
        "    print('RAISED', exc)\n"
        "else:\n"
        "    print('NOT RAISED')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCLIP_BACKEND")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "RAISED" in out and "NOT RAISED" not in out, out
    assert "the triton backend needs a CUDA device" in out and "TRITON_INTERPRET=1" in out, out
    assert issubclass(BackendUnavailableError, RuntimeError)
