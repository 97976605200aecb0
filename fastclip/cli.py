"""The ``fastclip`` command: ``models``, ``embed``, ``verify``, ``info``, ``serve``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .jobs.sources import IMAGE_EXTENSIONS


def _expand_paths(paths: list[str]) -> list[str]:
    """Files as given; directories expanded (recursively, sorted) to the image files they hold."""
    out = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(str(f) for f in sorted(path.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            out.append(p)  # a missing file is reported as a bad item, naming it
    return out


def _write(out: Path, names: list[str], vectors) -> None:
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, vectors)
        out.with_suffix(".paths.txt").write_text("".join(n + "\n" for n in names))
    elif out.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("writing .parquet needs pyarrow: pip install 'fastclip[parquet]'") from None
        dim = vectors.shape[1]
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        column = pa.FixedSizeListArray.from_arrays(flat, dim)
        pq.write_table(pa.table({"path": pa.array(names, pa.string()), "embedding": column}), out)
    else:
        raise SystemExit(f"--out must end in .npy or .parquet, got {out}")


def _single_file(out: str) -> bool:
    return Path(out).suffix in (".npy", ".parquet")


def cmd_embed(args) -> int:
    import fastclip

    modality = "texts" if args.texts else "images"
    if args.captions and args.texts:
        print("fastclip embed: --captions embeds the captions of images; with --texts the inputs are texts already",
              file=sys.stderr)
        return 2
    single = _single_file(args.out)
    if single and (args.resume or args.captions):
        print("fastclip embed: --resume and --captions need an output directory (--out DIR), not a single file",
              file=sys.stderr)
        return 2
    from fastclip.jobs import open_inputs

    try:  # the inputs are listed (and checked) before the model loads
        parts = open_inputs(args.paths, modality=modality, column=args.column, shard_size=args.shard_size)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"fastclip embed: error: {exc}", file=sys.stderr)
        return 2
    model = fastclip.load(args.model, pretrained=args.pretrained, device=args.device, precision=args.precision,
                          backend=args.backend)
    try:
        return _run_embed(args, model, modality, single, parts)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:  # bad inputs or output directory
        print(f"fastclip embed: error: {exc}", file=sys.stderr)
        return 2


def _run_embed(args, model, modality: str, single: bool, parts) -> int:
    from fastclip.jobs import embed_corpus, embed_to_memory

    if not single:
        summary = embed_corpus(
            model, args.paths, args.out, modality=modality, column=args.column, captions=args.captions,
            shard_size=args.shard_size, resume=args.resume, dtype=args.dtype or "float16",
            batch_size=args.batch_size, progress=not args.quiet,
            model_id=f"{args.model} {args.pretrained or ''} {args.precision}".strip(), parts=parts)
        print(f"fastclip embed: {summary} -> {args.out}", file=sys.stderr)
        return 0
    vectors, keys, errors = embed_to_memory(model, args.paths, modality=modality, column=args.column,
                                            batch_size=args.batch_size, progress=not args.quiet, parts=parts)
    for key, reason in errors:
        print(f"{'error' if args.on_error == 'raise' else 'skipped'} {key}: {reason}", file=sys.stderr)
    if errors and args.on_error == "raise":
        return 1
    if not keys and not errors:
        print("fastclip embed: no input found", file=sys.stderr)
        return 2
    _write(Path(args.out), keys, vectors.astype(args.dtype or "float32"))
    print(f"wrote {vectors.shape[0]} embeddings of dimension {vectors.shape[1]} to {args.out}"
          + (f" ({len(errors)} skipped)" if errors else ""), file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    import fastclip
    from fastclip.loading.hub import pretrained_tags

    for name in fastclip.list_models():
        tags = pretrained_tags(name)
        if args.pretrained_only and not tags:
            continue
        print(f"{name:32s} {' '.join(tags)}".rstrip())
    return 0


def cmd_info(args) -> int:
    import importlib.util
    import platform

    import torch

    import fastclip
    from fastclip.backends.dispatch import resolve_backend

    cuda = torch.cuda.is_available()
    rows = [
        ("fastclip", fastclip.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("threads", str(torch.get_num_threads())),
        ("cpu backend (auto)", resolve_backend("auto", "cpu")),
        ("C++ extension", "built" if importlib.util.find_spec("fastclip._C") else "not built"),
        ("cpu paths", _cpu_paths()),
        ("triton", "installed" if importlib.util.find_spec("triton") else "not installed"),
        ("cuda devices", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "none"),
    ]
    if cuda:
        rows.append(("cuda backend (auto)", resolve_backend("auto", "cuda")))
    if os.environ.get("FASTCLIP_BACKEND"):
        rows.append(("FASTCLIP_BACKEND", os.environ["FASTCLIP_BACKEND"]))
    for key, value in rows:
        print(f"{key:20s} {value}")
    return 0


def _cpu_paths() -> str:
    """Which CPU code paths run here: the fp32 kernels' vector width, the int8 GEMM and its dot products, bf16, and
    the products of int8 and bf16 models' attention."""
    from fastclip.backends import bf16, int8

    try:
        from fastclip import _C

        fp32 = "avx512" if _C.avx512_present() else "avx2" if _C.cpu_supported() else "reference ops"
        dots = "bf16" if _C.attention_bf16_supported() else "fp32"
    except ImportError:
        fp32, dots = "reference ops", "fp32"
    try:
        gemm = int8.gemm()
    except ValueError as exc:
        gemm = f"unavailable ({exc})"
    if gemm == "kernel" and int8.KERNEL is not None:
        int8_dots = f"fastclip kernel {int8.KERNEL.path()}"
    elif gemm == "fbgemm":
        int8_dots = "fbgemm " + ("vnni" if not int8.REDUCE_RANGE else "no vnni (7-bit activations)")
    else:
        int8_dots = gemm
    bf16_isa = "+".join(bf16.cpu_bf16_instructions()) or "none (bf16 refused)"
    return f"fp32 {fp32}, int8 {int8_dots}, bf16 {bf16_isa}, int8/bf16 attention products {dots}"


# a small built-in caption set for calibrating the text tower when no --calibrate-texts file is given
CAPTIONS = ("a photo of a cat", "a dog running on the beach", "a red car parked on a street",
            "a bowl of fruit on a wooden table", "a diagram of a suspension bridge", "two people playing tennis",
            "a city skyline at night", "a close-up of a yellow flower", "a plate of pasta with tomato sauce",
            "an old map of europe", "a child riding a bicycle", "a snowy mountain under a blue sky",
            "a screenshot of a spreadsheet", "a black and white portrait of a man", "a cup of coffee and a laptop",
            "a flock of birds over the sea")


def cmd_quantize(args) -> int:
    """Calibrate int8 on the user's images (and captions), print the per-layer report, save the int8 file."""
    import fastclip
    from fastclip import quantize
    from fastclip.errors import ItemError

    if not args.out.endswith(".safetensors"):
        raise SystemExit(f"fastclip quantize: --out must end in .safetensors, got {args.out}")
    images = _expand_paths([args.calibrate])
    if not Path(args.calibrate).is_dir():
        raise SystemExit(f"fastclip quantize: --calibrate must be a folder of images, got {args.calibrate}")
    if not images:
        raise SystemExit(f"fastclip quantize: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {args.calibrate}")
    images = images[: args.max_images]
    if args.calibrate_texts:
        texts = [t.strip() for t in Path(args.calibrate_texts).read_text().splitlines() if t.strip()]
        if not texts:
            raise SystemExit(f"fastclip quantize: no captions in {args.calibrate_texts}")
    else:
        texts = list(CAPTIONS)
    model = fastclip.load(args.model, pretrained=args.pretrained, precision="fp32", backend=args.backend)
    if model.tokenizer is None:
        raise SystemExit("fastclip quantize: this model has no tokenizer to calibrate its text tower with")

    def batches():
        b = args.batch_size
        for start in range(0, len(images), b):
            try:  # (B, 3, S, S) pixels, or a NaflexBatch of patch sequences (SigLIP 2 NaFlex)
                pixels, _, _ = model.preprocess.batch(images[start:start + b], index_offset=start)
            except ItemError as exc:  # a decoding failure: name the file
                raise SystemExit(f"fastclip quantize: cannot read image {images[exc.index]}: {exc.reason}") from None
            yield "image", pixels
        for start in range(0, len(texts), b):
            yield "text", model.tokenizer(texts[start:start + b])

    options = {} if args.max_error is None else {"max_error": args.max_error}
    model, calibration = quantize.quantize_calibrated(model, batches, backend=args.backend,
                                                      progress=not args.quiet, **options)
    print(quantize.format_report(calibration))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize.save_int8(model, out, args.model, calibration)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); load it with "
          f"fastclip.load({args.model!r}, pretrained={str(out)!r}, precision='int8')", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    from fastclip.backends.verify import main as verify_main

    targets = [t.strip() for t in args.gpu_targets.split(",") if t.strip()] if args.gpu_targets else []
    unknown = [t for t in targets if t not in ("sm_80", "sm_90")]
    if unknown:
        raise SystemExit(f"--gpu-targets: unknown target(s) {', '.join(unknown)}; expected sm_80 and/or sm_90")
    return verify_main(args.precision, not args.no_interpreter, targets)


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from fastclip.server import ServerConfig, create_app
    except ImportError as e:
        raise SystemExit(f"fastclip serve needs the serve extra: pip install 'fastclip[serve]' ({e})") from None
    import fastclip

    try:
        cfg = ServerConfig(
            model_name=args.model_name, max_batch=1 if args.no_batching else args.max_batch,
            max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_items=args.max_items,
            max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
            max_body_bytes=args.max_body_bytes, api_key=args.api_key or os.environ.get("FASTCLIP_API_KEY") or None,
            allow_url_hosts=tuple(args.allow_url_host or ()))
    except ValueError as e:
        raise SystemExit(f"fastclip serve: {e}") from None
    if args.random_weights:
        model = fastclip.create_model(args.model, device=args.device, precision=args.precision, backend=args.backend)
    else:
        model = fastclip.load(args.model, pretrained=args.pretrained, device=args.device, precision=args.precision,
                              backend=args.backend)
    app = create_app(model, cfg)
    print(f"fastclip serve: {app.state.fastclip.name} ({model.backend}) on http://{args.host}:{args.port}"
          + (" (bearer token required on /v1)" if cfg.api_key else ""), file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the HTTP embedding service (OpenAI-compatible /v1/embeddings)")
    p.add_argument("--model", required=True, help="architecture name, checkpoint path, HF directory or hub id")
    p.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint path (with an architecture name)")
    p.add_argument("--random-weights", action="store_true", help="random weights (for trying the service out)")
    p.add_argument("--model-name", default=None, help="model id clients send and /v1/models lists "
                   "(default: the architecture name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"])
    p.add_argument("--backend", default=None, choices=["auto", "ref", "cpu", "cpp", "triton"],
                   help="op backend (default: $FASTCLIP_BACKEND, else auto)")
    p.add_argument("--max-batch", type=int, default=32, help="most items per encoder call (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill (default 5)")
    p.add_argument("--no-batching", action="store_true", help="encode one item per call (same as --max-batch 1)")
    p.add_argument("--max-queue", type=int, default=1024, help="items waiting per modality before 429 (default 1024)")
    p.add_argument("--max-items", type=int, default=256, help="most items per request (default 256)")
    p.add_argument("--max-image-bytes", type=int, default=10 * 1024 * 1024, help="per encoded image (default 10 MiB)")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="per image, from its header (default 40M)")
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024, help="per request body (default 64 MiB)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                   "(default: $FASTCLIP_API_KEY; unset = no auth)")
    p.add_argument("--allow-url-host", action="append", metavar="HOST",
                   help="allow http(s) image URLs from HOST (or HOST:PORT, *.domain); repeatable; default: none")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish on shutdown (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastclip", description="CLIP / OpenCLIP / SigLIP embeddings")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list architectures and their pretrained tags")
    p.add_argument("--pretrained-only", action="store_true", help="only architectures with published weights")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("embed", help="embed images or texts into a directory of shards, or one .npy / .parquet file")
    p.add_argument("paths", nargs="+", help="inputs: image files, folders (searched recursively), WebDataset tars, "
                   "Parquet files, text files (with --texts); globs, brace patterns (shards/{00000..00099}.tar) "
                   "and fsspec URLs (s3://, gs://, http://) allowed")
    p.add_argument("--model", required=True, help="architecture name, checkpoint path, HF directory or hub id")
    p.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint path (with an architecture name)")
    p.add_argument("--out", required=True, help="output directory (clip-retrieval layout, written shard by shard: "
                   "img_emb/, text_emb/, metadata/, errors/), or one file: .npy (plus .paths.txt) or .parquet")
    p.add_argument("--texts", action="store_true", help="the inputs are texts: text files (one a line) or a Parquet "
                   "text column")
    p.add_argument("--column", default=None, help="Parquet column of image bytes, image paths or texts "
                   "(default: found by name)")
    p.add_argument("--captions", action="store_true", help="also embed each image's caption (WebDataset .txt, "
                   "Parquet caption column) into text_emb/")
    p.add_argument("--shard-size", type=int, default=10_000,
                   help="samples per output shard for folders, Parquet and text files; a tar is one shard")
    p.add_argument("--resume", action="store_true", help="continue the job in --out: keep finished shards, redo the rest")
    p.add_argument("--dtype", default=None, choices=["float16", "float32"],
                   help="stored vectors (default: float16 in a directory, float32 in one file)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"])
    p.add_argument("--backend", default=None, choices=["auto", "ref", "cpu", "cpp", "triton"],
                   help="op backend (default: $FASTCLIP_BACKEND, else auto)")
    p.add_argument("--on-error", default="skip", choices=["skip", "raise"],
                   help="one output file: skip bad samples (reported on stderr) or fail; a directory always records "
                   "them in errors/")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("verify", help="check every available backend against the reference on small models")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "fp16", "bf16"])
    p.add_argument("--no-interpreter", action="store_true",
                   help="without a GPU, skip running the Triton kernels under Triton's interpreter")
    p.add_argument("--gpu-targets", default="", help="also compile every Triton kernel for these, e.g. sm_80,sm_90")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("info", help="version, backends, threads and devices")
    p.set_defaults(func=cmd_info)

    _add_serve_parser(sub)

    p = sub.add_parser("quantize", help="calibrate int8 on sample images and save an int8 checkpoint")
    p.add_argument("model", help="architecture name")
    p.add_argument("--pretrained", default=None, help="pretrained tag or fp32 checkpoint path (with an architecture "
                   "name; none for a model directory or hub id)")
    p.add_argument("--calibrate", required=True, help="folder of calibration images (searched recursively)")
    p.add_argument("--calibrate-texts", default=None, help="text file, one caption a line (default: built-in set)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--batch-size", type=int, default=16, help="items per calibration batch (default 16)")
    p.add_argument("--max-images", type=int, default=512, help="most calibration images used (default 512)")
    p.add_argument("--max-error", type=float, default=None,
                   help="per-layer relative error above which a layer stays fp32 (default: fastclip.quantize's)")
    p.add_argument("--backend", default=None, choices=["auto", "ref", "cpu", "cpp"],
                   help="op backend (default: $FASTCLIP_BACKEND, else auto)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fastclip.errors import FastclipError

    try:
        return args.func(args)
    except FastclipError as exc:
        print(f"fastclip {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
