"""One prepared command for a machine with one CUDA GPU: checks, times and compares fastclip's GPU path.

    python bench/gpu_check.py --out gpu-results                      # everything
    python bench/gpu_check.py --out gpu-results --sections check,loss --budget-s 240
    python bench/gpu_check.py --out /tmp/gpu-check --smoke           # CPU, TRITON_INTERPRET=1, tiny shapes

Sections, run in this order (one that fails or raises is recorded and the next one still runs):

- ``check``: every op of the triton backend (attention, layer_norm with and without the residual add,
  bias_act, normalize_project) and both Triton losses (forward + backward) in fp32, fp16 and bf16 on
  realistic and awkward shapes, against the dense computation in float64 under fastclip.tolerance's rule
  (``judge``). Attention is also launched with every config autotuning may pick, not only the fastest.
- ``timing``: each kernel against its torch peer at every tower's batch-256 shapes (bench/gpu_model.py
  workloads), fp16 and bf16, with ``triton.testing.do_bench`` medians (CUDA events, L2 cleared).
- ``loss``: ClipLoss forward + backward at N = 65,536 against OpenCLIP's dense ClipLoss (which
  materialises the N x N logits: an out-of-memory is recorded and the next smaller N is tried), and the
  loss and gradients against the float32 torch-tile backend at the full N.
- ``models``: images/s of ViT-B-32, ViT-B-16 (batch 256) and ViT-L-14 (batch 128) in fp16 and bf16 for
  fastclip (backend="triton"), open_clip eager (nn.MultiheadAttention, which runs
  F.scaled_dot_product_attention) and open_clip under torch.compile, all on one set of random weights;
  each output is checked against open_clip eager (per-row cosine) before it is timed.

Results go to ``<out>/gpu_check.json`` (environment, every row, each section's status, seconds and error)
and ``<out>/gpu_check.md`` (the same as markdown tables); both are rewritten after every section, so a run
cut short keeps what it measured. Each section's table is printed when it ends. The exit status is 1 if
any check failed or any section raised. ``--budget-s`` (default 450) is a time guard: a section, a model
or a torch.compile peer that would start with too little time left is skipped and recorded as skipped.

``--smoke`` runs the same code on a CPU under TRITON_INTERPRET=1 (the kernels interpreted) with tiny
shapes and a tiny model registered with both fastclip and open_clip, torch.compile with its "eager"
backend, single-run timings and a simulated out-of-memory in OpenCLIP's loss above a small N: it proves
the script works without a GPU (tests/test_gpu_check.py); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

START = time.monotonic()
if "--smoke" in sys.argv:  # Triton fixes interpreted vs compiled when the kernels are decorated, at import
    os.environ["TRITON_INTERPRET"] = "1"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import open_clip
import torch
import torch.nn.functional as F
import triton
from open_clip import loss as oc_loss

import fastclip
import gpu_model as gm
from fastclip import ref, tolerance
from fastclip.backends.dispatch import get_ops
from fastclip.kernels import attention as attn_kernel
from fastclip.loss import ClipLoss, SigLipLoss
from fastclip.models import tiny
from peers import openclip_state_dict

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOW = ("fp16", "bf16")
SECTIONS = ("check", "timing", "loss", "models")
EPS = 1e-5
CLIP_SCALE, SIGLIP_SCALE, SIGLIP_BIAS = 100.0, 10.0, -10.0  # trained CLIP's temperature; SigLIP's init
SMOKE_MODEL = "tiny-clip"  # --smoke's model (fastclip/models/tiny.py), which open_clip builds too


@dataclass(frozen=True)
class Plan:
    """Shapes and sizes of one run: FULL on a GPU, SMOKE on a CPU under the Triton interpreter."""

    device: str
    attention: tuple  # (B, H, Lq, Lk, Dh, causal, key padding)
    layer_norm: tuple  # (rows, width)
    bias_act: tuple  # (rows, width)
    rotary: tuple  # (B, H, L, Dh, start): q of a packed qkv projection, the class token unrotated
    heads: tuple  # normalize_project: (B, L, W, E, text tower, normalize)
    losses: tuple  # (N, D)
    workloads: tuple  # gm.Workload: the kernel timing shapes
    models: tuple  # (architecture, batch)
    loss_n: tuple  # the big-N loss: sizes tried for OpenCLIP, largest (the one fastclip runs) first
    loss_dim: int
    compile_backend: str = "inductor"
    compile_min_s: float = 75.0  # time left needed to start one torch.compile peer
    bench_ms: tuple = (25, 100)  # do_bench warm-up and repetition time (ms)
    dense_cap: int | None = None  # --smoke: OpenCLIP's dense loss raises out-of-memory above this N


FULL = Plan(
    device="cuda",
    attention=((4, 12, 50, 50, 64, False, False),  # ViT-B-32
               (4, 8, 77, 77, 64, True, False),  # CLIP text
               (4, 8, 77, 77, 64, False, True),  # padded bidirectional text
               (2, 12, 197, 197, 64, False, False),  # ViT-B-16
               (2, 16, 257, 257, 64, False, False),  # ViT-L-14
               (8, 16, 1, 257, 64, False, False),  # the trimmed last block: one query over every key
               (2, 16, 257, 257, 80, False, False),  # ViT-H-14's head dim, padded to 128
               (2, 8, 197, 197, 128, True, True)),  # the widest head with both masks
    layer_norm=((4099, 768), (1000, 1024), (333, 1280)),
    bias_act=((4099, 3072), (1000, 4304)),
    rotary=((8, 12, 197, 64, 1), (4, 16, 257, 64, 1), (4, 16, 577, 88, 0)),  # EVA02-B-16, EVA02-L-14, PE-Core-L
    heads=((1, 50, 768, 512, False, True), (300, 77, 512, 512, True, True),
           (4100, 50, 1024, 768, False, False), (9000, 8, 768, 512, False, True)),  # 16/32/64-row tiles
    losses=((1000, 512), (4097, 80)),
    workloads=tuple(gm.workloads(256)),
    models=(("ViT-B-32", 256), ("ViT-B-16", 256), ("ViT-L-14", 128)),
    loss_n=(65536, 49152, 32768, 16384),
    loss_dim=768,
)
SMOKE = Plan(
    device="cpu",
    attention=((2, 1, 40, 40, 80, True, True), (1, 2, 1, 50, 64, False, False)),
    layer_norm=((9, 768),),
    bias_act=((17, 600),),
    rotary=((2, 2, 9, 88, 1),),
    heads=((3, 5, 64, 48, True, True), (2, 5, 64, 48, False, False)),
    losses=((40, 80),),
    workloads=(gm.Workload("tiny text", SMOKE_MODEL, "text", 2, 77, 64, 2, 256, "quick_gelu", True, 32),),
    models=((SMOKE_MODEL, 2),),
    loss_n=(96, 48),
    loss_dim=32,
    compile_backend="eager",
    compile_min_s=0.0,
    bench_ms=(0, 0),
    dense_cap=48,
)


# ------------------------------------------------------------------------------------ shared pieces
def rand(shape, seed: int, plan: Plan, dtype=torch.float32, scale: float = 1.0, shift: float = 0.0):
    """Seeded normal values on the plan's device, rounded to ``dtype``."""
    gen = torch.Generator(device=plan.device).manual_seed(seed)
    return (torch.randn(shape, generator=gen, device=plan.device) * scale + shift).to(dtype)


def free_memory() -> None:
    """Collect garbage and hand cached CUDA blocks back (between models and after out-of-memory errors)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_ms(fn, plan: Plan, rep_ms: float | None = None) -> float:
    """Median ms of ``fn()``: do_bench on a GPU (``rep_ms`` of runs after the warm-up); one perf_counter run
    in --smoke (no timing targets)."""
    if plan.device != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=plan.bench_ms[0], rep=rep_ms or plan.bench_ms[1], return_mode="median")


def judge(out: torch.Tensor, exact: torch.Tensor, low: torch.Tensor, dtype: torch.dtype, atol: float | None = None,
          loss: bool = False, logit_scale: float = 1.0) -> dict:
    """fastclip.tolerance's rule of ``dtype`` for one output: ``exact`` is the computation in float64, ``low``
    the same computation in ``dtype``. fp32: ``check_fp32`` (error <= FP32_ERROR_FACTOR x the fp32
    reference's + a few ulp), for the losses' relative errors ``loss_fp32_bound`` (LOSS_FP32_FACTOR x OpenCLIP's
    fp32 error + a floor that grows with ``logit_scale``); fp16/bf16: ``low_precision_bound`` (2 x the
    reference's own error + ``atol``)."""
    exact = exact.double()
    err, ref_err = tolerance.max_abs(out, exact), tolerance.max_abs(low, exact)
    if dtype != torch.float32:
        bound = tolerance.low_precision_bound(ref_err, dtype, atol)
    elif loss:
        bound = tolerance.loss_fp32_bound(ref_err, logit_scale)
    else:
        bound = tolerance.fp32_bound(ref_err, exact.abs().max().item() if exact.numel() else 0.0)
    verdict = {"err": err, "ref_err": ref_err, "bound": bound, "ok": True}
    try:
        if loss and dtype == torch.float32:
            assert err <= bound, f"relative error {err:.3e} exceeds the losses' fp32 bound {bound:.3e}"
        else:
            tolerance.check_close(out, exact, low, dtype, "output", atol)
    except AssertionError as exc:
        verdict.update(ok=False, error=str(exc).strip().splitlines()[0][:300])
    return verdict


def record(row: dict, outputs: dict, dtype: torch.dtype, **rule) -> None:
    """Judge every named output (out, exact, low); the row keeps the worst one (by err / bound) and ok = all ok."""
    verdicts = {name: judge(*t, dtype, **rule) for name, t in outputs.items()}
    worst = max(verdicts, key=lambda n: (not verdicts[n]["ok"], verdicts[n]["err"] / max(verdicts[n]["bound"], 1e-30)))
    row.update(verdicts[worst], ok=all(v["ok"] for v in verdicts.values()))
    if len(verdicts) > 1:
        row["worst"] = worst


@contextlib.contextmanager
def case(rows: list, **label):
    """One row of a section. The body fills it in; an exception marks it failed with the error and the
    section goes on to its next row."""
    row, start = dict(label), time.monotonic()
    rows.append(row)
    try:
        yield row
    except Exception as exc:  # noqa: BLE001 (recorded: one bug must not end the run)
        row.update(ok=False, error=f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}")
    row["s"] = round(time.monotonic() - start, 1)


# ----------------------------------------------------------------------------------- check section
def dense_attention(q, k, v, causal: bool, key_padding_mask=None):
    """fastclip.ref.attention (scores in the input dtype, softmax in fp32 or wider) plus the key-padding
    mask (B, Lk) bool, True = ignored, which the ref op lacks."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    keep = keep.tril() if causal else keep
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")).to(torch.promote_types(q.dtype, torch.float32)), -1)
    return probs.to(v.dtype) @ v


def attention_configs(q, k, v, causal: bool, key_padding_mask) -> dict:
    """The attention kernel launched once with every config autotuning may pick for this shape
    (kernels/attention.py::configs_for), as the launcher would: {config: output}."""
    B, H, Lq, Dh = q.shape
    block_d = max(16, triton.next_power_of_2(Dh))
    mask = q if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    mask_strides = (0, 0) if key_padding_mask is None else mask.stride()
    outs = {}
    for cfg in attn_kernel.configs_for(q.dtype == torch.float32, block_d, Lq):
        out = attn_kernel._empty_out(q)
        grid = (B * H, triton.cdiv(Lq, cfg.kwargs["BLOCK_M"]))
        attn_kernel._attn_fwd_kernel[grid](
            q, k, v, out, mask, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
            H, Lq, k.shape[2], math.log2(math.e) / math.sqrt(Dh), HEAD_DIM=Dh, BLOCK_D=block_d, CAUSAL=causal,
            HAS_MASK=key_padding_mask is not None, INTERPRET_BF16=attn_kernel.INTERPRETED and q.dtype == torch.bfloat16,
            **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        outs[f"config {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"] = out
    return outs


def check_attention(row, plan, ops, dtype, B, H, Lq, Lk, Dh, causal, padded):
    if Lq == Lk:  # strided views of one packed qkv tensor, as the model's qkv projection makes them
        q, k, v = rand((B, Lq, 3, H, Dh), Lq * Dh, plan, dtype).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (rand((B, H, n, Dh), i + Lk, plan, dtype) for i, n in enumerate((Lq, Lk, Lk)))
    kpm = None
    if padded:  # row b keeps its first Lk - b*Lk/B keys (at least one)
        lengths = torch.tensor([max(1, Lk - b * Lk // B) for b in range(B)], device=plan.device)
        kpm = torch.arange(Lk, device=plan.device)[None, :] >= lengths[:, None]
    exact = dense_attention(q.double(), k.double(), v.double(), causal, kpm)
    low = dense_attention(q, k, v, causal, kpm)
    outs = {"op": ops.attention(q, k, v, causal, key_padding_mask=kpm), **attention_configs(q, k, v, causal, kpm)}
    record(row, {name: (out, exact, low) for name, out in outs.items()}, dtype,
           atol=tolerance.ATTENTION_LOW_PRECISION_ATOL.get(dtype))


def check_layer_norm(row, plan, ops, dtype, M, N):
    x, r = rand((M, N), N, plan, dtype, 2.0, 0.5), rand((M, N), N + 1, plan, dtype)
    w, b = rand((N,), 2, plan, dtype, 0.1, 1.0), rand((N,), 3, plan, dtype, 0.1)
    d = [t.double() for t in (x, w, b)]
    y, s = ops.layer_norm(x, w, b, EPS, residual=r)
    (ye, se), (yl, sl) = ref.layer_norm(*d, EPS, residual=r.double()), ref.layer_norm(x, w, b, EPS, residual=r)
    record(row, {"plain": (ops.layer_norm(x, w, b, EPS), ref.layer_norm(*d, EPS), ref.layer_norm(x, w, b, EPS)),
                 "residual: y": (y, ye, yl), "residual: x + r": (s, se, sl)}, dtype)


def check_bias_act(row, plan, ops, dtype, M, N):
    x, b = rand((M, N), N, plan, dtype, 3.0), rand((N,), 1, plan, dtype, 0.5)
    record(row, {act: (ops.bias_act(x, b, act), ref.bias_act(x.double(), b.double(), act), ref.bias_act(x, b, act))
                 for act in ("gelu", "gelu_tanh", "quick_gelu", "none", "swiglu")}, dtype)


def check_rotary(row, plan, ops, dtype, B, H, L, Dh, start):
    q = rand((B, L, 3, H, Dh), 5, plan, dtype, 2.0).permute(2, 0, 3, 1, 4)[0]  # (B, H, L, Dh) view
    angles = rand((L - start, Dh // 2), 6, plan, torch.float32, 4.0)
    cos, sin = angles.cos(), angles.sin()
    record(row, {"rotary": (ops.rotary(q, cos, sin, start=start),
                            ref.rotary(q.double(), cos.double(), sin.double(), start=start),
                            ref.rotary(q, cos.to(dtype), sin.to(dtype), start=start))}, dtype)


def check_head(row, plan, ops, dtype, B, L, W, E, text, normalize):
    tokens = rand((B, L, W), W + E, plan, dtype, 2.0)
    ln_w, ln_b = rand((W,), 1, plan, dtype, 0.1, 1.0), rand((W,), 2, plan, dtype, 0.1)
    proj, proj_bias = rand((W, E), 3, plan, dtype, W ** -0.5), rand((E,), 4, plan, dtype, 0.1) if text else None
    # text towers gather the end-of-text rows by index; image towers pass the class token's strided view
    index = torch.randint(0, L, (B,), device=plan.device) if text else None
    x = tokens if text else tokens[:, 0]

    def run(op, *ts):
        return op(*ts[:3], EPS, ts[3], ts[4], normalize, index=index)

    params = (x, ln_w, ln_b, proj, proj_bias)
    exact = run(ref.normalize_project, *(None if t is None else t.double() for t in params))
    record(row, {"out": (run(ops.normalize_project, *params), exact, run(ref.normalize_project, *params))}, dtype)


def loss_features(n: int, d: int, dtype, plan: Plan, seed: int = 0):
    """L2-normalised image features and text features near their pairs, rounded to ``dtype``."""
    img = F.normalize(rand((n, d), seed, plan), dim=-1)
    txt = F.normalize(img + rand((n, d), seed + 1, plan), dim=-1)
    return img.to(dtype), txt.to(dtype)


def dense_loss(kind: str, img, txt, scale, bias):
    """Both losses written from their definitions (independent of OpenCLIP and fastclip)."""
    logits = scale * img @ txt.T + (bias if kind == "siglip" else 0.0)
    n = img.shape[0]
    if kind == "clip":
        labels = torch.arange(n, device=img.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    signs = 2 * torch.eye(n, dtype=logits.dtype, device=img.device) - 1
    return -F.logsigmoid(signs * logits).sum() / n


def loss_fn(kind: str, impl: str):
    """(img, txt, scale, bias) -> loss of one implementation: triton / torch (fastclip's backends),
    open_clip (the dense loss), float64 (``dense_loss``)."""
    if impl == "float64":
        return lambda i, t, s, b: dense_loss(kind, i, t, s, b)
    if impl == "open_clip":
        fn = oc_loss.ClipLoss() if kind == "clip" else oc_loss.SigLipLoss()
    else:
        cls = ClipLoss if kind == "clip" else SigLipLoss
        fn = cls(backend=impl, block_size=4096 if impl == "torch" else None)
    return (lambda i, t, s, b: fn(i, t, s)) if kind == "clip" else fn


def loss_and_grads(kind: str, impl: str, img, txt) -> dict:
    """Loss and every gradient of ``impl`` on (copies of) the features; float64 for impl="float64"."""
    wide = torch.float64 if impl == "float64" else torch.float32
    img, txt = (t.detach().to(wide if impl == "float64" else t.dtype).clone().requires_grad_() for t in (img, txt))
    scale, bias = (torch.tensor(v, dtype=wide, device=img.device, requires_grad=True) for v in
                   ((CLIP_SCALE, 0.0) if kind == "clip" else (SIGLIP_SCALE, SIGLIP_BIAS)))
    loss = loss_fn(kind, impl)(img, txt, scale, bias)
    loss.backward()
    out = {"loss": loss, "d_image": img.grad, "d_text": txt.grad, "d_logit_scale": scale.grad}
    if kind == "siglip":
        out["d_logit_bias"] = bias.grad
    return {k: v.detach() for k, v in out.items()}


def relative(ours: dict, exact: dict, low: dict) -> dict:
    """{output: (ours, exact, low)}, each divided by the max-abs of the exact value: gradients are ~1/N."""
    scale = {k: exact[k].double().abs().max().clamp_min(1e-30) for k in exact}
    return {k: (ours[k].double() / scale[k], exact[k].double() / scale[k], low[k].double() / scale[k]) for k in exact}


def check_loss(row, plan, dtype, kind, n, d):
    img, txt = loss_features(n, d, dtype, plan, seed=n + d)
    ours, exact = loss_and_grads(kind, "triton", img, txt), loss_and_grads(kind, "float64", img, txt)
    record(row, relative(ours, exact, loss_and_grads(kind, "open_clip", img, txt)), dtype, loss=True,
           logit_scale=CLIP_SCALE if kind == "clip" else SIGLIP_SCALE)


def check_section(rows: list, plan: Plan, run) -> None:
    ops = get_ops("triton")
    for name, dtype in DTYPES.items():
        for shape in plan.attention:
            B, H, Lq, Lk, Dh, causal, padded = shape
            label = f"B={B} H={H} L={Lq}x{Lk} Dh={Dh}" + " causal" * causal + " key-padding" * padded
            with case(rows, op="attention", shape=label, dtype=name) as row:
                check_attention(row, plan, ops, dtype, *shape)
        for M, N in plan.layer_norm:
            with case(rows, op="layer_norm", shape=f"{M} x {N}", dtype=name) as row:
                check_layer_norm(row, plan, ops, dtype, M, N)
        for M, N in plan.bias_act:
            with case(rows, op="bias_act", shape=f"{M} x {N}", dtype=name) as row:
                check_bias_act(row, plan, ops, dtype, M, N)
        for shape in plan.rotary:
            with case(rows, op="rotary", shape="B={} H={} L={} Dh={} start={}".format(*shape), dtype=name) as row:
                check_rotary(row, plan, ops, dtype, *shape)
        for B, L, W, E, text, normalize in plan.heads:
            label = f"B={B} W={W} E={E}" + (" text (index, bias)" if text else " class token") + " L2" * normalize
            with case(rows, op="normalize_project", shape=label, dtype=name) as row:
                check_head(row, plan, ops, dtype, B, L, W, E, text, normalize)
        for kind in ("clip", "siglip"):
            for n, d in plan.losses:
                with case(rows, op=f"{kind} loss fwd+bwd", shape=f"N={n} D={d}", dtype=name) as row:
                    check_loss(row, plan, dtype, kind, n, d)


# ---------------------------------------------------------------------------------- timing section
def kernel_pair(op: str, w, dtype, plan: Plan, ops):
    """(fastclip fn, peer name, peer fn, gm.Op of the kernel) for ``op`` at workload ``w``'s shapes."""
    def t(*shape, scale=1.0, shift=0.0):
        return rand(shape, len(shape), plan, dtype, scale, shift)

    if op == "attention":
        q, k, v = t(w.B, w.L, 3, w.H, w.Dh).permute(2, 0, 3, 1, 4).unbind(0)
        return (lambda: ops.attention(q, k, v, w.causal), "F.scaled_dot_product_attention",
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=w.causal),
                gm.attention(w.B, w.H, w.L, w.Dh, w.causal))
    if op.startswith("layer_norm"):
        x, r, lw, lb = t(w.tokens, w.W), t(w.tokens, w.W), t(w.W, scale=0.1, shift=1.0), t(w.W, scale=0.1)
        if op == "layer_norm":
            return (lambda: ops.layer_norm(x, lw, lb, EPS), "F.layer_norm",
                    lambda: F.layer_norm(x, (w.W,), lw, lb, EPS), gm.layer_norm(w.tokens, w.W))
        return (lambda: ops.layer_norm(x, lw, lb, EPS, residual=r), "x + r, F.layer_norm",
                lambda: F.layer_norm(x + r, (w.W,), lw, lb, EPS), gm.layer_norm(w.tokens, w.W, residual=True))
    if op == "bias_act":
        h, hb = t(w.tokens, w.Mw), t(w.Mw, scale=0.1)
        return (lambda: ops.bias_act(h, hb, w.act), f"eager {w.act}(x + bias)",
                lambda: ref.bias_act(h, hb, w.act), gm.bias_act(w.tokens, w.Mw, w.act))
    tokens, lw, lb, proj = t(w.B, w.L, w.W), t(w.W, shift=1.0), t(w.W), t(w.W, w.E, scale=w.W ** -0.5)
    pooled = tokens[:, 0]
    return (lambda: ops.normalize_project(pooled, lw, lb, EPS, proj, None, True),
            "F.normalize(F.layer_norm(x) @ proj)",
            lambda: F.normalize(F.layer_norm(pooled, (w.W,), lw, lb, EPS) @ proj, dim=-1),
            gm.normalize_project(w.B, w.W, w.E))


def timing_section(rows: list, plan: Plan, run) -> None:
    ops = get_ops("triton")
    for w in plan.workloads:
        for name in LOW:
            for op in ("attention", "layer_norm", "layer_norm+residual", "bias_act", "normalize_project"):
                if op == "normalize_project" and w.E is None:
                    continue
                heads = f" H={w.H}" + " causal" * w.causal if op == "attention" else ""
                shape = f"{w.label}: B={w.B} L={w.L} W={w.W}{heads}"
                with case(rows, op=op, shape=shape, dtype=name) as row:
                    ours, peer_name, peer, model = kernel_pair(op, w, DTYPES[name], plan, ops)
                    ms, peer_ms = time_ms(ours, plan), time_ms(peer, plan)
                    rate = (f"{model.flops / ms / 1e9:.0f} TFLOP/s" if model.kind != "memory"
                            else f"{model.bytes / ms / 1e9:.2f} TB/s")
                    row.update(fastclip_ms=ms, peer=peer_name, peer_ms=peer_ms, speedup=peer_ms / ms,
                               fastclip_rate=rate, H100_roofline_us=model.time(gm.H100) * 1e6)


# ------------------------------------------------------------------------------------ loss section
def loss_step(impl: str, img, txt):
    """One ClipLoss forward + backward of ``impl`` (fresh gradients each call)."""
    img, txt = img.detach().requires_grad_(), txt.detach().requires_grad_()
    scale = torch.tensor(CLIP_SCALE, device=img.device, requires_grad=True)
    fn = loss_fn("clip", impl)

    def step():
        img.grad = txt.grad = scale.grad = None
        fn(img, txt, scale, None).backward()
    return step


def big_loss(row: dict, plan: Plan, dtype) -> None:
    n_big = plan.loss_n[0]
    img, txt = loss_features(n_big, plan.loss_dim, dtype, plan)
    ours = loss_and_grads("clip", "triton", img, txt)
    exact = loss_and_grads("clip", "torch", img.float(), txt.float())  # fp32 torch tiles, float64 sums
    low = None
    row.update(N=n_big, fastclip_ms=time_ms(loss_step("triton", img, txt), plan))
    for n in plan.loss_n:  # OpenCLIP at the largest N it fits
        try:
            if plan.dense_cap is not None and n > plan.dense_cap:
                raise torch.OutOfMemoryError(f"simulated by --smoke above N={plan.dense_cap}")
            if n == n_big:
                low = loss_and_grads("clip", "open_clip", img, txt)
            row.update(open_clip_N=n, open_clip_ms=time_ms(loss_step("open_clip", img[:n], txt[:n]), plan))
            break
        except torch.OutOfMemoryError as exc:
            row.setdefault("open_clip_oom", []).append(f"N={n}: {(str(exc).splitlines() or [''])[0][:120]}")
        finally:
            free_memory()
    fit = row.get("open_clip_N")
    if fit:
        at_n = row["fastclip_ms"] if fit == n_big else time_ms(loss_step("triton", img[:fit], txt[:fit]), plan)
        row.update(fastclip_ms_at_open_clip_N=at_n, speedup=row["open_clip_ms"] / at_n)
    # OpenCLIP's error in this dtype sets the bound when it fits at N; otherwise the bar for two loss
    # backends on the same inputs (LOSS_BACKEND_REL, or the dtype's atol where it has none)
    if low is not None:
        record(row, relative(ours, exact, low), dtype, loss=True)
    else:
        record(row, relative(ours, exact, exact), dtype, atol=tolerance.LOSS_BACKEND_REL.get(dtype), loss=True)
    row["bound_from"] = "open_clip in this dtype" if low is not None else "backend bar (open_clip did not fit)"


def loss_section(rows: list, plan: Plan, run) -> None:
    for name in LOW:
        with case(rows, op="clip loss fwd+bwd", dtype=name, D=plan.loss_dim) as row:
            big_loss(row, plan, DTYPES[name])


# ---------------------------------------------------------------------------------- models section
def build_pair(arch: str, precision: str, plan: Plan):
    """fastclip (backend="triton") and open_clip holding the same random weights (perturbed so LayerNorm
    weights and biases are not 1 and 0), fastclip's weights given to open_clip as bench/peers/ does."""
    fc = fastclip.create_model(arch, device=plan.device, precision=precision, backend="triton", seed=0)
    with torch.no_grad():
        for i, p in enumerate(fc.parameters()):
            p.add_(rand(p.shape, i, plan, p.dtype, 0.02))
    oc = open_clip.create_model(arch, precision=precision, device=plan.device).eval()
    oc.load_state_dict(openclip_state_dict(fc.state_dict()), strict=True)
    return fc, oc


def measure_model(row: dict, plan: Plan, run, arch: str, batch: int, precision: str) -> None:
    fc, oc = build_pair(arch, precision, plan)
    size = fc.cfg.vision.image_size
    x = rand((batch, 3, size, size), 7, plan, DTYPES[precision])
    row.update(ok=True)
    with torch.inference_mode():
        want = oc.encode_image(x).float()
        impls = {"fastclip": fc.encode_image, "open_clip": oc.encode_image}
        if run.left() >= plan.compile_min_s:
            start = time.perf_counter()
            impls["torch.compile"] = torch.compile(oc.encode_image, dynamic=False, backend=plan.compile_backend)
            impls["torch.compile"](x)
            row["compile_s"] = time.perf_counter() - start
        else:
            row["torch.compile"] = f"skipped: {run.left():.0f} s of the time budget left"
        for name, fn in impls.items():
            if name != "open_clip":
                cos = F.cosine_similarity(fn(x).float(), want, dim=-1).min().item()
                row[f"{name}_min_cos"] = cos
                row["ok"] = row["ok"] and cos >= tolerance.MIN_COSINE
            row[f"{name}_img_s"] = batch / time_ms(lambda fn=fn: fn(x), plan, rep_ms=500) * 1e3
    for peer in ("open_clip", "torch.compile"):
        if f"{peer}_img_s" in row:
            row[f"vs_{peer}"] = row["fastclip_img_s"] / row[f"{peer}_img_s"]
    with contextlib.suppress(NotImplementedError):  # the model covers class-token pooling only
        ops = gm.vision_ops(fc.cfg.vision, fc.cfg.embed_dim, batch, "triton")
        row["H100_expected_img_s"] = batch / gm.time_of(ops, gm.H100, gm.EXPECTED)


def models_section(rows: list, plan: Plan, run) -> None:
    for arch, batch in plan.models:
        for precision in LOW:
            with case(rows, model=arch, dtype=precision, batch=batch) as row:
                if run.left() < 20:
                    row["skipped"] = f"{run.left():.0f} s of the time budget left"
                    continue
                try:
                    measure_model(row, plan, run, arch, batch, precision)
                finally:
                    torch._dynamo.reset()  # compiled graphs hold the model's weights
                    free_memory()


# ------------------------------------------------------------------------------------------ report
def environment(smoke: bool) -> dict:
    env = {"gpu": "none (CPU run)", "torch": torch.__version__, "triton": triton.__version__,
           "open_clip": open_clip.__version__, "fastclip": fastclip.__version__, "python": platform.python_version(),
           "cuda_runtime": torch.version.cuda, "smoke": smoke, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = "unknown (nvidia-smi failed)"
    return env


def cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "**NO**"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "; ".join(map(str, v))
    return "" if v is None else str(v).replace("|", "/")


def markdown_section(name: str, entry: dict) -> str:
    lines = [f"## {name}: {entry['status']} ({entry['seconds']} s)", ""]
    if entry.get("error"):
        lines += ["```", entry["error"].strip(), "```", ""]
    rows = entry["rows"]
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


class Run:
    """One invocation's results (written to --out after every section) and its time budget."""

    def __init__(self, out: Path, budget_s: float, smoke: bool):
        self.out, self.deadline = out, START + budget_s
        self.results = {"env": environment(smoke), "sections": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str, fn, plan: Plan, min_s: float) -> None:
        entry = {"status": "ok", "seconds": 0.0, "rows": []}
        self.results["sections"][name] = entry
        start = time.monotonic()
        if self.left() < min_s:
            entry.update(status="skipped", error=f"time budget: {self.left():.0f} s left, needs ~{min_s:.0f} s")
        else:
            try:
                fn(entry["rows"], plan, self)
            except Exception:  # noqa: BLE001 (recorded; the next section still runs)
                entry.update(status="error", error=traceback.format_exc()[-3000:])
            free_memory()
        if entry["status"] == "ok" and any(r.get("ok") is False for r in entry["rows"]):
            entry["status"] = "failed"
        entry["seconds"] = round(time.monotonic() - start, 1)
        self.write()
        print(markdown_section(name, entry), flush=True)

    def write(self) -> None:
        self.results["ok"] = all(s["status"] in ("ok", "skipped") for s in self.results["sections"].values())
        self.results["seconds"] = round(time.monotonic() - START, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))
        env = "\n".join(f"- {k}: {v}" for k, v in self.results["env"].items())
        body = "".join(markdown_section(n, e) for n, e in self.results["sections"].items())
        (self.out / "gpu_check.md").write_text(f"# fastclip GPU check\n\n{env}\n\n{body}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--budget-s", type=float, default=450.0, help="time guard for the whole run (seconds)")
    parser.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes (for CI)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := sorted(set(chosen) - set(SECTIONS)):
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke to check the script on a CPU")
    plan = SMOKE if args.smoke else FULL
    torch.set_float32_matmul_precision("highest")  # fp32 references without TF32
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:  # the tiny model, registered with both libraries from <out>/smoke-config/
        folder = tiny.write_configs(args.out / "smoke-config", [SMOKE_MODEL])
        fastclip.add_model_config(folder)
        open_clip.add_model_config(folder)
    run = Run(args.out, args.budget_s, args.smoke)
    print("\n".join(f"{k}: {v}" for k, v in run.results["env"].items()) + "\n", flush=True)
    steps = {"check": (check_section, 0), "timing": (timing_section, 20), "loss": (loss_section, 20),
             "models": (models_section, 30)}
    for name in SECTIONS:
        if name in chosen:
            run.section(name, steps[name][0], plan, steps[name][1])
    run.write()
    status = ", ".join(f"{n} {s['status']} ({s['seconds']} s)" for n, s in run.results["sections"].items())
    print(f"{status}; {run.results['seconds']} s in all; results in {args.out}/gpu_check.{{json,md}}")
    return 0 if run.results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
