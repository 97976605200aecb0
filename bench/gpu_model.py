"""A roofline MODEL of fastclip's GPU path: FLOPs and HBM bytes per op and per whole encoder.

Nothing here is a measurement: the project is built and tested on machines without a GPU, so the
expected GPU performance is written down from FLOPs and bytes. The model states, for an A100 and an H100
SXM, the lower bound each kernel's FLOPs and bytes impose, and an "expected" estimate under stated
efficiency assumptions. The GPU benches (bench/bench_<op>.py, bench/bench_gpu_e2e.py, bench/gpu_check.py)
report their measured TFLOP/s and GB/s against the same FLOPs and bytes, so model and measurement can
be put side by side once a GPU is available.

The tables of docs/gpu.md are generated from this model by bench/gpu_report.py; the GPU benches'
timing helpers are in bench/gpu_bench.py.

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

import math
from dataclasses import dataclass

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


def attention_ref(B: int, H: int, L: int, Dh: int, causal: bool = False, Lk: int | None = None) -> list[Op]:
    """fastclip.ref.attention on strided q (B, H, L, Dh) / k, v (B, H, Lk, Dh) views of the packed qkv,
    then the block's transpose copy.

    torch.matmul copies each strided operand to a contiguous batch first; the (L, Lk) scores make six
    round trips (write, scale, [mask], .float(), softmax, .to(fp16), read by P@V).
    """
    Lk = L if Lk is None else Lk
    scores, x = B * H * L * Lk, B * H * L * Dh
    ops = [elementwise("q/k/v .contiguous()", x + 2 * B * H * Lk * Dh, 2 * S, launches=3),
           gemm("q @ k^T", L, Lk, Dh, batch=B * H),
           elementwise("* scale", scores, 2 * S)]
    if causal:
        ops += [elementwise("triu mask", L * Lk, 2, launches=2), elementwise("masked_fill", scores, 2 * S)]
    ops += [elementwise(".float()", scores, S + 4), Op("softmax fp32", "memory", 5 * scores, 8 * scores,
                                                        alu_flops=5 * scores, sfu=scores),
            elementwise(".to(fp16)", scores, 4 + S), gemm("p @ v", L, Dh, Lk, batch=B * H),
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


def _ln_1(fused: bool, M: int, W: int, pending: bool) -> list[Op]:
    """ln_1, which adds the previous block's MLP output to the stream when there is one (apply_split)."""
    return [layer_norm(M, W, residual=pending)] if fused else layer_norm_ref(M, W, residual=pending)


def _block(path: str, B: int, L: int, W: int, H: int, Mw: int, act: str, causal: bool, pending: bool) -> list[Op]:
    """One pre-norm ResidualAttentionBlock (fastclip/models/transformer.py, ``apply_split``) on (B, L, W) tokens;
    its MLP output is added to the stream by the next block's ln_1 (``pending``: this block's ln_1 does)."""
    M, Dh = B * L, W // H
    fused = path == "triton"
    ops = _ln_1(fused, M, W, pending)
    ops.append(gemm("qkv", M, 3 * W, W))
    ops += [attention(B, H, L, Dh, causal)] if fused else attention_ref(B, H, L, Dh, causal)
    ops.append(gemm("out_proj", M, W, W))
    ops += [layer_norm(M, W, residual=True)] if fused else layer_norm_ref(M, W, residual=True)  # x += h; ln_2
    ops.append(gemm("c_fc", M, Mw, W))
    ops += [bias_act(M, Mw, act)] if fused else bias_act_eager(M, Mw, act)
    ops.append(gemm("c_proj", M, W, Mw))
    return ops


def _pooled_block(path: str, B: int, L: int, W: int, H: int, Mw: int, act: str, pending: bool) -> list[Op]:
    """The trimmed last block (ResidualAttentionBlock.apply_pooled): LayerNorm 1 and keys/values over all
    B·L tokens; query, attention, output projection, LayerNorm 2 and MLP for one pooled row per
    sequence (at the last position or the class token: the query sees all L keys)."""
    M, Dh = B * L, W // H
    fused = path == "triton"
    ops = _ln_1(fused, M, W, pending)
    ops += [elementwise("pooled-row gather", B * W, 2 * S, launches=2), gemm("q", B, W, W), gemm("kv", M, 2 * W, W)]
    ops += [attention(B, H, 1, Dh, False, Lk=L)] if fused else attention_ref(B, H, 1, Dh, False, Lk=L)
    ops.append(gemm("out_proj", B, W, W))
    ops += [layer_norm(B, W, residual=True)] if fused else layer_norm_ref(B, W, residual=True)
    ops.append(gemm("c_fc", B, Mw, W))
    ops += [bias_act(B, Mw, act)] if fused else bias_act_eager(B, Mw, act)
    ops += [gemm("c_proj", B, W, Mw), elementwise("x + mlp", B * W, 3 * S)]
    return ops


def _layers(path: str, B: int, L: int, W: int, H: int, Mw: int, act: str, causal: bool, layers: int) -> list[Op]:
    """Every block of a tower that pools one row per sequence: the last one trimmed to that row."""
    ops = []
    for i in range(layers - 1):
        ops += _block(path, B, L, W, H, Mw, act, causal, pending=i > 0)
    return ops + (_pooled_block(path, B, L, W, H, Mw, act, pending=layers > 1) if layers else [])


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
    ops += _layers(path, B, T, W, cfg.heads, cfg.mlp_width, cfg.act, False, cfg.layers)
    E = embed_dim if cfg.proj else W
    if path == "triton":
        ops.append(normalize_project(B, W, E, normalize=False))
    else:
        ops += normalize_project_eager(B, W, E, normalize=False, ref=True)
    return ops


def text_ops(cfg, embed_dim: int, batch: int, path: str = "triton", length: int | None = None) -> list[Op]:
    """encode_text(tokens) of fastclip's TextTransformer; ``length``: tokens run after the exact causal
    truncation (default: the full context, i.e. an end-of-text token in the last position of every row,
    so the trimmed last block's query sees all ``length`` keys)."""
    B, W, L = batch, cfg.width, length or cfg.context_length
    ops = [Op("token checks + pool index", "memory", 0, 8 * B * cfg.context_length * 3, launches=4),
           elementwise("token embedding gather", B * L * W, 2 * S), elementwise("+ pos embed", B * L * W, 3 * S)]
    ops += _layers(path, B, L, W, cfg.heads, cfg.mlp_width, cfg.act, cfg.causal, cfg.layers)
    if path == "triton":
        ops.append(normalize_project(B, W, embed_dim, normalize=False, proj_bias=cfg.proj_bias))
    else:
        ops += normalize_project_eager(B, W, embed_dim, normalize=False, ref=True)  # rows come pooled
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
    from fastclip.models.config import get_model_config

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
