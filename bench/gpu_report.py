"""The markdown tables of docs/gpu.md, generated from the roofline MODEL in bench/gpu_model.py.

    python bench/gpu_report.py --markdown                   # every table, as pasted into docs/gpu.md
    python bench/gpu_report.py --update-doc docs/gpu.md     # rewrite the generated sections in place
    python bench/gpu_report.py --sass-counts                # re-derive SASS_INSTR (compiles kernels, ~10 s)
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from gpu_model import (  # noqa: E402
    EXPECTED,
    GPU,
    GPUS,
    SASS_INSTR,
    Efficiency,
    Op,
    attention,
    attention_tile,
    bias_act,
    bias_act_eager,
    layer_norm,
    layer_norm_eager,
    normalize_project,
    normalize_project_eager,
    text_ops,
    time_of,
    total,
    vision_ops,
    workloads,
)


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
    from fastclip.models.config import get_model_config

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
            block = f"{start}\n{fn()}\n{end}"
            text = pattern.sub(lambda _m, block=block: block, text)  # a function: no escapes read in the block
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
