"""Fused tower head (Triton): gather the pooled token -> LayerNorm -> @ proj (+ bias) -> L2 normalise.

    out = normalize_project(x, ln_weight, ln_bias, eps, proj, proj_bias=None, normalize=False)
    out = normalize_project(tokens, ..., index=idx)   # tokens (B, L, W), idx (B,): pooled position

Reference: ``fastclip.ref.normalize_project`` on the pooled rows ``x[arange(B), index]``. The final
LayerNorm runs on the B pooled rows only (never on all B*L tokens), the gather reads them in place
(any batch/sequence strides, nothing copied), and the (B, E) output is written once.

Kernel layout (chosen for the small B of a tower head; FLOPs are 2*B*W*E, under 0.1 % of a tower):
one program owns BLOCK_B = 16 pooled rows (16 is the smallest M of an MMA tile, so B = 1..16 costs one
program).
  1. LayerNorm statistics: two passes over the row in BLOCK_K chunks (mean, then the centred sum of
     squares; fp32), reading only the pooled rows.
  2. Projection: for each BLOCK_E column block of proj, loop over W in BLOCK_K chunks: normalise the
     (BLOCK_B, BLOCK_K) chunk, round it to the input dtype (what the reference's LayerNorm output is)
     and ``tl.dot`` it with the (BLOCK_K, BLOCK_E) proj tile into an fp32 accumulator. fp16/bf16 use
     tensor cores; fp32 uses input_precision="ieee" (no TF32) so fp32 meets fp32 tolerances.
     Add proj_bias, store, and accumulate each row's sum of squares.
  3. With ``normalize``: a CTA barrier, then each output block is re-read and scaled by
     1 / max(||y||, 1e-12) (F.normalize). The norm needs every E block of a row, so with ``normalize``
     one program walks all of E (grid (cdiv(B, 16), 1)); without it the E blocks are split across
     programs (grid (cdiv(B, 16), cdiv(E, BLOCK_E))) for more parallelism.
  Why not one row per program with a loop over E blocks (no tl.dot)? Every program then streams the
  whole proj (W*E*2 bytes, 1.5 MiB for ViT-L) from L2; 16 rows per program read it 16x less often and
  the tensor cores do the math. For B <= 16 both make one pass over proj per program, so nothing is lost.
  Without proj (identity), the same loop normalises W-column blocks instead.

Tile heuristic for A100/H100 (no autotune; the head is latency-bound): BLOCK_K = 64, BLOCK_E = 128,
8 warps, 2 stages: the proj tile is 64x128 (16 KiB in fp16, 32 KiB in fp32), double-buffered through
cp.async = 20-41 KiB shared memory (A100 164 KiB, H100 228 KiB), and 128-column output blocks keep
the E loop short (4-9 trips for E = 512..1152). 8 warps, not 4: the compile check (ptxas -v) showed
the L2-normalising variant at 4 warps hitting 128 registers/thread and spilling (fp32 on sm_80: 4 KiB
of spill stores; fp16/bf16 on sm_90: 8 bytes); at 8 warps every variant and dtype uses <= 128
registers with no spills on sm_80 and sm_90. For fp16/bf16, BLOCK_B grows to 32/64 only for very
large B (> 2048 / 8192 rows), where re-reading proj from L2 per 16 rows would start to matter (64 rows
use wgmma on sm_90). fp32 stays at 16 rows: its dot is FMA, not tensor cores, so bigger row tiles buy
nothing, and at 32/64 rows it spills on sm_80.

Interpreter (TRITON_INTERPRET=1, CPU tensors): Triton 3.8's interpreter computes ``tl.dot`` on bf16
operands wrongly and truncates fp32 -> bf16 casts. INTERPRET_BF16 (set by the launcher only when
interpreting bf16) rounds to bf16 by hand and upcasts the (already bf16-rounded) dot operands to fp32
in ``mma_operand``, so the interpreter still checks the bf16 numerics; compiled code never takes it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import interpret_bf16, interpreting, mma_operand, round_to

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_K, BLOCK_E = 64, 128


@triton.jit
def _normalize_project_kernel(
    X,  # (B, L, W) tokens (L = 1 for pooled rows), strides stride_xb, stride_xl, unit column stride
    Index,  # (B,) int32/int64 pooled position per row (unused unless HAS_INDEX)
    LnW, LnB,  # (W,) LayerNorm weight / bias (unused unless HAS_LN_W / HAS_LN_B)
    P,  # (W, E) projection, strides stride_pw, stride_pe (unused unless HAS_PROJ)
    PB,  # (E,) projection bias (unused unless HAS_PROJ_BIAS)
    Out,  # (B, E) output, contiguous, x's dtype
    B, W, E,  # pooled rows, width, output dim (E == W without proj)
    stride_xb, stride_xl, stride_pw, stride_pe,
    eps,  # LayerNorm epsilon (fp32)
    e_iters,  # E blocks walked by each program: cdiv(E, BLOCK_E) with NORMALIZE, else 1
    HAS_INDEX: tl.constexpr, HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr, HAS_PROJ: tl.constexpr,
    HAS_PROJ_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,  # interpreter-only bf16 fixes (see round_to, mma_operand)
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    row_ok = rows < B
    pos = tl.zeros([BLOCK_B], tl.int64)
    if HAS_INDEX:
        pos = tl.load(Index + rows, mask=row_ok, other=0).to(tl.int64)
    x_row = X + rows.to(tl.int64) * stride_xb + pos * stride_xl  # (BLOCK_B,) pointers to the pooled rows
    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    offs_e = tl.arange(0, BLOCK_E)  # (BLOCK_E,)

    # 1. LayerNorm statistics of the pooled rows (fp32, two passes: mean, centred variance).
    acc_sum = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, W, BLOCK_K):
        k_ok = (k0 + offs_k) < W
        x = tl.load(x_row[:, None] + (k0 + offs_k)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc_sum += tl.sum(x.to(tl.float32), axis=1)
    mean = acc_sum / W
    acc_var = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, W, BLOCK_K):
        k_ok = (k0 + offs_k) < W
        m = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_row[:, None] + (k0 + offs_k)[None, :], mask=m, other=0.0)
        xc = tl.where(m, x.to(tl.float32) - mean[:, None], 0.0)
        acc_var += tl.sum(xc * xc, axis=1)
    rstd = 1.0 / tl.sqrt(acc_var / W + eps)

    # 2. Projection, one BLOCK_E column block at a time.
    sq = tl.zeros([BLOCK_B], tl.float32)
    e_first = tl.program_id(1) * e_iters
    for it in range(0, e_iters):
        cols = (e_first + it) * BLOCK_E + offs_e  # (BLOCK_E,)
        e_ok = cols < E
        if HAS_PROJ:
            acc = tl.zeros([BLOCK_B, BLOCK_E], tl.float32)
            for k0 in range(0, W, BLOCK_K):
                ks = k0 + offs_k
                k_ok = ks < W
                x = tl.load(x_row[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                xn = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]  # (BLOCK_B, BLOCK_K)
                if HAS_LN_W:
                    xn = xn * tl.load(LnW + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
                if HAS_LN_B:
                    xn = xn + tl.load(LnB + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
                xn = tl.where(k_ok[None, :], xn, 0.0)
                a = mma_operand(round_to(xn, P.dtype.element_ty, INTERPRET_BF16), INTERPRET_BF16)
                p = tl.load(P + ks[:, None] * stride_pw + cols[None, :] * stride_pe,
                            mask=k_ok[:, None] & e_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_E)
                acc = tl.dot(a, mma_operand(p, INTERPRET_BF16), acc, input_precision="ieee")
        else:  # identity projection: E == W, normalise this column block directly
            x = tl.load(x_row[:, None] + cols[None, :], mask=row_ok[:, None] & e_ok[None, :], other=0.0)
            acc = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
            if HAS_LN_W:
                acc = acc * tl.load(LnW + cols, mask=e_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_LN_B:
                acc = acc + tl.load(LnB + cols, mask=e_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_PROJ_BIAS:
            acc = acc + tl.load(PB + cols, mask=e_ok, other=0.0).to(tl.float32)[None, :]
        out_mask = row_ok[:, None] & e_ok[None, :]
        acc = tl.where(out_mask, acc, 0.0)
        if NORMALIZE:
            sq += tl.sum(acc * acc, axis=1)
        out_ptrs = Out + rows.to(tl.int64)[:, None] * E + cols[None, :]
        tl.store(out_ptrs, round_to(acc, Out.dtype.element_ty, INTERPRET_BF16), mask=out_mask)

    # 3. L2 normalisation: every E block of these rows is written; rescale them in place.
    if NORMALIZE:
        tl.debug_barrier()  # this program's stores above are visible to all its threads
        inv = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
        for it in range(0, e_iters):
            cols = (e_first + it) * BLOCK_E + offs_e
            out_mask = row_ok[:, None] & (cols < E)[None, :]
            out_ptrs = Out + rows.to(tl.int64)[:, None] * E + cols[None, :]
            y = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32) * inv[:, None]
            tl.store(out_ptrs, round_to(y, Out.dtype.element_ty, INTERPRET_BF16), mask=out_mask)


def block_config(rows: int, dtype: torch.dtype = torch.float16) -> dict:
    """Launch parameters for B pooled rows (see the module docstring for the rationale)."""
    block_b = 16 if rows <= 2048 or dtype == torch.float32 else (32 if rows <= 8192 else 64)
    return {"BLOCK_B": block_b, "BLOCK_K": BLOCK_K, "BLOCK_E": BLOCK_E, "num_warps": 8, "num_stages": 2}


def _check(x, ln_weight, ln_bias, proj, proj_bias, index) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"normalize_project: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.device.type != "cuda" and not (interpreting() and x.device.type == "cpu"):
        raise ValueError(f"normalize_project: x is on {x.device}; the Triton kernel needs a CUDA tensor "
                         "(or a CPU tensor with TRITON_INTERPRET=1)")
    if x.ndim == 3:
        if index is None:
            raise ValueError(f"normalize_project: token states {tuple(x.shape)} (B, L, W) need index= the "
                             "pooled position of each row, shape (B,)")
        if index.shape != (x.shape[0],) or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"normalize_project: index must be an int32/int64 tensor of shape ({x.shape[0]},), "
                             f"got {index.dtype} {tuple(index.shape)}")
        if index.device != x.device:
            raise ValueError(f"normalize_project: index is on {index.device}, x on {x.device}")
        capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if index.numel() and not capturing and (int(index.min()) < 0 or int(index.max()) >= x.shape[1]):
            raise IndexError(f"normalize_project: index values must lie in [0, {x.shape[1]}), "
                             f"got [{int(index.min())}, {int(index.max())}]")
    elif x.ndim == 2:
        if index is not None:
            raise ValueError(f"normalize_project: index= is for token states (B, L, W); x is already pooled "
                             f"rows {tuple(x.shape)} (B, W)")
    else:
        raise ValueError(f"normalize_project: x must be pooled rows (B, W) or token states (B, L, W), "
                         f"got shape {tuple(x.shape)}")
    W = x.shape[-1]
    if W == 0:
        raise ValueError("normalize_project: x has width 0")
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if p is not None and (p.shape != (W,) or p.device != x.device or not p.is_floating_point()):
            raise ValueError(f"normalize_project: {name} must be a float tensor of shape ({W},) on {x.device}, "
                             f"got {p.dtype} {tuple(p.shape)} on {p.device}")
    E = W
    if proj is not None:
        if proj.ndim != 2 or proj.shape[0] != W:
            raise ValueError(f"normalize_project: proj must have shape ({W}, E) for width {W}, got {tuple(proj.shape)}")
        if proj.dtype != x.dtype or proj.device != x.device:
            raise ValueError(f"normalize_project: proj must match x ({x.dtype} on {x.device}), "
                             f"got {proj.dtype} on {proj.device}")
        E = proj.shape[1]
    if proj_bias is not None and (proj_bias.shape != (E,) or proj_bias.device != x.device
                                  or not proj_bias.is_floating_point()):
        raise ValueError(f"normalize_project: proj_bias must be a float tensor of shape ({E},) on {x.device}, "
                         f"got {proj_bias.dtype} {tuple(proj_bias.shape)} on {proj_bias.device}")


def _launch(x, ln_weight, ln_bias, eps, proj, proj_bias, normalize, index):
    _check(x, ln_weight, ln_bias, proj, proj_bias, index)
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, W = x.shape[0], x.shape[-1]
    E = proj.shape[1] if proj is not None else W
    out = torch.empty((B, E), dtype=x.dtype, device=x.device)
    if B == 0 or E == 0:
        return out
    stride_xl = x.stride(1) if x.ndim == 3 else 0
    cfg = block_config(B, x.dtype)
    e_blocks = triton.cdiv(E, cfg["BLOCK_E"])
    e_iters = e_blocks if normalize else 1
    grid = (triton.cdiv(B, cfg["BLOCK_B"]), e_blocks // e_iters)
    _normalize_project_kernel[grid](
        x, index if index is not None else x, ln_weight if ln_weight is not None else x,
        ln_bias if ln_bias is not None else x, proj if proj is not None else x,
        proj_bias if proj_bias is not None else x, out,
        B, W, E, x.stride(0), stride_xl,
        proj.stride(0) if proj is not None else 0, proj.stride(1) if proj is not None else 0,
        float(eps), e_iters,
        HAS_INDEX=index is not None, HAS_LN_W=ln_weight is not None, HAS_LN_B=ln_bias is not None,
        HAS_PROJ=proj is not None, HAS_PROJ_BIAS=proj_bias is not None, NORMALIZE=bool(normalize),
        INTERPRET_BF16=interpret_bf16(x.dtype), **cfg,
    )
    return out


@torch.library.custom_op("fastclip::normalize_project", mutates_args=())
def _normalize_project_op(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                          eps: float, proj: torch.Tensor | None, proj_bias: torch.Tensor | None,
                          normalize: bool, index: torch.Tensor | None) -> torch.Tensor:
    return _launch(x, ln_weight, ln_bias, eps, proj, proj_bias, normalize, index)


@_normalize_project_op.register_fake
def _(x, ln_weight, ln_bias, eps, proj, proj_bias, normalize, index):
    E = proj.shape[1] if proj is not None else x.shape[-1]
    return x.new_empty((x.shape[0], E))


def normalize_project(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float,
                      proj: torch.Tensor | None, proj_bias: torch.Tensor | None = None, normalize: bool = False,
                      upcast: bool = False, index: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm -> @ proj (+ proj_bias) -> optional L2 normalisation, as ``ref.normalize_project``.

    x: pooled rows (B, W), or token states (B, L, W) with ``index`` (B,) the pooled position per row
    (0 for a class token, the end-of-text position for CLIP text). proj: (W, E) or None (identity),
    proj_bias: (E,) or None -> (B, E) in x's dtype. ``upcast`` (the reference ops' test switch) runs the
    kernel on fp32 copies and returns x's dtype.
    """
    if upcast and x.dtype != torch.float32:
        f = lambda t: None if t is None else t.float()  # noqa: E731
        return _normalize_project_op(x.float(), f(ln_weight), f(ln_bias), float(eps), f(proj), f(proj_bias),
                                     bool(normalize), index).to(x.dtype)
    return _normalize_project_op(x, ln_weight, ln_bias, float(eps), proj, proj_bias, bool(normalize), index)


def _compile_specs() -> list[dict]:
    """The model's variants (class-token / end-of-text gather, bias, normalise, identity) per dtype."""
    specs = []
    variants = [  # (HAS_INDEX, HAS_PROJ, HAS_PROJ_BIAS, NORMALIZE, B): B picks BLOCK_B 16 / 32 / 64
        (False, True, False, False, 16), (False, True, False, True, 16), (True, True, True, True, 16),
        (False, False, False, True, 16), (True, True, True, True, 4096), (True, True, True, True, 16384),
    ]
    for dtype, torch_dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for has_index, has_proj, has_pb, norm, rows in variants:
            cfg = block_config(rows, torch_dtype)
            if rows > 16 and cfg["BLOCK_B"] == 16:
                continue  # fp32 keeps 16-row tiles at every B: already listed
            specs.append({
                "name": (f"normalize_project_{dtype}{'_index' if has_index else ''}{'' if has_proj else '_noproj'}"
                         f"{'_bias' if has_pb else ''}{'_l2' if norm else ''}_B{cfg['BLOCK_B']}"),
                "kernel": _normalize_project_kernel,
                "signature": {"X": f"*{dtype}", "Index": "*i64", "LnW": f"*{dtype}", "LnB": f"*{dtype}",
                              "P": f"*{dtype}", "PB": f"*{dtype}", "Out": f"*{dtype}", "B": "i32", "W": "i32",
                              "E": "i32", "stride_xb": "i32", "stride_xl": "i32", "stride_pw": "i32",
                              "stride_pe": "i32", "eps": "fp32", "e_iters": "i32"},
                "constexprs": {"HAS_INDEX": has_index, "HAS_LN_W": True, "HAS_LN_B": True, "HAS_PROJ": has_proj,
                               "HAS_PROJ_BIAS": has_pb, "NORMALIZE": norm, "BLOCK_B": cfg["BLOCK_B"],
                               "BLOCK_K": cfg["BLOCK_K"], "BLOCK_E": cfg["BLOCK_E"], "INTERPRET_BF16": False,
                               # a contiguous proj has unit column stride; the JIT specialises ints == 1
                               "stride_pe": 1 if has_proj else 0, **({} if norm else {"e_iters": 1})},
                "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                # 16-byte aligned pointers and the multiple-of-16 ints the JIT marks so at CLIP sizes
                "aligned": ["X", "LnW", "LnB", "P", "PB", "Out", "W", "E", "stride_xb"]
                           + (["stride_xl"] if has_index else []) + (["stride_pw"] if has_proj else []),
                "tensor_cores": has_proj and dtype != "fp32",
            })
    return specs


COMPILE_SPECS = _compile_specs()
