"""``PeerSet``: the CLIP peers of one QuickGELU CLIP architecture on one set of weights (transformers' CLIPModel
renamed into fastclip's and open_clip's layouts), and ``OpenClipPeerSet``: those of an open_clip model built by name
(EVA02, PE-Core, ResNets)."""
from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import (
    BROKEN_COSINE,
    MIN_COSINE,
    Encoder,
    _features,
    _seconds,
    _weights_fingerprint,
    cache_root,
    check_close,
    per_item_cosine,
    perturb_,
    precision,
)
from .openvino import OV_CALIBRATION, OV_PRECISION, _OvPeers

# open_clip models built by name with timm trunks: every image peer but transformers (which has no such class)
OPENCLIP_IMAGE_PEERS = ("fastclip", "fastclip-int8", "fastclip-bf16", "open_clip", "open_clip-bf16", "torch.compile",
                        "ort-fp32", "ort-int8", "ov-fp32", "ov-bf16", "ov-int8")


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


class PeerSet(_OvPeers):
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
        self.cache_dir = cache_root() / f"{arch}-{_weights_fingerprint(self.state_dict)}"
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

    # ------------------------------------------------------------------ OpenVINO (the IR, NNCF int8, runners: _OvPeers)
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


# ====================================================================== EVA02 / PE-Core and SigLIP 2 NaFlex
# Image-tower families whose upstream is not transformers' CLIPModel. Same shape as PeerSet: one set of
# (perturbed) random weights shared by every implementation, each checked against the upstream eager output on
# the benchmark's own input before it is timed.


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
        self.cache_dir = cache_root() / f"{arch}-{_weights_fingerprint(self.state_dict)}"
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
