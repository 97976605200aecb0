"""Compile every registered Triton kernel for A100 (sm_80) and H100 (sm_90) on a machine with no GPU.

For each kernel variant, autotune config and dtype this builds PTX and a cubin with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))`` and records
  - registers per thread and spill bytes, from the bundled ``ptxas -v`` re-run on the PTX with the
    flags Triton uses (Triton's own ptxas log is discarded, and n_regs/n_spills in its metadata
    need a GPU driver to load the cubin);
  - shared memory bytes (``metadata.shared``) against the per-block maximum: A100 163 KiB and H100
    227 KiB (opt-in maxima; the SMs have 164 / 228 KiB);
  - the tensor-core instructions in the SASS (bundled ``nvdisasm`` on the cubin): HMMA (mma.sync,
    sm_80 and up) and/or HGMMA (wgmma, sm_90a). On sm_90 Triton emits wgmma only for some tile
    shapes and falls back to mma.sync otherwise; either counts as tensor cores, the table says which.

Registry protocol
-----------------
Each module named in KERNEL_MODULES (``fastclip.kernels.<name>``) that exists exposes
``COMPILE_SPECS: list[dict]`` (or a callable returning it), one dict per launched variant:

    name        str, row label, e.g. "attention Dh=64 causal"
    kernel      the plain ``@triton.jit`` function (not an ``@triton.autotune`` wrapper)
    signature   {arg name: Triton type} for the runtime args: "*fp16", "*bf16", "*fp32", "*u8",
                "i32", "i64", "fp32", ...; constexpr args may be omitted (added as "constexpr")
    constexprs  {arg name: value} for constexpr args (incl. int args the JIT would specialise: == 1)
    configs     list[triton.Config]: each config's kwargs join the constexprs, its num_warps /
                num_stages become compile options                                   -- or --
    num_warps, num_stages   a single launch config (kernels without autotuning)
    dtype       optional: "fp16" | "bf16" | "fp32" (default: the first pointer type in the signature)
    aligned     optional: args that get the 16-divisibility hint the JIT gives 16-byte aligned
                pointers and multiple-of-16 ints (default: every pointer arg)
    tensor_cores optional bool (default False): the kernel multiplies tiles, so its SASS must use
                tensor cores

A module that is not present yet is reported as skipped; an ImportError inside a present module is
an error. Under TRITON_INTERPRET=1 the kernels are interpreter objects that cannot be compiled, so
``compile_kernel_configs`` then runs itself in a subprocess with TRITON_INTERPRET unset.

CLI: ``python kernels/compile_check.py [--target sm_80 sm_90] [--json-out FILE] [--update-doc docs/gpu.md]``
prints the table (and writes it into the doc between its compile-table markers).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KERNEL_MODULES = ("attention", "layer_norm", "bias_act", "normalize_project", "rotary", "contrastive_loss",
                  "contrastive_loss_bwd")
TARGETS = {"sm_80": (80, "A100", 163 * 1024), "sm_90": (90, "H100", 227 * 1024)}
_PTXAS_INFO = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_DOC_START, _DOC_END = "<!-- compile-table:start -->", "<!-- compile-table:end -->"
_MMA = {"HMMA": re.compile(r"\bHMMA\."), "HGMMA": re.compile(r"\bHGMMA\.")}


def _package() -> str:
    return __package__ or "fastclip.kernels"


def load_specs(modules=KERNEL_MODULES) -> tuple[list[dict], dict[str, str]]:
    """(specs from every present module, {module: reason} for the skipped ones)."""
    specs, skipped = [], {}
    for name in modules:
        full = f"{_package()}.{name}"
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name != full:
                raise
            skipped[name] = "module not present"
            continue
        entries = getattr(module, "COMPILE_SPECS", None)
        if entries is None:
            skipped[name] = "no COMPILE_SPECS"
            continue
        specs.extend(entries() if callable(entries) else entries)
    return specs, skipped


def _dtype(spec: dict) -> str:
    if "dtype" in spec:
        return spec["dtype"]
    return next((t[1:] for t in spec["signature"].values() if t.startswith("*")), "-")


def _launches(spec: dict) -> list[tuple[str, dict, dict]]:
    """[(config label, constexprs, compile options)] for every config of a spec."""
    if "configs" in spec:
        pairs = [(dict(c.kwargs), {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in spec["configs"]]
    else:
        pairs = [({}, {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)})]
    out = []
    for kwargs, options in pairs:
        constexprs = {**spec["constexprs"], **kwargs}
        blocks = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in constexprs.items()
                          if k.startswith("BLOCK_") and (k in kwargs or "configs" not in spec))
        label = f"{blocks} w{options['num_warps']} s{options['num_stages']}".strip()
        out.append((label, constexprs, options))
    return out


def _ptxas_report(ptx: str, capability: int) -> dict:
    """Registers and spills from ``ptxas -v`` run with the flags Triton's own ptxas call uses."""
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(Path(tmp) / "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    regs = [int(m) for m in _PTXAS_INFO.findall(log)]
    spills = [tuple(map(int, m)) for m in _SPILLS.findall(log)]
    return {"regs": max(regs) if regs else None, "stack": sum(s[0] for s in spills),
            "spill_stores": sum(s[1] for s in spills), "spill_loads": sum(s[2] for s in spills)}


def _sass_mma(cubin: bytes) -> str:
    """Tensor-core instruction families in the SASS: "HMMA", "HGMMA", "HGMMA+HMMA" or "none"."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = sorted(name for name, pattern in _MMA.items() if pattern.search(sass))
    return "+".join(found) or "none"


def _compile_one(spec: dict, label: str, constexprs: dict, options: dict, target: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    capability, gpu, smem_limit = TARGETS[target]
    kernel = spec["kernel"]
    row = {"target": target, "gpu": gpu, "kernel": spec["name"], "dtype": _dtype(spec), "config": label,
           **options, "tensor_cores": bool(spec.get("tensor_cores", False)), "smem_limit": smem_limit,
           "ok": False, "error": None, "regs": None, "smem": None, "stack": None, "spill_stores": None,
           "spill_loads": None, "mma": None}
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        row["error"] = f"{type(kernel).__name__} is not a compilable @triton.jit function (TRITON_INTERPRET set?)"
        return row
    signature = {n: ("constexpr" if n in constexprs else spec["signature"].get(n)) for n in kernel.arg_names}
    missing = [n for n, t in signature.items() if t is None]
    if missing:
        row["error"] = f"signature lacks {missing}"
        return row
    aligned = spec.get("aligned", [n for n, t in signature.items() if t.startswith("*")])
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned if n not in constexprs}
    start = time.perf_counter()
    try:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=dict(options))
        row.update(_ptxas_report(compiled.asm["ptx"], capability))
        row["smem"] = compiled.metadata.shared
        row["mma"] = _sass_mma(compiled.asm["cubin"])
        row["ok"] = True
    except Exception as exc:  # noqa: BLE001 - a failed config is a row of the report, not a crash
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def problems(row: dict) -> list[str]:
    """Why a row fails the checks (empty list = pass; skipped modules are not failures)."""
    if row.get("skipped"):
        return []
    if not row["ok"]:
        return [f"does not compile: {row['error']}"]
    out = []
    if row["smem"] > row["smem_limit"]:
        out.append(f"shared memory {row['smem']} B > {row['gpu']} limit {row['smem_limit']} B")
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if row["tensor_cores"] and row["mma"] == "none":
        out.append("no tensor-core instruction (HMMA/HGMMA) in the SASS")
    return out


def compile_kernel_configs(target: str, modules=KERNEL_MODULES) -> list[dict]:
    """One row per (kernel variant, dtype, config) compiled for ``target`` ("sm_80" or "sm_90")."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {sorted(TARGETS)}")
    from triton import knobs

    if knobs.runtime.interpret:
        return compile_all((target,), modules)[target]
    specs, skipped = load_specs(modules)
    rows = [{"target": target, "kernel": name, "skipped": reason} for name, reason in skipped.items()]
    for spec in specs:
        for label, constexprs, options in _launches(spec):
            rows.append(_compile_one(spec, label, constexprs, options, target))
    return rows


def compile_all(targets=tuple(TARGETS), modules=KERNEL_MODULES) -> dict[str, list[dict]]:
    """Every target in its own subprocess (in parallel, with TRITON_INTERPRET unset)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(target):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--target", target, "--json-out", str(out),
                   "--modules", *modules, "--quiet"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"compile check for {target} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            return json.loads(out.read_text())[target]

    with ThreadPoolExecutor(len(targets)) as pool:
        return dict(zip(targets, pool.map(run, targets), strict=True))


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per (kernel, dtype, config), the targets side by side."""
    targets = [t for t in TARGETS if any(r["target"] == t for r in rows)]
    by_key: dict[tuple, dict] = {}
    notes = []
    for r in rows:
        if r.get("skipped"):
            notes.append(f"{r['kernel']} ({r['target']}): skipped, {r['skipped']}")
            continue
        by_key.setdefault((r["kernel"], r["dtype"], r["config"]), {})[r["target"]] = r

    def cell(r):
        if r is None:
            return ["-"] * 4
        if not r["ok"]:
            return ["FAIL", "-", "-", (r["error"] or "")[:60]]
        spill = "0" if not (r["spill_stores"] or r["spill_loads"]) else f"{r['spill_stores']}/{r['spill_loads']}"
        mark = " !" if problems(r) else ""
        return [str(r["regs"]), f"{r['smem'] / 1024:.1f}", spill, r["mma"] + mark]

    head = ["kernel", "dtype", "config"]
    for t in targets:
        head += [f"{t} regs", f"{t} smem KiB", f"{t} spills", f"{t} MMA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kernel, dtype, config), per_target in by_key.items():
        cells = [kernel, dtype, config]
        for t in targets:
            cells += cell(per_target.get(t))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + sorted(set(notes)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--modules", nargs="+", default=list(KERNEL_MODULES))
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--quiet", action="store_true", help="no table on stdout")
    parser.add_argument("--update-doc", type=Path, help="replace the table between the compile-table markers")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if len(args.target) > 1:  # one process per target, in parallel
        results = compile_all(tuple(args.target), tuple(args.modules))
    else:
        results = {t: compile_kernel_configs(t, tuple(args.modules)) for t in args.target}
    if args.json_out:
        args.json_out.write_text(json.dumps(results))
    rows = [r for t in args.target for r in results[t]]
    bad = [(r, p) for r in rows for p in problems(r)]
    if args.update_doc:
        text = args.update_doc.read_text()
        head, rest = text.split(_DOC_START, 1)
        tail = rest.split(_DOC_END, 1)[1]
        args.update_doc.write_text(f"{head}{_DOC_START}\n{format_table(rows)}\n{_DOC_END}{tail}")
    if not args.quiet:
        print(format_table(rows))
        print(f"\n{len(rows)} rows, {len(bad)} problems, {time.perf_counter() - start:.0f} s")
        for r, p in bad:
            print(f"  {r['target']} {r['kernel']} {r.get('dtype')} {r.get('config')}: {p}")
    return 0


def _bootstrap_package() -> None:
    """Run as a script from a checkout: make ``fastclip.kernels`` importable from this folder."""
    import importlib.util

    kernels_dir = Path(__file__).resolve().parent
    try:
        importlib.import_module("fastclip.kernels")
        return
    except ModuleNotFoundError:
        pass
    if str(kernels_dir.parent) not in sys.path:
        sys.path.insert(0, str(kernels_dir.parent))
    import fastclip

    spec = importlib.util.spec_from_file_location(
        "fastclip.kernels", kernels_dir / "__init__.py", submodule_search_locations=[str(kernels_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastclip.kernels"] = module
    spec.loader.exec_module(module)
    fastclip.kernels = module


if __name__ == "__main__":
    if not __package__:
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
        _bootstrap_package()
        sys.exit(importlib.import_module("fastclip.kernels.compile_check").main())
    sys.exit(main())
