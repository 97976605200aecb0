"""``fastclip verify``: every backend this machine can run, against the reference, on small models.

Each backend runs the tiny models of fastclip/models/tiny.py (CLIP and SigLIP shapes, every pooling, head
dims 32 to 104) built from the same random weights as the reference backend; the table gives the max-abs
error of encode_image / encode_text against the fp32 reference. fp32 must agree to 1e-4
(tolerance.BACKEND_MODEL_ATOL); fp16/bf16 must meet fastclip.tolerance's rule (2x the error of the
reference run in the same dtype, plus a small atol). Those reference-in-dtype errors are printed first
as the baseline rows; they are not checks. With no GPU, the Triton kernels still run on CPU tensors
under Triton's interpreter (in a subprocess with TRITON_INTERPRET=1). ``gpu_targets`` adds the sm_80 /
sm_90 compile table.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import torch

from ..errors import BackendUnavailableError
from ..models.clip import CLIP
from ..models.config import parse_config
from ..models.tiny import TINY_CONFIGS
from ..tolerance import BACKEND_MODEL_ATOL, low_precision_bound
from .dispatch import resolve_backend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# A tiny SigLIP 2 NaFlex model (image tower type "naflex", fastclip/models/naflex.py): its images are padded
# patch sequences of mixed shapes (key-padding masks in every layer and in the pooling head).
NAFLEX_TINY_CONFIGS: dict[str, dict] = {
    "tiny-naflex": {
        "embed_dim": 64, "init_logit_bias": -10, "family": "siglip", "tokenizer": "clip",
        "vision_cfg": {"type": "naflex", "patch_size": 8, "position_grid": 4, "max_num_patches": 24, "width": 64,
                       "layers": 2, "head_width": 32, "act": "gelu_tanh", "norm_kwargs": {"eps": 1e-6}},
        "text_cfg": TINY_CONFIGS["tiny-siglip"]["text_cfg"],
    },
}


# Every model a default run checks.
VERIFY_CONFIGS: dict[str, dict] = {**TINY_CONFIGS, **NAFLEX_TINY_CONFIGS}


def _naflex_pixels(vision, batch: int, gen: torch.Generator):
    """A NaflexBatch of ``batch`` images of mixed (h, w) patch grids, zero-padded to max_num_patches."""
    from ..data.naflex import NaflexBatch

    n, grid = vision.max_num_patches, vision.position_grid
    candidates = [(grid, grid), (max(1, grid // 2), grid + 1), (1, 3), (grid + 1, 1)]
    shapes = [candidates[b % len(candidates)] for b in range(batch)]
    shapes = [(h, min(w, n // h)) if h * w > n else (h, w) for h, w in shapes]  # (h, w) within the budget
    lengths = torch.tensor([h * w for h, w in shapes])
    mask = torch.arange(n)[None, :] < lengths[:, None]  # (B, N), the real patches first
    values = torch.randn(batch, n, vision.patch_dim, generator=gen) * mask[..., None]  # (B, N, P*P*3)
    return NaflexBatch(values, mask, torch.tensor(shapes, dtype=torch.long))


def _inputs(cfg, batch: int = 3):
    gen = torch.Generator().manual_seed(0)
    if getattr(cfg.vision, "type", None) == "naflex":
        pixels = _naflex_pixels(cfg.vision, batch, gen)
    else:
        pixels = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    L, vocab = cfg.text.context_length, cfg.text.vocab_size
    tokens = torch.randint(1, vocab - 1, (batch, L), generator=gen)
    for row in range(batch):  # end of text (the highest id) at different positions, padding after it
        end = (row * 7 + 5) % L
        tokens[row, end], tokens[row, end + 1:] = vocab - 1, 0
    return pixels, tokens


def _encode(model: CLIP, pixels, tokens):
    """pixels: (B, 3, S, S) or a NaflexBatch (moved, then cast: its ``to`` takes one target)."""
    with torch.inference_mode():
        return (model.encode_image(pixels.to(model.device).to(model.dtype)).float().cpu(),
                model.encode_text(tokens.to(model.device)).float().cpu())


def check(backend: str, device: str, precision: str, configs: dict[str, dict] | None = None) -> list[dict]:
    """One row per tiny model (``configs``: name -> OpenCLIP-shaped dict, default VERIFY_CONFIGS): max errors of
    ``backend`` vs the fp32 reference and pass/fail."""
    rows = []
    for name, raw in (VERIFY_CONFIGS if configs is None else configs).items():
        cfg = parse_config(name, raw)
        reference = CLIP(cfg, backend="ref").init_random(seed=0).eval()
        pixels, tokens = _inputs(cfg)
        expected = _encode(reference, pixels, tokens)
        row = {"backend": backend, "device": device, "precision": precision, "model": name}
        try:
            dtype = DTYPES[precision]
            model = copy.deepcopy(reference).to(device=device, dtype=dtype).set_backend(backend)
            got = _encode(model, pixels, tokens)
            errors = [float((g - e).abs().max()) for g, e in zip(got, expected, strict=True)]
            if precision == "fp32":
                bounds = [BACKEND_MODEL_ATOL, BACKEND_MODEL_ATOL]
            else:  # the reference op in the same low dtype sets the bar
                low_ref = _encode(copy.deepcopy(reference).to(device=device, dtype=dtype).set_backend("ref"),
                                  pixels, tokens)
                bounds = [low_precision_bound(float((r - e).abs().max()), dtype) for r, e in zip(low_ref, expected, strict=True)]
            row.update(image_err=errors[0], text_err=errors[1], bound=max(bounds),
                       ok=all(e <= b for e, b in zip(errors, bounds, strict=True)))
        except Exception as exc:  # a crash is a failure of that backend, reported in its row
            row.update(image_err=None, text_err=None, bound=None, ok=False, error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    return rows


def _interpreter_rows(precisions) -> list[dict]:
    """The Triton backend on CPU tensors under the interpreter, in a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = ("import json, sys; from fastclip.backends.verify import check; "
            f"print(json.dumps([r for p in {list(precisions)!r} for r in check('triton', 'cpu', p)]))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return [{"backend": "triton (interpreter)", "device": "cpu", "precision": "-", "model": "-", "ok": False,
                 "image_err": None, "text_err": None, "bound": None, "error": proc.stderr.strip()[-400:]}]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for row in rows:
        row["backend"] = "triton (interpreter)"
    return rows


def available_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs that can run here, besides the reference itself."""
    pairs = []
    for backend, device in (("cpu", "cpu"), ("triton", "cuda")):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        try:
            resolve_backend(backend, device)
            pairs.append((backend, device))
        except BackendUnavailableError:
            pass
    return pairs


def baseline(precisions) -> list[dict]:
    """The reference run in each low precision against fp32: the error every backend's bound is built on
    (shown beside the checks, not counted as one)."""
    rows = [r for p in precisions if p != "fp32" for r in check("ref", "cpu", p)]
    for row in rows:
        row.update(backend="ref (baseline)", ok=None)
    return rows


def run(precisions=("fp32", "bf16"), interpreter: bool = True) -> list[dict]:
    """Baseline rows, then one row per (backend, precision, tiny model) this machine can run."""
    rows = baseline(precisions)
    for backend, device in available_backends():
        rows += [r for p in precisions for r in check(backend, device, p)]
    if interpreter and not torch.cuda.is_available():
        rows += _interpreter_rows(precisions)
    return rows


def format_rows(rows: list[dict]) -> str:
    def num(x):
        return "-" if x is None else f"{x:.2e}"

    lines = [f"{'backend':22} {'device':6} {'dtype':5} {'model':22} {'image err':>10} {'text err':>10} {'bound':>9}  result"]
    for r in rows:
        if r["ok"] is None:
            result = "baseline"
        else:
            result = "pass" if r["ok"] else "FAIL" + (f" ({r['error']})" if r.get("error") else "")
        lines.append(f"{r['backend']:22} {r['device']:6} {r['precision']:5} {r['model']:22} {num(r['image_err']):>10} "
                     f"{num(r['text_err']):>10} {num(r['bound']):>9}  {result}")
    return "\n".join(lines)


def main(precisions, interpreter: bool, gpu_targets: list[str]) -> int:
    rows = run(tuple(precisions), interpreter)
    print(format_rows(rows))
    checks = [r for r in rows if r["ok"] is not None]
    failed = sum(not r["ok"] for r in checks)
    if not checks:
        print("\nno backend besides the reference can run here: nothing was checked")
        failed += 1
    if gpu_targets:
        from ..kernels import compile_check

        results = compile_check.compile_all(tuple(gpu_targets))
        compiled = [r for t in gpu_targets for r in results[t]]
        print()
        print(compile_check.format_table(compiled))
        problems = [(r, p) for r in compiled for p in compile_check.problems(r)]
        for r, p in problems:
            print(f"FAIL {r['target']} {r['kernel']} {r.get('dtype')} {r.get('config')}: {p}")
        print(f"\n{len(compiled)} kernel configs compiled, {len(problems)} problems")
        failed += len(problems)
    print(f"\n{'all checks passed' if not failed else f'{failed} checks FAILED'}")
    return 1 if failed else 0
