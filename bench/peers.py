"""The peers fastclip is measured against, built for one architecture from ONE set of random weights.

Weights are drawn once by transformers' ``CLIPModel`` (seeded), renamed into fastclip's layout with
``fastclip.loading.keymaps.from_hf`` and from there into open_clip's (``openclip_state_dict``), so open_clip,
open_clip under ``torch.compile``, transformers, ONNX Runtime (the exported open_clip towers, fp32 and
dynamic int8), OpenVINO (the same exports) and fastclip all compute with the same numbers. Every peer's
output is checked against open_clip eager on the benchmark's own input the first time it runs (fp32:
``assert_close`` at 1e-4; int8 and bf16: per-item cosine, recorded, and for every bf16 peer and the OpenVINO
int8 one required to be >= ``MIN_COSINE``), so a wrong peer fails loudly instead of being timed.

Peers: ``fastclip`` / ``fastclip-int8`` / ``fastclip-bf16`` (``fastclip.load``, precision fp32 / int8 / bf16;
bf16 runs oneDNN bf16 GEMMs and raises ValueError on CPUs without AVX512-BF16 or AMX, where bench/bench_e2e.py
skips its rows with that reason), ``open_clip`` (eager), ``open_clip-bf16`` (eager, a copy of the model and its
image input in bfloat16),
``torch.compile`` (open_clip's encoders, default mode, static shapes), ``transformers``, ``ort-fp32`` and
``ort-int8`` (ONNX Runtime, CPU provider, torch's thread count, every graph optimisation; int8: the faster of
per-tensor / per-channel ``quantize_dynamic`` with cosine >= 0.99), and OpenVINO's CPU plugin
(``openvino.Core().compile_model`` with ``INFERENCE_NUM_THREADS`` = torch's thread count) on the ONNX export
converted to IR by ``openvino.convert_model``:

* ``ov-fp32``: ``INFERENCE_PRECISION_HINT=f32`` (the plugin's default is bf16 on CPUs with AMX or
  AVX512-BF16, which would not be an fp32 peer);
* ``ov-bf16``: ``INFERENCE_PRECISION_HINT=bf16``, a precision of its own;
* ``ov-int8``: ``nncf.quantize`` of the IR (``model_type=TRANSFORMER``, ``target_device=CPU``, the default
  MIXED preset), calibrated on ``OV_CALIBRATION`` inputs of the benchmark's kind (standard-normal images;
  bench/captions.py captions, tokenized as open_clip does) drawn from another seed than the benchmarks';
  f32 for the ops it leaves unquantised.

Each OpenVINO peer runs under ``PERFORMANCE_HINT=LATENCY`` on one item; on a batch it runs under whichever
of LATENCY (one request on all threads) and THROUGHPUT (the batch split over the plugin's optimal number of
requests, run at once on its streams) was faster on the benchmark's own input; the choice, both timings and
the compiled settings go in ``info``. ``unavailable(impl)`` names the optional packages a peer lacks.

ONNX files and OpenVINO IR (``openvino.xml``, ``openvino-int8-cal<N>.xml``, fp32 weights kept) are cached under
``FASTCLIP_BENCH_CACHE`` (default ``~/.cache/fastclip-bench``) in a folder named by architecture and a
fingerprint of the weights.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CACHE = Path(os.environ.get("FASTCLIP_BENCH_CACHE", Path.home() / ".cache" / "fastclip-bench"))
ATOL = RTOL = 1e-4  # fp32 peers vs open_clip eager
MIN_COSINE = 0.99  # int8 and bf16 peers vs fp32 (fastclip.tolerance.MIN_COSINE)
# OpenVINO peers: INFERENCE_PRECISION_HINT of each (the CPU plugin's default is bf16 on CPUs with AMX or
# AVX512-BF16, which would make "ov-fp32" a bf16 peer); ov-int8 runs NNCF's int8 ops and f32 everywhere else,
# like fastclip int8 and ONNX Runtime's dynamic int8.
OV_PRECISION = {"ov-fp32": "f32", "ov-bf16": "bf16", "ov-int8": "f32"}
OV_CALIBRATION = {"image": 64, "text": 128}  # NNCF calibration items per tower, one input each
# nncf.quantize's options beyond the dataset (its preset is then MIXED: symmetric int8 weights per channel,
# asymmetric activations per tensor, SmoothQuant on the MatMuls).
OV_INT8_OPTIONS = {"model_type": "TRANSFORMER", "target_device": "CPU"}
# Packages each optional peer needs (a row whose packages are missing is skipped, see ``unavailable``).
NEEDS = {"ort-fp32": ("onnx", "onnxscript", "onnxruntime"), "ort-int8": ("onnx", "onnxscript", "onnxruntime"),
         "ov-fp32": ("onnx", "onnxscript", "openvino"), "ov-bf16": ("onnx", "onnxscript", "openvino"),
         "ov-int8": ("onnx", "onnxscript", "openvino", "nncf")}

Encoder = Callable  # pixels (B, 3, S, S) -> (B, E), or captions list[str] -> (B, E)


def unavailable(impl: str) -> str | None:
    """Why ``impl`` cannot run here (an optional package it needs is not installed), or None."""
    missing = [name for name in NEEDS.get(impl, ()) if importlib.util.find_spec(name) is None]
    return f"{impl} needs {', '.join(missing)} (pip install 'fastclip[bench]')" if missing else None


def precision(impl: str) -> str:
    """The precision ``impl`` computes in: "int8", "bf16" or "fp32" (tables group peers by it)."""
    return "int8" if "int8" in impl else "bf16" if "bf16" in impl else "fp32"


def per_item_cosine(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(got.float(), want.float(), dim=-1)


def check_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """An fp32 peer must equal open_clip eager; raise naming the peer if not."""
    try:
        torch.testing.assert_close(got.float(), want.float(), atol=ATOL, rtol=RTOL)
    except AssertionError as exc:
        raise AssertionError(f"{name} disagrees with open_clip eager: {exc}") from None


def _weights_fingerprint(sd: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha1()
    for key in sorted(sd):
        digest.update(key.encode())
        digest.update(sd[key].detach().reshape(-1)[:4096].contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def hf_config(cfg):
    """transformers ``CLIPConfig`` of a fastclip QuickGELU CLIP ``ModelConfig``."""
    import transformers

    v, t = cfg.vision, cfg.text
    return transformers.CLIPConfig(
        projection_dim=cfg.embed_dim,
        vision_config=dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                           num_hidden_layers=v.layers, num_attention_heads=v.width // v.head_width,
                           image_size=v.image_size, patch_size=v.patch_size, hidden_act="quick_gelu"),
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
                         num_hidden_layers=t.layers, num_attention_heads=t.heads,
                         max_position_embeddings=t.context_length, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
    )


def openclip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fastclip names -> open_clip names (the inverse of ``keymaps.from_openclip`` for CLIP ViTs)."""
    out = {}
    for key, value in sd.items():
        if key == "log_logit_scale":
            key = "logit_scale"
        elif key.startswith("text."):
            key = key[len("text."):]
        out[key] = value
    return out


def hf_tokenizer():
    """transformers ``CLIPTokenizer`` over OpenAI's BPE (the file bundled with fastclip), no download."""
    import transformers

    from fastclip.data.tokenizers import _clip_vocab

    tokens, merges = _clip_vocab()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(tok, tok): i for i, tok in enumerate(tokens)}
    return transformers.CLIPTokenizer(vocab=vocab, merges=list(merges))


class _Tower(torch.nn.Module):
    """One open_clip tower as a module for ``torch.onnx.export``."""

    def __init__(self, model, tower: str):
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, x):
        return self.model.encode_image(x) if self.tower == "image" else self.model.encode_text(x)


class PeerSet:
    """Every implementation of one architecture on the same weights; each is built on first use."""

    def __init__(self, arch: str, seed: int = 0, model_name: str | None = None):
        """``model_name``: the config fastclip and open_clip build (default ``<arch>-quickgelu``; any QuickGELU
        CLIP both have registered, e.g. a tiny one in the tests)."""
        import open_clip
        import transformers

        import fastclip
        from fastclip.loading import keymaps

        self.arch = arch
        self.model_name = model_name or f"{arch}-quickgelu"
        self.cfg = fastclip.get_model_config(self.model_name)
        torch.manual_seed(seed)
        self.hf = transformers.CLIPModel(hf_config(self.cfg)).eval()
        self.state_dict = keymaps.from_hf(dict(self.hf.state_dict()), self.cfg)
        self.open_clip = open_clip.create_model(self.model_name, pretrained=None).eval()
        self.open_clip.load_state_dict(openclip_state_dict(self.state_dict), strict=True)
        self.cache_dir = CACHE / f"{arch}-{_weights_fingerprint(self.state_dict)}"
        self.info: dict[str, dict] = {}  # "<impl> <tower>" -> facts found at build time (cosines, choices)
        self._reference: dict[tuple, tuple] = {}  # (tower, id(input)) -> (input, open_clip eager output)
        self._built: dict[tuple, object] = {}  # fastclip models, ONNX Runtime sessions, OpenVINO models, built once

    # ------------------------------------------------------------------ fastclip
    def fastclip(self, precision: str = "fp32"):
        """fastclip (auto backend) on the shared weights, through the public ``fastclip.load`` of an
        OpenCLIP checkpoint written once into the cache; ``precision`` as ``fastclip.load`` takes it."""
        import fastclip

        key = ("fastclip", precision)
        if key not in self._built:
            self._built[key] = fastclip.load(self.model_name, pretrained=self.checkpoint_path(),
                                             precision=precision)
        return self._built[key]

    def checkpoint_path(self) -> Path:
        """The shared weights as an OpenCLIP ``.safetensors`` file (written on first use)."""
        import safetensors.torch

        path = self.cache_dir / "open_clip.safetensors"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.detach().contiguous().clone() for k, v in self.open_clip.state_dict().items()}
            safetensors.torch.save_file(tensors, str(path.with_suffix(".partial")))
            path.with_suffix(".partial").rename(path)
        return path

    # ------------------------------------------------------------------ reference outputs
    def reference(self, tower: str, inputs) -> torch.Tensor:
        """open_clip eager features of ``inputs`` (pixels, or a list of captions), cached per input."""
        key = (tower, id(inputs))
        if key not in self._reference:
            with torch.inference_mode():
                if tower == "image":
                    out = self.open_clip.encode_image(inputs)
                else:
                    out = self.open_clip.encode_text(self.open_clip_tokenizer(inputs))
            self._reference[key] = (inputs, out)  # holding the input keeps its id from being reused
        return self._reference[key][1]

    @functools.cached_property
    def open_clip_tokenizer(self):
        import open_clip

        return open_clip.get_tokenizer(self.model_name)

    @functools.cached_property
    def hf_tokenizer(self):
        return hf_tokenizer()

    @functools.cached_property
    def open_clip_bf16(self):
        """open_clip eager with every parameter and buffer in bfloat16 (``open_clip-bf16``; its image input is
        cast to bfloat16 too, token ids stay integers)."""
        import copy

        return copy.deepcopy(self.open_clip).to(torch.bfloat16).eval()

    # ------------------------------------------------------------------ torch.compile
    @functools.cached_property
    def compiled(self) -> dict[str, Callable]:
        """open_clip's encoders under ``torch.compile`` (default mode, one static graph per input shape)."""
        return {"image": torch.compile(self.open_clip.encode_image, dynamic=False),
                "text": torch.compile(self.open_clip.encode_text, dynamic=False)}

    # ------------------------------------------------------------------ ONNX Runtime
    def onnx_path(self, tower: str) -> Path:
        """The open_clip tower exported with a dynamic batch axis (text: 77 tokens), cached on disk as
        ``<tower>/model.onnx`` (+ ``model.onnx.data``, the weights, which the .onnx file names)."""
        path = self.cache_dir / tower / "model.onnx"
        if path.is_file():
            return path
        if tower == "image":
            size = self.cfg.vision.image_size
            example = torch.randn(2, 3, size, size)
        else:
            example = self.open_clip_tokenizer(["a photo of a cat", "a dog"])
        staging = self.cache_dir / f"{tower}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        torch.onnx.export(_Tower(self.open_clip, tower).eval(), (example,), str(staging / "model.onnx"), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch")},),
                          input_names=["input"], output_names=["features"], verbose=False)
        staging.rename(path.parent)  # complete exports only
        return path

    def int8_path(self, tower: str, per_channel: bool) -> Path:
        """``onnxruntime.quantization.quantize_dynamic`` of the fp32 export (its default weight type)."""
        from onnxruntime.quantization import quantize_dynamic

        fp32 = self.onnx_path(tower)
        path = fp32.with_name("int8-per-channel.onnx" if per_channel else "int8.onnx")
        if not path.is_file():
            staging = path.with_suffix(".partial")
            quantize_dynamic(str(fp32), str(staging), per_channel=per_channel)
            staging.rename(path)
        return path

    def ort_session(self, path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    def ort_int8(self, tower: str, example: torch.Tensor) -> Callable:
        """The faster of per-tensor / per-channel dynamic int8 among those with cosine >= 0.99 to fp32
        (timed on ``example``, the benchmark's own input); the choice and both cosines go in ``info``."""
        want = self._ort_fp32_features(tower, example)
        trials = {}
        for per_channel in (False, True):
            run = self.ort_session(self.int8_path(tower, per_channel))
            got = run(example)
            best = min(_seconds(run, example) for _ in range(2))
            trials["per-channel" if per_channel else "per-tensor"] = (run, per_item_cosine(got, want).min().item(), best)
        good = {k: v for k, v in trials.items() if v[1] >= MIN_COSINE} or trials
        choice = min(good, key=lambda k: good[k][2])
        self.info[f"ort-int8 {tower}"] = {
            "quantization": choice,
            **{f"min_cosine_{k}": round(v[1], 5) for k, v in trials.items()},
            **{f"seconds_{k}": round(v[2], 4) for k, v in trials.items()},
        }
        return trials[choice][0]

    def _ort_fp32_features(self, tower: str, example: torch.Tensor) -> torch.Tensor:
        key = ("ort-fp32", tower, id(example))
        if key not in self._reference:
            self._reference[key] = (example, self.ort_fp32(tower)(example))
        return self._reference[key][1]

    def ort_fp32(self, tower: str) -> Callable:
        key = ("ort-fp32", tower)
        if key not in self._built:
            self._built[key] = self.ort_session(self.onnx_path(tower))
        return self._built[key]

    # ------------------------------------------------------------------ OpenVINO
    def ov_ir_path(self, tower: str) -> Path:
        """The ONNX export (``onnx_path``) converted by ``openvino.convert_model`` and saved as OpenVINO IR with
        its fp32 weights kept (``compress_to_fp16=False``): ``<tower>/openvino.xml`` (+ ``.bin``)."""
        import openvino as ov

        path = self.onnx_path(tower).with_name("openvino.xml")
        if not path.is_file():
            _save_ir(ov.convert_model(str(self.onnx_path(tower))), path)
        return path

    def ov_int8_path(self, tower: str) -> Path:
        """NNCF post-training quantisation of the OpenVINO IR (``nncf.quantize``, ``OV_INT8_OPTIONS``), calibrated
        on ``ov_calibration(tower)``: ``<tower>/openvino-int8-cal<N>.xml`` (+ ``.bin``)."""
        import nncf
        import openvino as ov

        items = self.ov_calibration(tower)
        path = self.onnx_path(tower).with_name(f"openvino-int8-cal{len(items)}.xml")
        if not path.is_file():
            model = ov.Core().read_model(str(self.ov_ir_path(tower)))
            quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items),
                                      model_type=nncf.ModelType[OV_INT8_OPTIONS["model_type"]],
                                      target_device=nncf.TargetDevice[OV_INT8_OPTIONS["target_device"]])
            _save_ir(quantized, path)
        return path

    def ov_calibration(self, tower: str) -> list:
        """NNCF's calibration set, one item per inference: ``OV_CALIBRATION["image"]`` standard-normal images
        (the kind of input the benchmarks time, drawn from another seed) or ``OV_CALIBRATION["text"]`` captions
        of bench/captions.py (another seed than the benchmarks'), tokenized as open_clip does (77 tokens)."""
        if tower == "image":
            size = self.cfg.vision.image_size
            pixels = torch.randn(OV_CALIBRATION["image"], 3, size, size, generator=torch.Generator().manual_seed(1000))
            return [x[None].numpy() for x in pixels]
        from captions import realistic_captions

        tokens = self.open_clip_tokenizer(realistic_captions(OV_CALIBRATION["text"], seed=1000))
        return [t[None].numpy() for t in tokens]

    def ov_compiled(self, impl: str, tower: str, hint: str):
        """``openvino.Core().compile_model`` of ``impl``'s IR on the CPU: ``PERFORMANCE_HINT=hint``, torch's thread
        count, and the ``INFERENCE_PRECISION_HINT`` of ``OV_PRECISION[impl]`` (f32 unless the peer is bf16)."""
        import openvino as ov

        key = ("openvino", impl, tower, hint)
        if key not in self._built:
            path = self.ov_int8_path(tower) if impl == "ov-int8" else self.ov_ir_path(tower)
            config = {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                      "INFERENCE_PRECISION_HINT": OV_PRECISION[impl]}
            self._built[key] = ov.Core().compile_model(str(path), "CPU", config)
        return self._built[key]

    def ov_encoder(self, impl: str, tower: str, example: torch.Tensor) -> Callable:
        """``impl`` (``ov-fp32``, ``ov-bf16``, ``ov-int8``) on ``example``'s batch size: LATENCY for one item; for
        more, the faster on ``example`` of LATENCY (one request on every thread) and THROUGHPUT (the batch split
        over the plugin's optimal number of requests, run as parallel streams). The compiled settings, both
        timings and the choice go in ``info``."""
        key = ("openvino-runner", impl, tower, example.shape[0])
        if key in self._built:
            return self._built[key]
        hints = ("LATENCY",) if example.shape[0] == 1 else ("LATENCY", "THROUGHPUT")
        trials = {}
        for hint in hints:
            run = _OvRunner(self.ov_compiled(impl, tower, hint))
            run(example)  # warm-up
            trials[hint] = (run, min(_seconds(run, example) for _ in range(2)) if len(hints) > 1 else None)
        choice = min(trials, key=lambda h: trials[h][1] or 0.0)
        compiled = self.ov_compiled(impl, tower, choice)
        info = {"performance_hint": choice,
                "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
                "inference_num_threads": compiled.get_property("INFERENCE_NUM_THREADS"),
                "num_streams": int(compiled.get_property("NUM_STREAMS")),
                "infer_requests": trials[choice][0].requests}
        if len(hints) > 1:
            info.update({f"seconds_{h}": round(v[1], 4) for h, v in trials.items()})
        if impl == "ov-int8":
            options = ", ".join(f"{k}={v}" for k, v in OV_INT8_OPTIONS.items())
            info["quantization"] = f"nncf.quantize({options}), {len(self.ov_calibration(tower))} calibration items"
        self.info[f"{impl} {tower}"] = info
        self._built[key] = trials[choice][0]
        return self._built[key]

    # ------------------------------------------------------------------ encoders by name
    def image_encoder(self, impl: str, pixels: torch.Tensor) -> Encoder:
        """pixels -> features for ``impl``, checked against open_clip eager on ``pixels`` (also the warm-up)."""
        if impl == "fastclip":
            fn = self.fastclip().encode_image
        elif impl == "fastclip-int8":
            fn = self.fastclip("int8").encode_image
        elif impl == "fastclip-bf16":
            fn = self.fastclip("bf16").encode_image
        elif impl == "open_clip":
            fn = self.open_clip.encode_image
        elif impl == "open_clip-bf16":
            def fn(x):
                return self.open_clip_bf16.encode_image(x.to(torch.bfloat16))
        elif impl == "torch.compile":
            fn = self.compiled["image"]
        elif impl == "transformers":
            def fn(x):
                return _features(self.hf.get_image_features(pixel_values=x))
        elif impl == "ort-fp32":
            fn = self.ort_fp32("image")
        elif impl == "ort-int8":
            fn = self.ort_int8("image", pixels)
        elif impl in OV_PRECISION:
            fn = self.ov_encoder(impl, "image", pixels)
        else:
            raise ValueError(f"unknown implementation {impl!r}")
        self._check(impl, "image", fn, pixels)
        return fn

    def text_encoder(self, impl: str, captions: list[str]) -> Encoder:
        """captions -> features for ``impl`` (tokenization included), checked like ``image_encoder``."""
        oc_tok = self.open_clip_tokenizer
        if impl == "fastclip":  # the batch API: tokenize, group by length, encode, normalise
            model = self.fastclip()
            fn = model.embed_texts
        elif impl == "fastclip encode_text":
            model = self.fastclip()

            def fn(texts):
                return model.encode_text(model.tokenizer(texts))
        elif impl == "fastclip-int8":
            fn = self.fastclip("int8").embed_texts
        elif impl == "fastclip-bf16":
            fn = self.fastclip("bf16").embed_texts
        elif impl == "open_clip":
            def fn(texts):
                return self.open_clip.encode_text(oc_tok(texts))
        elif impl == "open_clip-bf16":
            def fn(texts):
                return self.open_clip_bf16.encode_text(oc_tok(texts))
        elif impl == "torch.compile":
            def fn(texts, compiled=self.compiled["text"]):
                return compiled(oc_tok(texts))
        elif impl == "transformers":
            def fn(texts):
                batch = self.hf_tokenizer(texts, padding="longest", return_tensors="pt")
                return _features(self.hf.get_text_features(input_ids=batch["input_ids"],
                                                           attention_mask=batch["attention_mask"]))
        elif impl in ("ort-fp32", "ort-int8"):  # the export takes open_clip's 77-token input
            run = self.ort_fp32("text") if impl == "ort-fp32" else self.ort_int8("text", oc_tok(captions))

            def fn(texts):
                return run(oc_tok(texts))
        elif impl in OV_PRECISION:  # the same export, the same 77-token input
            run = self.ov_encoder(impl, "text", oc_tok(captions))

            def fn(texts):
                return run(oc_tok(texts))
        else:
            raise ValueError(f"unknown implementation {impl!r}")
        self._check(impl, "text", fn, captions)
        return fn

    def _check(self, impl: str, tower: str, fn: Encoder, inputs) -> None:
        with torch.inference_mode():
            got = torch.as_tensor(fn(inputs))  # embed_texts returns a numpy array
        want = self.reference(tower, inputs)
        if impl == "fastclip" and tower == "text":  # embed_texts returns L2-normalised rows (cosine: scale-free)
            want = F.normalize(want, dim=-1)
        if precision(impl) != "fp32":
            cosine = per_item_cosine(got, want)
            self.info.setdefault(f"{impl} {tower}", {}).update(
                min_cosine_to_fp32=round(cosine.min().item(), 5), mean_cosine_to_fp32=round(cosine.mean().item(), 5))
            if impl not in ("fastclip-int8", "ort-int8") and cosine.min().item() < MIN_COSINE:
                raise AssertionError(f"{self.arch} {tower} {impl} disagrees with open_clip eager: per-item cosine "
                                     f"{cosine.min().item():.5f} < {MIN_COSINE}")
        else:
            check_close(f"{self.arch} {tower} {impl}", got, want)


def _features(out):
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _save_ir(model, path: Path) -> None:
    """Save an OpenVINO model as IR at ``path`` (.xml + .bin) with fp32 weights kept; complete files only."""
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.stem + ".partial.xml")
    ov.save_model(model, str(staging), compress_to_fp16=False)
    staging.with_suffix(".bin").rename(path.with_suffix(".bin"))
    staging.rename(path)  # the .xml last: it marks the IR complete


class _OvRunner:
    """Tensor in, features out through a compiled OpenVINO model. One request (LATENCY): the whole batch on
    it. More (THROUGHPUT): the batch split into one slice per request, run at once on the plugin's streams."""

    def __init__(self, compiled):
        import openvino as ov

        self.requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.request = compiled.create_infer_request()
        self.queue = ov.AsyncInferQueue(compiled, self.requests) if self.requests > 1 else None
        self._outputs: dict[int, object] = {}
        if self.queue is not None:
            self.queue.set_callback(self._done)

    def _done(self, request, index: int) -> None:
        self._outputs[index] = request.get_output_tensor(0).data.copy()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if self.queue is None or x.shape[0] == 1:
            return torch.from_numpy(self.request.infer([x.numpy()], share_inputs=True, share_outputs=False)[0])
        chunks = torch.tensor_split(x, min(self.requests, x.shape[0]))
        self._outputs.clear()
        for index, chunk in enumerate(chunks):
            self.queue.start_async([chunk.numpy()], userdata=index, share_inputs=True)
        self.queue.wait_all()
        return torch.from_numpy(np.concatenate([self._outputs[i] for i in range(len(chunks))]))


def _seconds(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


# ====================================================================== EVA02 / PE-Core and SigLIP 2 NaFlex
# Image-tower families whose upstream is not transformers' CLIPModel. Same shape as PeerSet: one set of
# (perturbed) random weights shared by every implementation, each checked against the upstream eager output on
# the benchmark's own input before it is timed.
BROKEN_COSINE = 0.9  # an int8 peer under this per-item cosine to fp32 computes something else: it raises
WEIGHT_NOISE = 0.02  # N(0, std) added to every upstream parameter, so no bias or LayerNorm weight keeps its init
# open_clip models built by name with timm trunks: every image peer but transformers (which has no such class)
OPENCLIP_IMAGE_PEERS = ("fastclip", "fastclip-int8", "fastclip-bf16", "open_clip", "open_clip-bf16", "torch.compile",
                        "ort-fp32", "ort-int8", "ov-fp32", "ov-bf16", "ov-int8")
NAFLEX_IMAGE_PEERS = ("fastclip", "fastclip-int8", "fastclip-bf16", "transformers", "torch.compile", "ort-fp32",
                      "ort-int8")
NAFLEX_SIZES = ((224, 224), (320, 180), (180, 320))  # (width, height) of the mixed-aspect benchmark images
NAFLEX_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")  # the vision model's (and export's)


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int, std: float = WEIGHT_NOISE) -> torch.nn.Module:
    """Add N(0, std) to every parameter (seeded); returns the module in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)
    return module.eval()


class OpenClipPeerSet(PeerSet):
    """A PeerSet of an open_clip model built by name (``open_clip.create_model(name, pretrained=None)``, seeded
    and perturbed), e.g. EVA02-B-16 or PE-Core-B-16 with their timm trunks; fastclip loads its OpenCLIP
    state dict. Its image peers are ``OPENCLIP_IMAGE_PEERS`` (every PeerSet peer but transformers); the ONNX
    export is PeerSet's: ``torch.onnx.export`` (dynamo) of ``encode_image`` with a dynamic batch axis. OpenVINO
    int8's cosine is recorded, not required (``_check``)."""

    def __init__(self, arch: str, seed: int = 0, model_name: str | None = None, model=None):
        """``model_name``: the config fastclip and open_clip know it by (default ``arch``); ``model``: an open_clip
        model to use instead of building one (e.g. a tiny one in the tests)."""
        import open_clip

        import fastclip

        self.arch = arch
        self.model_name = model_name or arch
        self.cfg = fastclip.get_model_config(self.model_name)
        if model is None:
            torch.manual_seed(seed)  # open_clip's (and timm's) init draw from the global generator
            model = perturb_(open_clip.create_model(self.model_name, pretrained=None), seed)
        self.hf = None
        self.open_clip = model.eval()
        self.state_dict = dict(self.open_clip.state_dict())
        self.cache_dir = CACHE / f"{arch}-{_weights_fingerprint(self.state_dict)}"
        self.info, self._reference, self._built = {}, {}, {}

    def image_encoder(self, impl: str, pixels: torch.Tensor) -> Encoder:
        if impl not in OPENCLIP_IMAGE_PEERS:
            raise ValueError(f"{impl!r} is not an image peer of {self.arch} (peers: {', '.join(OPENCLIP_IMAGE_PEERS)})")
        return super().image_encoder(impl, pixels)

    def _check(self, impl: str, tower: str, fn: Encoder, inputs) -> None:
        """PeerSet's check, except that OpenVINO int8's per-item cosine is recorded and, as ONNX Runtime int8's,
        not required to reach MIN_COSINE (NNCF's int8 of EVA02-B-16 reaches 0.988 on one of the 32 benchmark
        images; bench/report.py leaves int8 peers under MIN_COSINE out of its best peers); below
        ``BROKEN_COSINE`` the peer is wrong, not inaccurate, and raises."""
        if impl != "ov-int8":
            return super()._check(impl, tower, fn, inputs)
        with torch.inference_mode():
            cosine = per_item_cosine(torch.as_tensor(fn(inputs)), self.reference(tower, inputs))
        self.info.setdefault(f"{impl} {tower}", {}).update(
            min_cosine_to_fp32=round(cosine.min().item(), 5), mean_cosine_to_fp32=round(cosine.mean().item(), 5))
        if cosine.min().item() < BROKEN_COSINE:
            raise AssertionError(f"{self.arch} {tower} {impl} disagrees with open_clip eager: per-item cosine "
                                 f"{cosine.min().item():.5f} < {BROKEN_COSINE}")


def naflex_config(text_vocab: int = 256000):
    """transformers ``Siglip2Config`` with the sizes of google/siglip2-base-patch16-naflex: vision and text 768
    wide, 12 layers, 12 heads, MLP 3072; 16-pixel patches on a learned 16 x 16 position grid (num_patches 256);
    text: 64 positions, ``text_vocab`` tokens."""
    import transformers

    return transformers.Siglip2Config(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         vocab_size=text_vocab, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           patch_size=16, num_patches=256),
    )


def naflex_images(batch: int, seed: int = 0, sizes=NAFLEX_SIZES, scale: int = 1) -> list:
    """``batch`` RGB PIL images of random pixels, their (width, height) cycling through ``sizes`` (divided by
    ``scale``)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(batch):
        w, h = (side // scale for side in sizes[i % len(sizes)])
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB"))
    return out


class _NaflexVision(torch.nn.Module):
    """transformers' ``get_image_features`` on the processor's three tensors, as a module for the export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_attention_mask, spatial_shapes):
        return _features(self.model.get_image_features(pixel_values=pixel_values,
                                                       pixel_attention_mask=pixel_attention_mask,
                                                       spatial_shapes=spatial_shapes))


class _HfDirectoryPeers:
    """A peer set whose fastclip model loads from a transformers directory it writes once into its cache:
    ``_save(staging)`` writes the model and its processor (``self.cache_dir``, ``self._built`` set by __init__)."""

    def _save(self, staging: Path) -> None:
        raise NotImplementedError

    def directory(self) -> Path:
        """The model and its processor as a transformers directory (written once into the cache)."""
        path = self.cache_dir / "hf"
        if not (path / "config.json").is_file():
            staging = self.cache_dir / "hf.partial"
            shutil.rmtree(staging, ignore_errors=True)
            self._save(staging)
            shutil.rmtree(path, ignore_errors=True)
            staging.rename(path)
        return path

    def fastclip(self, precision: str = "fp32"):
        import fastclip

        key = ("fastclip", precision)
        if key not in self._built:
            self._built[key] = fastclip.load(self.directory(), precision=precision)
        return self._built[key]


class NaflexPeerSet(_HfDirectoryPeers):
    """SigLIP 2 NaFlex image peers on one set of weights: a transformers ``Siglip2Model`` (seeded, perturbed)
    with its ``Siglip2ImageProcessor`` (``max_num_patches``), written as a directory (``save_pretrained`` of both)
    that ``fastclip.load`` reads. Every encoder takes a list of PIL images (of mixed aspect ratios) and includes
    its preprocessing:

    * ``fastclip`` / ``fastclip-int8`` / ``fastclip-bf16``: ``embed_images`` (L2-normalised rows; uint8 patches
      with the pixel normalisation folded into the patch embedding);
    * ``transformers``: the processor, then ``get_image_features`` (eager) -- the reference;
    * ``torch.compile``: the processor, then transformers' vision model under ``torch.compile`` (default mode,
      static shapes: the processor pads every image to ``max_num_patches``);
    * ``ort-fp32`` / ``ort-int8``: the processor, then ONNX Runtime on ``torch.onnx.export`` (dynamo) of
      ``get_image_features`` with a dynamic batch axis, exported with ``TRANSFORMERS_DISABLE_TORCH_CHECK=1``
      (transformers' input checks in ``resize_positional_embeddings`` trace to ``aten._is_all_true``, which has
      no ONNX function); int8: ``quantize_dynamic``, the faster of per-tensor / per-channel with cosine >= 0.99.
    """

    def __init__(self, arch: str = "SigLIP2-NaFlex-B-16", seed: int = 0, config=None, max_num_patches: int = 256):
        import transformers

        self.arch = arch
        config = config or naflex_config()
        torch.manual_seed(seed)  # transformers' init draws from the global generator
        self.hf = perturb_(transformers.Siglip2Model(config), seed)
        self.processor = transformers.Siglip2ImageProcessor(patch_size=config.vision_config.patch_size,
                                                            max_num_patches=max_num_patches)
        self.cache_dir = CACHE / f"{arch}-{_weights_fingerprint(dict(self.hf.state_dict()))}"
        self.info: dict[str, dict] = {}
        self._reference: dict[int, tuple] = {}
        self._built: dict[tuple, object] = {}

    def _save(self, staging: Path) -> None:
        self.hf.save_pretrained(staging)
        self.processor.save_pretrained(staging)

    def inputs(self, images: list) -> dict[str, torch.Tensor]:
        """The processor's tensors of ``images``: patches (B, max_num_patches, 3 P^2), mask, (h, w) grids."""
        out = self.processor(images=images, return_tensors="pt")
        return {name: out[name] for name in NAFLEX_INPUTS}

    def reference(self, images: list) -> torch.Tensor:
        """transformers eager features of ``images`` (processor + ``get_image_features``), cached per list."""
        if id(images) not in self._reference:
            with torch.inference_mode():
                self._reference[id(images)] = (images, _features(self.hf.get_image_features(**self.inputs(images))))
        return self._reference[id(images)][1]

    @functools.cached_property
    def compiled(self) -> Callable:
        return torch.compile(self.hf.vision_model, dynamic=False)

    # ------------------------------------------------------------------ ONNX Runtime
    def onnx_path(self) -> Path:
        """``get_image_features`` exported with a dynamic batch axis: ``image/model.onnx`` (+ ``.data``)."""
        path = self.cache_dir / "image" / "model.onnx"
        if path.is_file():
            return path
        example = self.inputs(naflex_images(2, seed=1))
        staging = self.cache_dir / "image.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        batch = torch.export.Dim("batch")
        before = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
        os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"  # aten._is_all_true (the input checks) has no ONNX op
        try:
            torch.onnx.export(_NaflexVision(self.hf).eval(), tuple(example[n] for n in NAFLEX_INPUTS),
                              str(staging / "model.onnx"), dynamo=True, dynamic_shapes=tuple({0: batch} for _ in NAFLEX_INPUTS),
                              input_names=list(NAFLEX_INPUTS), output_names=["features"], verbose=False)
        finally:
            if before is None:
                os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
            else:
                os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = before
        staging.rename(path.parent)
        return path

    def ort_session(self, path: Path) -> Callable:
        """images' processor tensors -> features through an ONNX Runtime session on ``path`` (as PeerSet's)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda inputs: torch.from_numpy(session.run(None, {n: inputs[n].numpy() for n in NAFLEX_INPUTS})[0])

    def ort_fp32(self) -> Callable:
        if "ort-fp32" not in self._built:
            self._built["ort-fp32"] = self.ort_session(self.onnx_path())
        return self._built["ort-fp32"]

    def ort_int8(self, example: dict[str, torch.Tensor]) -> Callable:
        """The faster of per-tensor / per-channel ``quantize_dynamic`` among those with cosine >= 0.99 to the
        fp32 export on ``example``; the choice, cosines and timings go in ``info``."""
        from onnxruntime.quantization import quantize_dynamic

        want = self.ort_fp32()(example)
        trials = {}
        for per_channel in (False, True):
            path = self.onnx_path().with_name("int8-per-channel.onnx" if per_channel else "int8.onnx")
            if not path.is_file():
                quantize_dynamic(str(self.onnx_path()), str(path.with_suffix(".partial")), per_channel=per_channel)
                path.with_suffix(".partial").rename(path)
            run = self.ort_session(path)
            cosine = per_item_cosine(run(example), want).min().item()
            trials["per-channel" if per_channel else "per-tensor"] = (run, cosine, min(_seconds(run, example)
                                                                                        for _ in range(2)))
        good = {k: v for k, v in trials.items() if v[1] >= MIN_COSINE} or trials
        choice = min(good, key=lambda k: good[k][2])
        self.info["ort-int8 image"] = {"quantization": choice,
                                       **{f"min_cosine_{k}": round(v[1], 5) for k, v in trials.items()},
                                       **{f"seconds_{k}": round(v[2], 4) for k, v in trials.items()}}
        return trials[choice][0]

    # ------------------------------------------------------------------ encoders by name
    def image_encoder(self, impl: str, images: list) -> Encoder:
        """PIL images -> features for ``impl`` (preprocessing included), checked against transformers eager on
        ``images`` (also the warm-up)."""
        if impl in ("fastclip", "fastclip-int8", "fastclip-bf16"):
            fn = self.fastclip(impl.split("-")[1] if "-" in impl else "fp32").embed_images
        elif impl == "transformers":
            def fn(imgs):
                return _features(self.hf.get_image_features(**self.inputs(imgs)))
        elif impl == "torch.compile":
            def fn(imgs, compiled=self.compiled):
                return compiled(**self.inputs(imgs)).pooler_output
        elif impl in ("ort-fp32", "ort-int8"):
            run = self.ort_fp32() if impl == "ort-fp32" else self.ort_int8(self.inputs(images))

            def fn(imgs):
                return run(self.inputs(imgs))
        else:
            raise ValueError(f"{impl!r} is not an image peer of {self.arch} (peers: {', '.join(NAFLEX_IMAGE_PEERS)})")
        self._check(impl, fn, images)
        return fn

    def _check(self, impl: str, fn: Encoder, images: list) -> None:
        with torch.inference_mode():
            got = torch.as_tensor(fn(images))  # embed_images returns a numpy array
        want = self.reference(images)
        if impl.startswith("fastclip"):  # embed_images returns L2-normalised rows
            want = F.normalize(want, dim=-1)
        if precision(impl) != "fp32":
            cosine = per_item_cosine(got, want)
            self.info.setdefault(f"{impl} image", {}).update(
                min_cosine_to_fp32=round(cosine.min().item(), 5), mean_cosine_to_fp32=round(cosine.mean().item(), 5))
            if impl == "fastclip-bf16" and cosine.min().item() < MIN_COSINE:
                raise AssertionError(f"{self.arch} image {impl} disagrees with transformers eager: per-item cosine "
                                     f"{cosine.min().item():.5f} < {MIN_COSINE}")
        else:
            try:
                torch.testing.assert_close(got.float(), want.float(), atol=ATOL, rtol=RTOL)
            except AssertionError as exc:
                raise AssertionError(f"{self.arch} image {impl} disagrees with transformers eager: {exc}") from None


# ====================================================================== Chinese-CLIP text tower
# A transformers ChineseCLIPModel with OFA-Sys/chinese-clip-vit-base-patch16's text tower (RoBERTa-wwm-ext base:
# 768 wide, 12 layers, 12 heads, MLP 3072, 21128 tokens, projection 512) and a one-layer 64-wide image tower (the
# rows time texts only), seeded and perturbed, saved with a ChineseCLIPProcessor (BertTokenizer over fastclip's
# bundled Chinese-CLIP vocabulary) as the directory fastclip loads.
CN_CLIP_TEXT_PEERS = ("fastclip", "fastclip encode_text", "fastclip-int8", "transformers", "torch.compile", "ort-fp32")
CN_CLIP_CONTEXT = 52  # cn_clip's context length: fastclip's tokenizer pads to it, the compiled / exported peers too
_CN_SUBJECTS = ["一只小猫", "两个孩子", "一位老人", "一辆红色的公交车", "一条小狗", "一群游客", "一碗热汤面", "一座高楼",
                "一艘小船", "一位穿着白色衬衫的年轻女子", "一匹马", "一杯咖啡", "几只鸽子", "一个骑自行车的男人"]
_CN_VERBS = ["坐在", "站在", "走过", "停在", "躺在", "望着", "穿过", "放在", "飞过", "漂浮在", "靠在", "等在"]
_CN_PLACES = ["沙滩上", "厨房的桌子旁", "热闹的街道", "雪山脚下", "城市公园里", "木制码头边", "安静的湖面", "火车站",
              "草地上", "拥挤的市场", "空旷的公路", "河岸边"]
_CN_DETAILS = ["夕阳西下", "下着小雨", "阳光明媚的下午", "背景是高大的树木", "天空中飘着白云", "周围长满了青草",
               "旁边有一把红伞", "黑白照片", "清晨柔和的光线", "远处有人在观看", "冬天的暴风雪中", "古老的石墙旁"]


def chinese_captions(n: int = 256, seed: int = 0) -> list[str]:
    """``n`` seeded Chinese captions of 5 to ~45 characters (most short, as bench/captions.py's English ones)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(_CN_SUBJECTS), rng.choice(_CN_VERBS), rng.choice(_CN_PLACES)]
        parts += [("，" + rng.choice(_CN_DETAILS)) for _ in range(min(3, int(rng.expovariate(1.0))))]
        out.append("".join(parts) + "。")
    return out


def chinese_clip_config():
    """transformers ``ChineseCLIPConfig``: chinese-clip-vit-base-patch16's text tower and projection, a tiny image
    tower."""
    import transformers

    return transformers.ChineseCLIPConfig(
        text_config=dict(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=512)


class _CnText(torch.nn.Module):
    """transformers' ``get_text_features`` on (input_ids, attention_mask), as a module for compile and export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return _features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class ChineseClipPeerSet(_HfDirectoryPeers):
    """Chinese-CLIP text peers on one set of weights; every encoder takes a list of captions and includes its
    tokenization:

    * ``fastclip`` / ``fastclip-int8``: ``embed_texts`` of ``fastclip.load(directory)`` (L2-normalised rows);
      ``fastclip encode_text``: ``encode_text(tokenizer(texts))`` (52 tokens, padded rows trimmed by the tower);
    * ``transformers``: the directory's tokenizer with ``padding="longest"`` and its attention mask, then
      ``get_text_features`` (eager) -- the reference;
    * ``torch.compile``: ``get_text_features`` under ``torch.compile`` (default mode, static shapes: 52 tokens);
    * ``ort-fp32``: ONNX Runtime on ``torch.onnx.export`` (dynamo) of ``get_text_features`` with a dynamic batch
      axis, on the 52-token input.
    """

    def __init__(self, arch: str = "CN-CLIP-ViT-B-16", seed: int = 0, config=None):
        import transformers

        self.arch = arch
        config = config or chinese_clip_config()
        torch.manual_seed(seed)  # transformers' init draws from the global generator
        self.hf = perturb_(transformers.ChineseCLIPModel(config), seed)
        from fastclip.data.wordpiece import _bundled_vocab

        self.tokenizer = transformers.BertTokenizer(vocab=dict(_bundled_vocab()))
        self.cache_dir = CACHE / f"{arch}-text-{_weights_fingerprint(dict(self.hf.state_dict()))}"
        self.info: dict[str, dict] = {}
        self._reference: dict[int, tuple] = {}
        self._built: dict[tuple, object] = {}

    def _save(self, staging: Path) -> None:
        import transformers

        self.hf.save_pretrained(staging)
        size = self.hf.config.vision_config.image_size
        images = transformers.ChineseCLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False)
        transformers.ChineseCLIPProcessor(image_processor=images, tokenizer=self.tokenizer).save_pretrained(staging)

    def tokens(self, texts: list[str], padding="max_length") -> dict[str, torch.Tensor]:
        """The tokenizer's input_ids and attention_mask (B, L): 52 tokens, or the longest text's with "longest"."""
        out = self.tokenizer(texts, padding=padding, max_length=CN_CLIP_CONTEXT, truncation=True, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def reference(self, texts: list[str]) -> torch.Tensor:
        """transformers eager features of ``texts``, cached per list."""
        if id(texts) not in self._reference:
            with torch.inference_mode():
                self._reference[id(texts)] = (texts, _features(self.hf.get_text_features(**self.tokens(texts))))
        return self._reference[id(texts)][1]

    @functools.cached_property
    def compiled(self) -> Callable:
        return torch.compile(_CnText(self.hf).eval(), dynamic=False)

    def onnx_path(self) -> Path:
        """``get_text_features`` exported with a dynamic batch axis: ``text/model.onnx`` (+ ``.data``)."""
        path = self.cache_dir / "text" / "model.onnx"
        if path.is_file():
            return path
        example = self.tokens(chinese_captions(2, seed=1))
        staging = self.cache_dir / "text.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        batch = torch.export.Dim("batch")
        torch.onnx.export(_CnText(self.hf).eval(), (example["input_ids"], example["attention_mask"]),
                          str(staging / "model.onnx"), dynamo=True, dynamic_shapes=({0: batch}, {0: batch}),
                          input_names=["input_ids", "attention_mask"], output_names=["features"], verbose=False)
        staging.rename(path.parent)
        return path

    def ort_fp32(self) -> Callable:
        if "ort-fp32" not in self._built:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = ort.InferenceSession(str(self.onnx_path()), opts, providers=["CPUExecutionProvider"])
            self._built["ort-fp32"] = lambda t: torch.from_numpy(
                session.run(None, {k: v.numpy() for k, v in t.items()})[0])
        return self._built["ort-fp32"]

    def text_encoder(self, impl: str, captions: list[str]) -> Encoder:
        """captions -> features for ``impl`` (tokenization included), checked against transformers eager on
        ``captions`` (also the warm-up)."""
        if impl in ("fastclip", "fastclip-int8"):
            fn = self.fastclip("int8" if impl == "fastclip-int8" else "fp32").embed_texts
        elif impl == "fastclip encode_text":
            model = self.fastclip()

            def fn(texts):
                return model.encode_text(model.tokenizer(texts))
        elif impl == "transformers":
            def fn(texts):
                return _features(self.hf.get_text_features(**self.tokens(texts, padding="longest")))
        elif impl == "torch.compile":
            def fn(texts, compiled=self.compiled):
                return compiled(**self.tokens(texts))
        elif impl == "ort-fp32":
            run = self.ort_fp32()

            def fn(texts):
                return run(self.tokens(texts))
        else:
            raise ValueError(f"{impl!r} is not a text peer of {self.arch} (peers: {', '.join(CN_CLIP_TEXT_PEERS)})")
        self._check(impl, fn, captions)
        return fn

    def _check(self, impl: str, fn: Encoder, captions: list[str]) -> None:
        with torch.inference_mode():
            got = torch.as_tensor(fn(captions))  # embed_texts returns a numpy array
        want = self.reference(captions)
        if impl in ("fastclip", "fastclip-int8"):  # embed_texts returns L2-normalised rows
            want = F.normalize(want, dim=-1)
        if precision(impl) != "fp32":
            cosine = per_item_cosine(got, want)
            self.info.setdefault(f"{impl} text", {}).update(
                min_cosine_to_fp32=round(cosine.min().item(), 5), mean_cosine_to_fp32=round(cosine.mean().item(), 5))
            if cosine.min().item() < BROKEN_COSINE:
                raise AssertionError(f"{self.arch} text {impl} disagrees with transformers eager: per-item cosine "
                                     f"{cosine.min().item():.5f} < {BROKEN_COSINE}")
        else:
            try:
                torch.testing.assert_close(got.float(), want.float(), atol=ATOL, rtol=RTOL)
            except AssertionError as exc:
                raise AssertionError(f"{self.arch} text {impl} disagrees with transformers eager: {exc}") from None
