"""End to end: tiny CLIP and SigLIP models with backend="triton" (Triton interpreter, CPU tensors) agree
with backend="ref" on the same weights, and the triton backend is refused on a CPU without
TRITON_INTERPRET.

Every fused op runs: layer_norm (ln_pre, ln_1/ln_2, ln_post), bias_act (GELU, QuickGELU, tanh-GELU),
attention (causal text, full vision, the SigLIP attention-pool probe) and normalize_project (class
token, end-of-text rows, projection bias, L2 normalisation).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastclip
from helpers.upstream import register_configs
from fastclip.errors import BackendUnavailableError
from fastclip.backends.dispatch import resolve_backend

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    # OpenAI-CLIP shape: class token, ln_pre, causal text pooled at argmax (end of text), QuickGELU.
    "tiny-triton-clip": {
        "embed_dim": 48, "quick_gelu": True,
        "vision_cfg": {"image_size": 48, "patch_size": 16, "width": 96, "head_width": 32, "layers": 2},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    # SigLIP shape: no class token, attention-pool ("map") head, no vision projection, tanh-GELU,
    # bidirectional text pooled at the last position, projection bias.
    "tiny-triton-siglip": {
        "embed_dim": 64, "init_logit_bias": -10, "family": "siglip", "tokenizer": "hf",
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32,
                       "mlp_ratio": 4.0, "act": "gelu_tanh", "norm_kwargs": {"eps": 1e-6}, "class_token": False,
                       "no_ln_pre": True, "patch_bias": True, "pool_type": "map", "proj": False},
        "text_cfg": {"context_length": 16, "vocab_size": 500, "width": 64, "heads": 2, "layers": 2,
                     "mlp_ratio": 4.0, "act": "gelu_tanh", "norm_kwargs": {"eps": 1e-6}, "no_causal_mask": True,
                     "pool_type": "last", "proj_bias": True},
    },
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    register_configs(tmp_path_factory, "triton_model_configs", CONFIGS)
    return list(CONFIGS)


def _perturb(model, seed=0, std=0.02):
    """Noise on every parameter, so zero biases and unit LayerNorm weights are not special cases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _inputs(cfg, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    S, ctx, vocab = cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size
    images = torch.randn(batch, 3, S, S, generator=g)
    tokens = torch.randint(1, vocab - 1, (batch, ctx), generator=g)
    for row, end in enumerate([ctx - 1, 5, ctx // 2][:batch]):  # end-of-text (max id) at varied positions
        tokens[row, end] = vocab - 1
        tokens[row, end + 1:] = 0
    return images, tokens


@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_backend_matches_ref(tiny_models, name):
    model = _perturb(fastclip.create_model(name, backend="ref", seed=0))
    images, tokens = _inputs(model.cfg)
    with torch.no_grad():
        want = {n: (model.encode_image(images, normalize=n), model.encode_text(tokens, normalize=n)) for n in (False, True)}
        model.set_backend("triton")
        assert model.backend == "triton" and "backend='triton'" in repr(model)
        fused = {op: getattr(model.ops, op).__module__ for op in ("layer_norm", "bias_act", "attention", "normalize_project")}
        assert all(m.startswith("fastclip.kernels.") for m in fused.values()), fused
        got = {n: (model.encode_image(images, normalize=n), model.encode_text(tokens, normalize=n)) for n in (False, True)}
    for n in (False, True):
        for what, g, w in zip(("image", "text"), got[n], want[n]):
            err = (g - w).abs().max().item()
            print(f"{name} {what} normalize={n}: max-abs {err:.2e}")
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{name} encode_{what}(normalize={n}) triton vs ref: {m}")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_model_within_twice_the_reference_error(tiny_models, precision):
    """A low-precision triton model is no further from the fp32 model than 2x the low-precision ref model
    (+ a small atol): DESIGN.md's rule, applied to the whole CLIP tower pair."""
    fp32 = _perturb(fastclip.create_model("tiny-triton-clip", backend="ref", seed=0))
    images, tokens = _inputs(fp32.cfg)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    low = _perturb(fastclip.create_model("tiny-triton-clip", backend="ref", seed=0)).to(dtype)
    with torch.no_grad():
        want = (fp32.encode_image(images, normalize=True), fp32.encode_text(tokens, normalize=True))
        ref_low = (low.encode_image(images, normalize=True), low.encode_text(tokens, normalize=True))
        low.set_backend("triton")
        got = (low.encode_image(images, normalize=True), low.encode_text(tokens, normalize=True))
    atol = 2e-3 if precision == "fp16" else 1e-2
    for what, g, r, w in zip(("image", "text"), got, ref_low, want):
        assert g.dtype == dtype
        err, ref_err = (g.float() - w).abs().max().item(), (r.float() - w).abs().max().item()
        print(f"{precision} {what}: triton {err:.2e}, ref in {precision} {ref_err:.2e}")
        assert err <= 2 * ref_err + atol, f"{precision} {what}: {err:.3e} > 2 x {ref_err:.3e} + {atol}"


def test_auto_never_picks_triton_on_cpu():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert resolve_backend("auto", "cpu") != "triton"
    assert resolve_backend("triton", "cpu") == "triton"  # explicit, interpreter on: allowed (tests)


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
