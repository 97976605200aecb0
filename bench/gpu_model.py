"""A roofline MODEL of fastclip's GPU path: FLOPs and HBM bytes per op and per whole encoder.

Nothing here is a measurement: no machine we build on has a GPU (DESIGN.md). The model states, for an
A100 and an H100 SXM, the lower bound each kernel's FLOPs and bytes impose, and an "expected" estimate
under stated efficiency assumptions. The GPU benches (bench/bench_<op>.py, bench/bench_gpu_e2e.py)
report their measured TFLOP/s and GB/s against the same FLOPs and bytes, so model and measurement can
be put side by side once a GPU is available.

    python bench/gpu_model.py --markdown                   # every table, as pasted into docs/gpu.md
    python bench/gpu_model.py --update-doc docs/gpu.md     # rewrite the generated sections in place
    python bench/gpu_model.py --sass-counts                # re-derive SASS_INSTR (compiles kernels, ~10 s)

What each op costs (fp16/bf16 activations, ``s`` = 2 bytes per element)
- GEMMs stay in cuBLAS (kernels/ops.py): ``2·M·N·K`` tensor-core FLOPs; bytes = A + B + C once each.
- attention (kernels/attention.py): useful FLOPs ``4·B·H·Lq·Lk·Dh`` (``Lk(Lk+1)/2`` visible scores
  per head when causal); executed tensor FLOPs count every whole (BLOCK_M x BLOCK_N) tile visited and
  the head dim padded to BLOCK_D = next_pow2(Dh); one exp2 per executed score on the SFUs; bytes =
  q, k, v read once and o written once (K/V re-reads by other query tiles hit L2).
- layer_norm / bias_act (memory-bound): bytes = every input and output once; the third roof is
  instruction issue (4 warp-instructions per clock per SM), with per-element SASS instruction counts
  taken from the compiled sm_80 kernels (SASS_INSTR; static counts from nvdisasm, not profiles).
- normalize_project: ``2·B·W·E`` tensor FLOPs; bytes = pooled rows + proj + output (+ its re-read and
  re-write for the L2 normalisation).
- eager / reference paths: one HBM round trip per PyTorch kernel, as the eager graph runs them.
- ``time(op) = max(tensor, fp32 ALU, issue, SFU, HBM) + launches x gap``; an encoder is the sum over
  its ops (no overlap between kernels, no wave-quantisation or tail effects, L2 reuse between kernels
  ignored: do_bench clears L2 between runs; in a forward pass the smaller activations may partly hit L2).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

S = 2  # bytes per fp16/bf16 element


# --------------------------------------------------------------------------------------------- GPUs
@dataclass(frozen=True)
class GPU:
    name: str
    tensor: float  # fp16/bf16 dense tensor-core FLOP/s
    fp32: float  # fp32 FLOP/s on the FMA pipes (no tensor cores)
    hbm: float  # HBM bytes/s
    sms: int
    clock: float  # Hz, for the per-SM rates below

    @property
    def sfu(self) -> float:
        """exp2 / rcp / ... per second: 16 per clock per SM."""
        return 16 * self.sms * self.clock

    @property
    def issue(self) -> float:
        """Thread-instructions per second: 4 schedulers x 1 warp-instruction (32 threads) per clock per SM."""
        return 128 * self.sms * self.clock


A100 = GPU("A100", 312e12, 19.5e12, 2.0e12, 108, 1.41e9)
H100 = GPU("H100 SXM", 989e12, 67e12, 3.35e12, 132, 1.83e9)
GPUS = (A100, H100)


@dataclass(frozen=True)
class Efficiency:
    """Fractions of each peak that are assumed reachable, and the GPU idle time per kernel launch."""

    name: str
    gemm: float = 1.0  # cuBLAS GEMMs, fraction of tensor peak
    attention: float = 1.0  # the flash kernel's MMAs, fraction of tensor peak
    hbm: float = 1.0  # every kernel, fraction of HBM bandwidth
    launch_s: float = 0.0  # idle gap between consecutive kernels (eager launches, CPU running ahead)


ROOFLINE = Efficiency("roofline")  # every peak reached, no gaps: a lower bound on time
EXPECTED = Efficiency("expected", gemm=0.70, attention=0.50, hbm=0.80, launch_s=1e-6)

# SASS instructions per element of the fused memory-bound kernels (sm_80 cubins, nvdisasm, NOPs
# excluded; every instruction of these loop-free kernels issues once per thread, predicated or not).
# Regenerate with --sass-counts; sm_90 counts are within 3 % of these.
SASS_INSTR = {
    ("bias_act", "none"): 5.4, ("bias_act", "gelu"): 38.2, ("bias_act", "gelu_tanh"): 22.4,
    ("bias_act", "quick_gelu"): 18.4,
    ("layer_norm", 512): 16.3, ("layer_norm", 768): 21.8, ("layer_norm", 1024): 16.3, ("layer_norm", 1152): 25.1,
    ("layer_norm", 1280): 22.6, ("layer_norm", 1664): 17.3,
    ("layer_norm+res", 512): 19.0, ("layer_norm+res", 768): 26.6, ("layer_norm+res", 1024): 19.9,
    ("layer_norm+res", 1152): 28.2, ("layer_norm+res", 1280): 25.4, ("layer_norm+res", 1664): 19.5,
}
# fp32 FLOPs per element (FMA = 2) of the activations, for the fp32-ALU roof; the issue roof binds first.
ACT_FLOPS = {"none": 1, "gelu": 25, "gelu_tanh": 12, "quick_gelu": 8}
ACT_SFU = {"none": 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 2}  # MUFU.EX2 / MUFU.RCP per element (SASS)


# ---------------------------------------------------------------------------------------------- ops
@dataclass(frozen=True)
class Op:
    """One kernel (or a group of identical kernels) of a forward pass."""

    name: str
    kind: str  # "gemm" | "attention" | "memory"
    flops: float = 0.0  # useful FLOPs: what TFLOP/s is reported against
    bytes: float = 0.0  # HBM bytes, every input and output once
    tensor_flops: float = 0.0  # executed on tensor cores (>= useful: padded tiles)
    alu_flops: float = 0.0  # fp32 FMA-pipe FLOPs
    instr: float = 0.0  # thread-instructions issued (non-tensor kernels with a known SASS count)
    sfu: float = 0.0  # SFU operations
    launches: int = 1

    def roofs(self, gpu: GPU, eff: Efficiency = ROOFLINE) -> dict[str, float]:
        tensor_eff = eff.gemm if self.kind == "gemm" else eff.attention if self.kind == "attention" else 1.0
        return {"tensor": self.tensor_flops / (gpu.tensor * tensor_eff), "alu": self.alu_flops / gpu.fp32,
                "issue": self.instr / gpu.issue, "sfu": self.sfu / gpu.sfu, "hbm": self.bytes / (gpu.hbm * eff.hbm)}

    def time(self, gpu: GPU, eff: Efficiency = ROOFLINE) -> float:
        return max(self.roofs(gpu, eff).values()) + self.launches * eff.launch_s

    def bound(self, gpu: GPU, eff: Efficiency = ROOFLINE) -> str:
        roofs = self.roofs(gpu, eff)
        return max(roofs, key=roofs.get)


def total(ops, attr: str) -> float:
    return sum(getattr(op, attr) for op in ops)


def time_of(ops, gpu: GPU, eff: Efficiency = ROOFLINE) -> float:
    return sum(op.time(gpu, eff) for op in ops)


def gemm(name: str, M: int, N: int, K: int, batch: int = 1) -> Op:
    """(M, K) @ (K, N) [x batch] in cuBLAS, fp16 in and out, fp32 accumulation."""
    flops = 2.0 * batch * M * N * K
    return Op(name, "gemm", flops, S * batch * (M * K + K * N + M * N), tensor_flops=flops)


def elementwise(name: str, elems: float, bytes_per_elem: float, launches: int = 1, flops_per_elem: float = 1) -> Op:
    """An eager PyTorch kernel (or ``launches`` of them) streaming ``elems`` elements."""
    return Op(name, "memory", flops_per_elem * elems, bytes_per_elem * elems, alu_flops=flops_per_elem * elems,
              launches=launches)


def _sass(key, width=None) -> float:
    if width is not None and (key, width) not in SASS_INSTR:  # unlisted width: the tile's worst listed case
        return max(v for (k, _), v in SASS_INSTR.items() if k == key)
    return SASS_INSTR[(key, width) if width is not None else key]


# LayerNorm ----------------------------------------------------------------------------------------
def layer_norm(M: int, N: int, residual: bool = False) -> Op:
    """kernels/layer_norm.py: x [+ r] read once, y [+ s] written once."""
    passes = 4 if residual else 2
    elems = M * N
    return Op("layer_norm+residual" if residual else "layer_norm", "memory", (8 if residual else 7) * elems,
              S * passes * elems + 2 * S * N, alu_flops=(8 if residual else 7) * elems,
              instr=elems * _sass("layer_norm+res" if residual else "layer_norm", N), sfu=M)


def layer_norm_eager(M: int, N: int, residual: bool = False) -> list[Op]:
    """The bench peer: ``F.layer_norm`` in fp16 (fp32 statistics inside), after ``x + r`` when residual."""
    ops = [elementwise("add", M * N, 3 * S)] if residual else []
    return ops + [elementwise("F.layer_norm", M * N, 2 * S, flops_per_elem=7)]


def layer_norm_ref(M: int, N: int, residual: bool = False) -> list[Op]:
    """fastclip.ref.layer_norm on fp16: x.float(), weight/bias .float(), F.layer_norm in fp32, .to(fp16)."""
    ops = [elementwise("add", M * N, 3 * S)] if residual else []
    return ops + [elementwise("x.float()", M * N, S + 4), elementwise("w/b.float()", 2 * N, S + 4, launches=2),
                  elementwise("F.layer_norm fp32", M * N, 8, flops_per_elem=7), elementwise(".to(fp16)", M * N, 4 + S)]


# bias + activation --------------------------------------------------------------------------------
def bias_act(M: int, N: int, act: str) -> Op:
    """kernels/bias_act.py: x read once, y written once, math in fp32."""
    elems = M * N
    return Op(f"bias_act {act}", "memory", ACT_FLOPS[act] * elems, 2 * S * elems + S * N,
              alu_flops=ACT_FLOPS[act] * elems, instr=elems * _sass(("bias_act", act)), sfu=ACT_SFU[act] * elems)


def activation_eager(M: int, N: int, act: str) -> list[Op]:
    """Eager PyTorch activations (fastclip.ref.activation, open_clip's QuickGELU)."""
    e = M * N
    if act == "none":
        return []
    if act == "quick_gelu":  # x * torch.sigmoid(1.702 * x): three kernels
        return [elementwise("1.702*x", e, 2 * S), elementwise("sigmoid", e, 2 * S), elementwise("x*sig", e, 3 * S)]
    return [elementwise(f"F.gelu ({act})", e, 2 * S, flops_per_elem=ACT_FLOPS[act])]


def bias_act_eager(M: int, N: int, act: str) -> list[Op]:
    """The bench peer and the ref backend: ``activation(x + bias)``."""
    return [elementwise("x + bias", M * N, 2 * S)] + activation_eager(M, N, act)


# attention ----------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N) tiles autotuning may try for fp16/bf16, by BLOCK_D: mirrors
# kernels/attention.py::configs_for (tests/test_gpu_model.py checks the two agree).
ATTN_TILES = {16: ((64, 64), (128, 64), (128, 128)), 32: ((64, 64), (128, 64), (128, 128)),
              64: ((64, 64), (128, 64), (128, 128)), 128: ((64, 64), (128, 64))}


def attention_tiles(Dh: int, Lq: int) -> tuple[tuple[int, int], ...]:
    tiles = ATTN_TILES[max(16, 1 << (Dh - 1).bit_length())]
    return tuple(t for t in tiles if t[0] <= 64) if Lq <= 64 else tiles


def executed_scores(Lq: int, Lk: int, causal: bool, block_m: int, block_n: int) -> int:
    """Scores computed per head: whole tiles, as the kernel's loop visits them."""
    scores = 0
    for start_m in range(0, Lq, block_m):
        hi = min(Lk, start_m + block_m) if causal else Lk
        scores += block_m * block_n * math.ceil(hi / block_n)
    return scores


def useful_scores(Lq: int, Lk: int, causal: bool) -> int:
    return Lk * (Lk + 1) // 2 if causal else Lq * Lk


def attention_tile(Lq: int, Lk: int, Dh: int, causal: bool) -> tuple[int, int]:
    """The tile (among the autotune configs) that wastes the fewest scores; ties go to the first listed."""
    return min(attention_tiles(Dh, Lq), key=lambda t: executed_scores(Lq, Lk, causal, *t))


def attention(B: int, H: int, L: int, Dh: int, causal: bool = False, Lk: int | None = None) -> Op:
    """kernels/attention.py, one call (one layer): q (B, H, L, Dh), k/v (B, H, Lk, Dh)."""
    Lk = L if Lk is None else Lk
    tile = attention_tile(L, Lk, Dh, causal)
    block_d = max(16, 1 << (Dh - 1).bit_length())
    executed = executed_scores(L, Lk, causal, *tile)
    return Op("attention", "attention", 4.0 * B * H * Dh * useful_scores(L, Lk, causal),
              S * B * H * Dh * (2 * L + 2 * Lk), tensor_flops=4.0 * B * H * block_d * executed,
              sfu=B * H * executed)


def attention_ref(B: int, H: int, L: int, Dh: int, causal: bool = False) -> list[Op]:
    """fastclip.ref.attention on strided q/k/v views of the packed qkv, then the block's transpose copy.

    torch.matmul copies each strided operand to a contiguous (B*H, L, Dh) batch first; the (L, L)
    scores make six round trips (write, scale, [mask], .float(), softmax, .to(fp16), read by P@V).
    """
    scores, x = B * H * L * L, B * H * L * Dh
    ops = [elementwise("q/k/v .contiguous()", 3 * x, 2 * S, launches=3),
           gemm("q @ k^T", L, L, Dh, batch=B * H),
           elementwise("* scale", scores, 2 * S)]
    if causal:
        ops += [elementwise("triu mask", L * L, 2, launches=2), elementwise("masked_fill", scores, 2 * S)]
    ops += [elementwise(".float()", scores, S + 4), Op("softmax fp32", "memory", 5 * scores, 8 * scores,
                                                        alu_flops=5 * scores, sfu=scores),
            elementwise(".to(fp16)", scores, 4 + S), gemm("p @ v", L, Dh, L, batch=B * H),
            elementwise("transpose copy", x, 2 * S)]
    return ops


# normalize_project --------------------------------------------------------------------------------
def normalize_project(B: int, W: int, E: int, normalize: bool = True, proj_bias: bool = False) -> Op:
    """kernels/normalize_project.py on B pooled rows: LayerNorm -> @ proj (W, E) -> L2 normalise."""
    flops = 2.0 * B * W * E
    out_passes = 3 if normalize else 1  # write, then re-read and re-write to scale by 1/||y||
    return Op("normalize_project", "gemm", flops + 8 * B * W + (3 * B * E if normalize else 0),
              S * (B * W + W * E + 2 * W + out_passes * B * E + (E if proj_bias else 0)), tensor_flops=flops,
              alu_flops=8 * B * W)


def normalize_project_eager(B: int, W: int, E: int, normalize: bool = True, gather: bool = False,
                            ref: bool = False) -> list[Op]:
    """The bench peer (``F.layer_norm`` fp16 -> ``@ proj`` -> ``F.normalize``) or, with ``ref``, the ref backend
    (fp32 LayerNorm round trip). ``gather``: text towers pick the pooled rows with ``x[arange(B), index]``."""
    ops = [elementwise("arange + index gather", B * W, 2 * S, launches=2)] if gather else []
    ops += layer_norm_ref(B, W) if ref else layer_norm_eager(B, W)
    ops.append(gemm("@ proj", B, E, W))
    if normalize:  # F.normalize: norm, clamp_min, expand_as + div
        ops += [elementwise("norm", B * E, S), elementwise("clamp_min", B, 2 * S),
                elementwise("div", B * E, 2 * S)]
    return ops


# --------------------------------------------------------------------------------------- encoders
PATHS = ("triton", "ref")


def _block(path: str, B: int, L: int, W: int, H: int, Mw: int, act: str, causal: bool) -> list[Op]:
    """One pre-norm ResidualAttentionBlock (fastclip/transformer.py) on (B, L, W) tokens."""
    M, Dh = B * L, W // H
    fused = path == "triton"
    ops = [layer_norm(M, W)] if fused else layer_norm_ref(M, W)  # ln_1
    ops.append(gemm("qkv", M, 3 * W, W))
    ops += [attention(B, H, L, Dh, causal)] if fused else attention_ref(B, H, L, Dh, causal)
    ops.append(gemm("out_proj", M, W, W))
    ops += [layer_norm(M, W, residual=True)] if fused else layer_norm_ref(M, W, residual=True)  # x += h; ln_2
    ops.append(gemm("c_fc", M, Mw, W))
    ops += [bias_act(M, Mw, act)] if fused else bias_act_eager(M, Mw, act)
    ops += [gemm("c_proj", M, W, Mw), elementwise("x + mlp", M * W, 3 * S)]
    return ops


def vision_ops(cfg, embed_dim: int, batch: int, path: str = "triton") -> list[Op]:
    """encode_image(pixels) of fastclip's VisionTransformer (fp16 pixels in, normalize=False)."""
    if cfg.pool_type != "tok":
        raise NotImplementedError(f"the model covers class-token pooling only, not pool_type={cfg.pool_type!r}")
    B, W, T, g2 = batch, cfg.width, cfg.num_tokens, cfg.grid ** 2
    ops = [Op("patch embed (conv)", "gemm", 2.0 * B * g2 * W * 3 * cfg.patch_size ** 2,
              S * (B * 3 * cfg.image_size ** 2 + W * 3 * cfg.patch_size ** 2 + B * g2 * W),
              tensor_flops=2.0 * B * g2 * W * 3 * cfg.patch_size ** 2)]
    if cfg.class_token:
        ops.append(elementwise("cat class token", B * T * W, 2 * S))
    ops.append(elementwise("+ pos embed", B * T * W, 3 * S))
    if cfg.ln_pre:
        ops += [layer_norm(B * T, W)] if path == "triton" else layer_norm_ref(B * T, W)
    for _ in range(cfg.layers):
        ops += _block(path, B, T, W, cfg.heads, cfg.mlp_width, cfg.act, False)
    E = embed_dim if cfg.proj else W
    if path == "triton":
        ops.append(normalize_project(B, W, E, normalize=False))
    else:
        ops += normalize_project_eager(B, W, E, normalize=False, ref=True)
    return ops


def text_ops(cfg, embed_dim: int, batch: int, path: str = "triton", length: int | None = None) -> list[Op]:
    """encode_text(tokens) of fastclip's TextTransformer; ``length``: tokens run after the exact causal
    truncation (default: the full context, i.e. an end-of-text token in the last position)."""
    B, W, L = batch, cfg.width, length or cfg.context_length
    ops = [Op("token checks + pool index", "memory", 0, 8 * B * cfg.context_length * 3, launches=4),
           elementwise("token embedding gather", B * L * W, 2 * S), elementwise("+ pos embed", B * L * W, 3 * S)]
    for _ in range(cfg.layers):
        ops += _block(path, B, L, W, cfg.heads, cfg.mlp_width, cfg.act, cfg.causal)
    if path == "triton":
        ops.append(normalize_project(B, W, embed_dim, normalize=False, proj_bias=cfg.proj_bias))
    else:
        ops += normalize_project_eager(B, W, embed_dim, normalize=False, gather=True, ref=True)
    return ops


# ------------------------------------------------------------------------------ workloads (benches)
@dataclass(frozen=True)
class Workload:
    """A transformer tower's per-layer shapes at a batch."""

    label: str
    model: str  # fastclip config name
    tower: str  # "vision" | "text"
    B: int
    L: int
    W: int
    H: int
    Mw: int
    act: str
    causal: bool
    E: int | None  # pooled head output dim (None: no normalize_project head)

    @property
    def Dh(self) -> int:
        return self.W // self.H

    @property
    def tokens(self) -> int:
        return self.B * self.L


_WORKLOADS = (("ViT-B-32 image", "ViT-B-32", "vision"), ("ViT-B-16 image", "ViT-B-16", "vision"),
              ("ViT-L-14 image", "ViT-L-14", "vision"), ("ViT-H-14 image", "ViT-H-14", "vision"),
              ("SO400M-14-384 image", "ViT-SO400M-14-SigLIP-384", "vision"),
              ("CLIP text, B models", "ViT-B-32", "text"), ("CLIP text, ViT-L-14", "ViT-L-14", "text"))


def workloads(batch: int = 256) -> list[Workload]:
    """The shapes the benches and tables use, read from fastclip's model configs."""
    from fastclip.config import get_model_config

    out = []
    for label, name, tower in _WORKLOADS:
        cfg = get_model_config(name)
        if tower == "vision":
            v = cfg.vision
            E = (cfg.embed_dim if v.proj else v.width) if v.pool_type == "tok" else None
            out.append(Workload(label, name, tower, batch, v.num_tokens, v.width, v.heads, v.mlp_width, v.act,
                                False, E))
        else:
            t = cfg.text
            out.append(Workload(label, name, tower, batch, t.context_length, t.width, t.heads, t.mlp_width, t.act,
                                t.causal, cfg.embed_dim))
    return out


# --------------------------------------------------------------------------------------- markdown
def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}" if seconds >= 9.5e-6 else f"{seconds * 1e6:.1f}"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}" if n < 1e7 else f"{n / 1e6:.0f}"


def attention_table(batch: int = 256) -> str:
    rows = []
    for w in workloads(batch):
        op = attention(w.B, w.H, w.L, w.Dh, w.causal)
        per_item = 1.0 / w.B
        cells = [w.label, w.L, w.H, w.Dh, "yes" if w.causal else "no", f"{op.flops * per_item / 1e9:.4f}",
                 f"{op.bytes * per_item / 1e6:.2f}", f"{op.flops / op.bytes:.0f}",
                 "x".join(map(str, attention_tile(w.L, w.L, w.Dh, w.causal))), f"{op.tensor_flops / op.flops:.2f}"]
        for gpu in GPUS:
            r = op.roofs(gpu)
            bound = {"hbm": "HBM", "sfu": "exp"}.get(op.bound(gpu), op.bound(gpu))
            cells += [f"{_us(r['tensor'])} / {_us(r['hbm'])} / {_us(r['sfu'])}", f"{bound}, {_us(op.time(gpu))}"]
        rows.append(cells)
    head = ["workload", "L", "H", "Dh", "causal", "useful GFLOP / item", "HBM MB / item", "useful FLOP/B", "tile",
            "executed / useful"]
    for gpu in GPUS:
        short = gpu.name.split()[0]
        head += [f"{short} tensor / HBM / exp µs", f"{short} bound, µs"]
    return _table(head, rows)


def _speedup(fused: float, peer: float) -> str:
    return f"{peer / fused:.2f}x"


def layer_norm_table(batch: int = 256) -> str:
    rows = []
    for w in workloads(batch):
        for residual in (False, True):
            op, peer = layer_norm(w.tokens, w.W, residual), layer_norm_eager(w.tokens, w.W, residual)
            cells = [w.label, f"{w.tokens} x {w.W}", "+ residual" if residual else "plain", _mb(op.bytes),
                     _mb(total(peer, "bytes")), f"{op.instr / (w.tokens * w.W):.1f}"]
            for gpu in GPUS:
                t_peer = time_of(peer, gpu)
                cells += [f"{_us(op.roofs(gpu)['hbm'])} / {_us(op.roofs(gpu)['issue'])}",
                          _us(t_peer), _speedup(op.time(gpu), t_peer)]
            rows.append(cells)
    head = ["workload", "rows x width", "variant", "fused MB", "eager MB", "SASS instr / elem"]
    for gpu in GPUS:
        short = gpu.name.split()[0]
        head += [f"{short} fused HBM / issue µs", f"{short} eager µs", f"{short} eager / fused"]
    return _table(head, rows)


def bias_act_table(batch: int = 256) -> str:
    rows = []
    for w in workloads(batch):
        for act in dict.fromkeys((w.act, "quick_gelu")):
            op, peer = bias_act(w.tokens, w.Mw, act), bias_act_eager(w.tokens, w.Mw, act)
            cells = [w.label, f"{w.tokens} x {w.Mw}", act, _mb(op.bytes), _mb(total(peer, "bytes")),
                     f"{op.instr / (w.tokens * w.Mw):.1f}"]
            for gpu in GPUS:
                r = op.roofs(gpu)
                t_peer = time_of(peer, gpu)
                cells += [f"{_us(r['hbm'])} / {_us(r['issue'])}", _us(t_peer), _speedup(op.time(gpu), t_peer)]
            rows.append(cells)
    head = ["workload", "tokens x mlp width", "act", "fused MB", "eager MB", "SASS instr / elem"]
    for gpu in GPUS:
        short = gpu.name.split()[0]
        head += [f"{short} fused HBM / issue µs", f"{short} eager µs", f"{short} eager / fused"]
    return _table(head, rows)


def normalize_project_table(batch: int = 256) -> str:
    rows = []
    for w in workloads(batch):
        if w.E is None:
            continue
        op = normalize_project(w.B, w.W, w.E, normalize=True)
        peer = normalize_project_eager(w.B, w.W, w.E, normalize=True, gather=w.tower == "text")
        cells = [w.label, f"{w.B} x {w.W} -> {w.E}", f"{op.flops / 1e9:.2f}", _mb(op.bytes), _mb(total(peer, "bytes")),
                 f"1 / {total(peer, 'launches'):.0f}"]
        for gpu in GPUS:
            r = op.roofs(gpu)
            cells += [f"{_us(r['tensor'])} / {_us(r['hbm'])}", _us(time_of(peer, gpu))]
        rows.append(cells)
    head = ["head", "B x W -> E", "GFLOP", "fused MB", "eager MB", "kernels fused / eager"]
    for gpu in GPUS:
        short = gpu.name.split()[0]
        head += [f"{short} fused tensor / HBM µs", f"{short} eager µs (no launch cost)"]
    return _table(head, rows)


ENCODERS = (("ViT-B-32", "image"), ("ViT-B-16", "image"), ("ViT-L-14", "image"),
            ("ViT-B-32", "text"), ("ViT-L-14", "text"))


def encoder_ops(name: str, tower: str, batch: int, path: str) -> list[Op]:
    from fastclip.config import get_model_config

    cfg = get_model_config(name)
    if tower == "image":
        return vision_ops(cfg.vision, cfg.embed_dim, batch, path)
    return text_ops(cfg.text, cfg.embed_dim, batch, path)


def _label(name: str, tower: str) -> str:
    if tower == "text":
        return "CLIP text, B models (77 tokens)" if name == "ViT-B-32" else f"CLIP text, {name} (77 tokens)"
    return f"{name} image"


def encoder_work_table(batch: int = 256) -> str:
    rows = []
    for name, tower in ENCODERS:
        fused, ref = encoder_ops(name, tower, batch, "triton"), encoder_ops(name, tower, batch, "ref")
        gemm_f = sum(op.flops for op in fused if op.kind == "gemm")
        attn_f = sum(op.flops for op in fused if op.kind == "attention")
        rows.append([_label(name, tower), f"{gemm_f / batch / 1e9:.2f}", f"{attn_f / batch / 1e9:.3f}",
                     f"{total(fused, 'bytes') / batch / 1e6:.1f}", f"{total(ref, 'bytes') / batch / 1e6:.1f}",
                     f"{total(fused, 'launches'):.0f} / {total(ref, 'launches'):.0f}"])
    return _table(["tower", "GEMM GFLOP / item", "attention GFLOP / item (useful)", "HBM MB / item, triton",
                   "HBM MB / item, ref", "kernels / forward, triton / ref"], rows)


def _split(ops, gpu: GPU, eff: Efficiency) -> str:
    parts = {"gemm": 0.0, "attention": 0.0, "memory": 0.0}
    for op in ops:
        parts[op.kind] += max(op.roofs(gpu, eff).values())
    launch = total(ops, "launches") * eff.launch_s
    whole = sum(parts.values()) + launch
    return " / ".join(f"{100 * v / whole:.0f}" for v in (*parts.values(), launch))


def encoder_rate_table(batch: int = 256) -> str:
    rows = []
    for name, tower in ENCODERS:
        fused, ref = encoder_ops(name, tower, batch, "triton"), encoder_ops(name, tower, batch, "ref")
        cells = [_label(name, tower)]
        for gpu in GPUS:
            cells += [f"{batch / time_of(fused, gpu):,.0f}", f"{batch / time_of(fused, gpu, EXPECTED):,.0f}",
                      f"{batch / time_of(ref, gpu, EXPECTED):,.0f}", _split(fused, gpu, EXPECTED)]
        rows.append(cells)
    head = ["tower"]
    for gpu in GPUS:
        short = gpu.name.split()[0]
        head += [f"{short} triton, roofline", f"{short} triton, expected", f"{short} ref, expected",
                 f"{short} triton expected time: GEMM / attention / other / launch %"]
    return _table(head, rows)


def assumptions() -> str:
    e = EXPECTED
    lines = [f"- **{g.name}**: {g.tensor / 1e12:.0f} TFLOP/s fp16/bf16 dense tensor, {g.fp32 / 1e12:g} TFLOP/s fp32 "
             f"(FMA), {g.hbm / 1e12:g} TB/s HBM, {g.sms} SMs at {g.clock / 1e9:g} GHz: "
             f"{g.sfu / 1e12:.2f} T SFU op/s, {g.issue / 1e12:.1f} T thread-instructions/s." for g in GPUS]
    lines.append(f"- **roofline** = every peak reached and no gap between kernels (a lower bound on time). "
                 f"**expected** = cuBLAS GEMMs at {e.gemm:.0%} of tensor peak, the attention kernel's MMAs at "
                 f"{e.attention:.0%}, every kernel at {e.hbm:.0%} of HBM bandwidth, and {e.launch_s * 1e6:g} µs of "
                 f"idle GPU per kernel launch; each op costs the max of its roofs, an encoder the sum of its ops.")
    return "\n".join(lines)


SECTIONS = {
    "assumptions": assumptions, "attention": attention_table, "layer_norm": layer_norm_table,
    "bias_act": bias_act_table, "normalize_project": normalize_project_table,
    "encoder_work": encoder_work_table, "encoder_rate": encoder_rate_table,
}


def markdown() -> str:
    out = []
    for name, fn in SECTIONS.items():
        out += [f"<!-- gpu-model:{name}:start -->", fn(), f"<!-- gpu-model:{name}:end -->", ""]
    return "\n".join(out)


def update_doc(path: Path) -> list[str]:
    """Replace every ``<!-- gpu-model:NAME:start -->`` ... ``end`` region of the doc; returns the names done."""
    text, done = path.read_text(), []
    for name, fn in SECTIONS.items():
        start, end = f"<!-- gpu-model:{name}:start -->", f"<!-- gpu-model:{name}:end -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _m: f"{start}\n{fn()}\n{end}", text)
            done.append(name)
    path.write_text(text)
    return done


# ------------------------------------------------------------------------------- SASS re-derivation
def sass_counts(capability: int = 80) -> dict:
    """Per-element SASS instruction counts of the fp16 bias_act and layer_norm kernels (no GPU needed)."""
    import subprocess
    import tempfile

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastclip.kernels import bias_act as ba
    from fastclip.kernels import layer_norm as ln

    def count(kernel, signature, constexprs, aligned, num_warps) -> int:
        sig = {n: "constexpr" if n in constexprs else signature[n] for n in kernel.arg_names}
        attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps, "num_stages": 1})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(c.asm["cubin"])
            f.flush()
            sass = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", f.name], capture_output=True, text=True,
                                  check=True).stdout
        return sum(1 for line in sass.splitlines()
                   if re.match(r"\s+/\*[0-9a-f]+\*/\s+\S", line) and not re.search(r"\bNOP\b", line))

    out = {}
    for act in ba.ACTIVATIONS:
        cfg = ba.block_config(3072)
        n = count(ba._bias_act_kernel, {"X": "*fp16", "Bias": "*fp16", "Y": "*fp16", "M": "i32", "N": "i32",
                                        "stride_x": "i32"},
                  {"ACT": act, "HAS_BIAS": True, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                   "INTERPRET_BF16": False}, ["X", "Bias", "Y", "N", "stride_x"], cfg["num_warps"])
        out[("bias_act", act)] = round(n * cfg["num_warps"] * 32 / (cfg["BLOCK_M"] * cfg["BLOCK_N"]), 1)
    for residual in (False, True):
        for width in (512, 768, 1024, 1152, 1280, 1664):
            cfg = ln.block_config(width)
            ty = "*fp16"
            n = count(ln._layer_norm_kernel, {"X": ty, "R": ty, "W": ty, "B": ty, "Y": ty, "S": ty, "M": "i32",
                                              "N": "i32", "stride_x": "i32", "stride_r": "i32", "eps": "fp32"},
                      {"HAS_RESIDUAL": residual, "HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_M": cfg["BLOCK_M"],
                       "BLOCK_N": cfg["BLOCK_N"], "INTERPRET_BF16": False},
                      ["X", "R", "W", "B", "Y", "S", "N", "stride_x", "stride_r"], cfg["num_warps"])
            key = "layer_norm+res" if residual else "layer_norm"
            out[(key, width)] = round(n * cfg["num_warps"] * 32 / (cfg["BLOCK_M"] * width), 1)
    return out


# ------------------------------------------------------------------------------ bench helpers (GPU)
def record(benchmark, ours, peers: dict, flops: float, nbytes: float, graph: bool = False, warmup: int = 25,
           rep: int = 100) -> dict:
    """Time ``ours`` and every peer with ``triton.testing.do_bench`` and record them in extra_info.

    do_bench (CUDA events, L2 cleared before every run, a warm-up, then ~``rep`` ms of runs) gives the
    numbers of record: ``<impl>_ms`` (median; ``_ms_p20``/``_ms_p80`` the 20th/80th percentiles), and
    ``<impl>_tflops`` / ``<impl>_gbps`` = this module's useful FLOPs and minimum HBM bytes of the op
    divided by the median (the same FLOPs and bytes for every implementation, so rates compare like
    for like), and ``speedup_vs_<peer>`` = peer ms / fastclip ms. A peer that cannot run here (e.g.
    SDPA's flash backend on an unsupported GPU) gets ``<peer>_error`` instead. With ``graph`` (ops of a
    few µs, where host-side launch cost exceeds the GPU time) each implementation is also timed inside
    a CUDA graph with ``do_bench_cudagraph``: ``<impl>_graph_ms`` and ``graph_speedup_vs_<peer>``.

    pytest-benchmark's own columns then time ``ours`` from the host, synchronising after every call
    (launch + sync overhead included): a cross-check, not the number to quote for small kernels.
    """
    import torch
    from triton.testing import do_bench, do_bench_cudagraph

    info, ms, graph_ms = benchmark.extra_info, {}, {}
    info.update(model_gflop=round(flops / 1e9, 4), model_mb=round(nbytes / 1e6, 3),
                device=torch.cuda.get_device_name())
    for name, fn in {"fastclip": ours, **peers}.items():
        try:
            med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
            if graph:
                graph_ms[name] = do_bench_cudagraph(fn, rep=rep, return_mode="median")
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError too: let it reach skip_if_oom
            if name == "fastclip" or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            info[f"{name}_error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            continue
        ms[name] = med
        info.update({f"{name}_ms": round(med, 5), f"{name}_ms_p20": round(p20, 5), f"{name}_ms_p80": round(p80, 5),
                     f"{name}_tflops": round(flops / med / 1e9, 2), f"{name}_gbps": round(nbytes / med / 1e6, 1)})
        if name in graph_ms:
            info[f"{name}_graph_ms"] = round(graph_ms[name], 5)
    for name in peers:
        if name in ms:
            info[f"speedup_vs_{name}"] = round(ms[name] / ms["fastclip"], 3)
        if name in graph_ms:
            info[f"graph_speedup_vs_{name}"] = round(graph_ms[name] / graph_ms["fastclip"], 3)

    def synced():
        ours()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, warmup_rounds=3)
    return ms


@contextlib.contextmanager
def skip_if_oom(what: str):
    """Skip (with the reason) a shape that does not fit this GPU's memory, and free what it allocated."""
    import pytest
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        pytest.skip(f"out of GPU memory ({total:.0f} GiB) for {what}: {str(exc).splitlines()[0][:120]}")


def dtype_params():
    """fp16 and bf16 as pytest params; bf16 skips on GPUs without bf16 support (pre-sm_80)."""
    import pytest
    import torch

    return [pytest.param(torch.float16, id="fp16"),
            pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
                not torch.cuda.is_bf16_supported(), reason="this GPU has no bf16 support"))]


def low_precision_atol(dtype) -> float:
    """Loose sanity tolerance for the benches' one-off output checks (the real numerics tests are in tests/)."""
    import torch

    return 2e-2 if dtype == torch.float16 else 6e-2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print every table (the docs/gpu.md sections)")
    parser.add_argument("--update-doc", type=Path, help="rewrite the gpu-model sections of this markdown file")
    parser.add_argument("--sass-counts", action="store_true", help="recompute SASS_INSTR from compiled kernels")
    args = parser.parse_args(argv)
    if args.sass_counts:
        for key, value in sass_counts().items():
            print(f"{key}: {value}  (in SASS_INSTR: {SASS_INSTR.get(key)})")
    if args.update_doc:
        print(f"updated {args.update_doc}: {', '.join(update_doc(args.update_doc)) or 'no gpu-model markers found'}")
    if args.markdown or not (args.update_doc or args.sass_counts):
        print(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
