"""SigLIP 2 NaFlex image peers (``NaflexPeerSet``): a transformers Siglip2Model, seeded and perturbed, with its
processor; every encoder takes PIL images of mixed aspect ratios and includes its preprocessing."""
from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .common import (
    ATOL,
    MIN_COSINE,
    RTOL,
    Encoder,
    _features,
    _HfDirectoryPeers,
    _seconds,
    _weights_fingerprint,
    cache_root,
    per_item_cosine,
    perturb_,
    precision,
)
from .openvino import OV_CALIBRATION, _OvPeers

NAFLEX_IMAGE_PEERS = ("fastclip", "fastclip-int8", "fastclip-bf16", "transformers", "torch.compile", "ort-fp32",
                      "ort-int8", "ov-fp32", "ov-int8")
NAFLEX_SIZES = ((224, 224), (320, 180), (180, 320))  # (width, height) of the mixed-aspect benchmark images
NAFLEX_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")  # the vision model's (and export's)


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


class NaflexPeerSet(_HfDirectoryPeers, _OvPeers):
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
      no ONNX function); int8: ``quantize_dynamic``, the faster of per-tensor / per-channel with cosine >= 0.99;
    * ``ov-fp32`` / ``ov-int8``: the processor, then OpenVINO's CPU plugin on the same export converted to IR, as
      PeerSet's OpenVINO peers (``_OvPeers``: fp32 weights kept, ``INFERENCE_PRECISION_HINT=f32``, LATENCY or
      THROUGHPUT); int8: ``nncf.quantize`` calibrated on ``ov_calibration``, per-item cosine >= ``MIN_COSINE``.
    """

    def __init__(self, arch: str = "SigLIP2-NaFlex-B-16", seed: int = 0, config=None, max_num_patches: int = 256,
                 calibration_scale: int = 1):
        """``calibration_scale``: the ``scale`` of ``naflex_images`` that OpenVINO int8's calibration images are
        drawn at (that of the images timed: NNCF's activation ranges depend on the pixels' resize)."""
        import transformers

        self.arch = arch
        config = config or naflex_config()
        torch.manual_seed(seed)  # transformers' init draws from the global generator
        self.hf = perturb_(transformers.Siglip2Model(config), seed)
        self.processor = transformers.Siglip2ImageProcessor(patch_size=config.vision_config.patch_size,
                                                            max_num_patches=max_num_patches)
        self.cache_dir = cache_root() / f"{arch}-{_weights_fingerprint(dict(self.hf.state_dict()))}"
        self.calibration_scale = calibration_scale
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
    def onnx_path(self, tower: str = "image") -> Path:
        """``get_image_features`` exported with a dynamic batch axis: ``image/model.onnx`` (+ ``.data``); ``tower``
        (the OpenVINO peers name one) can only be "image"."""
        if tower != "image":
            raise ValueError(f"{self.arch} peers have an image tower only, not {tower!r}")
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

    # ------------------------------------------------------------------ OpenVINO (the IR, NNCF int8, runners: _OvPeers)
    def ov_calibration(self, tower: str = "image") -> list[dict]:
        """NNCF's calibration set, one item per inference: the processor's three arrays (batch 1, by input name) of
        ``OV_CALIBRATION["image"]`` random-pixel images of the benchmark's mixed sizes (``naflex_images`` at
        ``calibration_scale``, another seed than the benchmarks')."""
        inputs = self.inputs(naflex_images(OV_CALIBRATION[tower], seed=1000, scale=self.calibration_scale))
        return [{n: inputs[n][i:i + 1].numpy() for n in NAFLEX_INPUTS} for i in range(OV_CALIBRATION[tower])]

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
        elif impl in ("ov-fp32", "ov-int8"):  # the same export, the processor's three tensors by name
            run = self.ov_encoder(impl, "image", self.inputs(images))

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
            if impl in ("fastclip-bf16", "ov-int8") and cosine.min().item() < MIN_COSINE:
                raise AssertionError(f"{self.arch} image {impl} disagrees with transformers eager: per-item cosine "
                                     f"{cosine.min().item():.5f} < {MIN_COSINE}")
        else:
            try:
                torch.testing.assert_close(got.float(), want.float(), atol=ATOL, rtol=RTOL)
            except AssertionError as exc:
                raise AssertionError(f"{self.arch} image {impl} disagrees with transformers eager: {exc}") from None
