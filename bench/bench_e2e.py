"""End-to-end encoder throughput: fastclip beside its peers, in the same run, on the same weights and inputs.

    python -m pytest bench/bench_e2e.py --benchmark-json /tmp/e2e.json && python bench/report.py /tmp/e2e.json
    python -m pytest bench/bench_e2e.py --benchmark-disable -x          # smoke check: every row once
    python -m pytest bench/bench_e2e.py -k "ViT-B-32 and b32"            # one group
    FASTCLIP_BENCH_LARGE=1 python -m pytest bench/bench_e2e.py -k ViT-L-14

Implementations (bench/peers/): fastclip (auto backend), fastclip int8 (``precision="int8"``), fastclip
bf16 (``precision="bf16"``: oneDNN bf16 GEMMs; skipped with the reason on CPUs without AVX512-BF16 or AMX),
open_clip eager, open_clip eager in bfloat16 (``open_clip-bf16``: model and image input), open_clip under
``torch.compile``, transformers, ONNX Runtime fp32 on the exported open_clip towers and its dynamic int8
quantisation, and OpenVINO (CPU plugin, ``INFERENCE_NUM_THREADS`` = torch's thread count) on the same
exports: ``ov-fp32`` (``INFERENCE_PRECISION_HINT=f32``; the plugin would default to bf16 on AMX CPUs),
``ov-bf16`` (bf16) and ``ov-int8`` (NNCF post-training quantisation, ``model_type=TRANSFORMER``, calibrated
on inputs of the benchmark's kind, f32 elsewhere). Each OpenVINO row runs under ``PERFORMANCE_HINT=LATENCY``
at batch 1, and on a batch under whichever of LATENCY and THROUGHPUT was faster on the row's own input in a
quick check before timing (the choice and both timings are in its ``extra_info``). A row whose optional
packages (ONNX Runtime, OpenVINO, NNCF) are not installed is skipped with the reason.

Images: ViT-B-32 and ViT-B-16 at batch 1 and 32, ViT-L-14 at batch 1 and 8 (only with
FASTCLIP_BENCH_LARGE=1). EVA02-B-16 and PE-Core-B-16 at batch 1 and 32 (``test_eva_images``: open_clip built by
name with its timm trunk, every peer above but transformers), and SigLIP 2 NaFlex at batch 1 and 32
(``test_naflex_images``: a transformers Siglip2Model of siglip2-base-patch16-naflex's sizes, PIL images of mixed
aspect ratios, preprocessing in every row: fastclip's ``embed_images``, transformers' processor +
``get_image_features``, its vision model under ``torch.compile``, ONNX Runtime fp32 / int8 of its export,
OpenVINO fp32 / NNCF int8 of the same export on the processor's three tensors):

    python -m pytest bench/bench_e2e.py -k "test_eva_images and EVA02-B-16"
    python -m pytest bench/bench_e2e.py -k "test_eva_images and PE-Core-B-16"
    python -m pytest bench/bench_e2e.py -k "test_naflex_images"

OpenAI ResNets RN50 (224) and RN50x4 (288) at batch 1 and 32 (``test_resnet_images``: open_clip built by name,
every peer of the EVA rows; FLOPs from bench/flops.py ``resnet_image_flops``, the convolutions and the attention
pool's useful work):

    python -m pytest bench/bench_e2e.py -k "test_resnet_images and RN50-"

Text: 256 captions of 5-40 words (bench/captions.py) through the ViT-B-32 text
tower, tokenization included in every row: fastclip's ``embed_texts`` and ``encode_text(tokenizer(...))``,
open_clip, ONNX Runtime and OpenVINO on open_clip's 77-token input, transformers with ``padding="longest"``
and its attention mask.

Chinese-CLIP text (``test_chinese_clip_captions``): 256 Chinese captions (peers.chinese_captions) through a
transformers ChineseCLIPModel with CN-CLIP-ViT-B-16's text tower (RoBERTa-wwm-ext base), tokenization included:
fastclip's ``embed_texts`` / ``encode_text`` (int8 too) on its directory, transformers eager with
``padding="longest"``, ``torch.compile`` and ONNX Runtime fp32 on the 52-token input:

    python -m pytest bench/bench_e2e.py -k test_chinese_clip_captions

Each row's ``extra_info``: items_per_s (images/s or texts/s), latency_ms (mean time of one call),
gflops_per_s (bench/flops.py), fraction_of_sgemm (this machine's sgemm rate, bench/sgemm.py, measured
in the same session), fraction_of_peak (of the arithmetic peak of the row's precision, csrc/peak.cpp: the
FMA peak for fp32 rows, the int8 dot-product peak for int8 rows, whose attention still runs in fp32), precision (fp32, bf16 or int8); int8 and bf16 rows add their per-item cosine to
open_clip fp32. Every implementation's output is checked against open_clip eager before it is timed
(fp32: ``assert_close`` at 1e-4; bf16 rows and OpenVINO int8: per-item cosine >= 0.99). bench/report.py
reads off the best peer of each precision.
"""
import os

import pytest
import torch

from captions import realistic_captions
from conftest import rate
from flops import bert_caption_flops, caption_flops, image_flops, naflex_image_flops, resnet_image_flops
from peers import (
    CN_CLIP_TEXT_PEERS,
    NAFLEX_IMAGE_PEERS,
    NAFLEX_SIZES,
    OPENCLIP_IMAGE_PEERS,
    ChineseClipPeerSet,
    NaflexPeerSet,
    OpenClipPeerSet,
    chinese_captions,
    naflex_images,
    precision,
    unavailable,
)
from sgemm import SHAPES

IMPLS = ["fastclip", "fastclip-int8", "fastclip-bf16", "open_clip", "open_clip-bf16", "torch.compile", "transformers",
         "ort-fp32", "ort-int8", "ov-fp32", "ov-bf16", "ov-int8"]
TEXT_IMPLS = ["fastclip", "fastclip encode_text", *IMPLS[1:]]
LARGE = os.environ.get("FASTCLIP_BENCH_LARGE") == "1"
IMAGE_ROUNDS = {  # architecture: {batch: rounds}
    "ViT-B-32": {1: 20, 32: 5},
    "ViT-B-16": {1: 10, 32: 3},
    "ViT-L-14": {1: 5, 8: 3},
}
CAPTIONS = realistic_captions(256, seed=0)
_INPUTS: dict = {}  # one input per (architecture, batch), so open_clip's reference output is computed once
_FLOPS: dict = {}


def _missing(impl: str) -> list:
    """A skip mark for an implementation whose optional packages are not installed."""
    reason = unavailable(impl)
    return [pytest.mark.skip(reason=reason)] if reason else []


def _image_cases():
    skip_large = pytest.mark.skipif(not LARGE, reason="ViT-L-14 rows run with FASTCLIP_BENCH_LARGE=1")
    for arch, batches in IMAGE_ROUNDS.items():
        for batch in batches:
            for impl in IMPLS:
                marks = [skip_large] if arch == "ViT-L-14" else []
                yield pytest.param(arch, batch, impl, id=f"{arch}-b{batch}-{impl}", marks=marks + _missing(impl))


def _build_or_skip(build, impl: str):
    """Build an encoder; a missing optional implementation skips its row with the reason."""
    try:
        return build()
    except (ValueError, NotImplementedError) as exc:
        if impl in ("fastclip-int8", "fastclip-bf16"):  # e.g. bf16 on a CPU without AVX512-BF16 / AMX
            pytest.skip(f"{impl} is not available here: {exc}")
        raise
    except Exception as exc:
        if impl == "torch.compile" and not isinstance(exc, AssertionError):
            pytest.skip(f"torch.compile failed on this machine: {type(exc).__name__}: {exc}")
        raise


def _record(benchmark, peers, impl: str, tower: str, items: int, flops_per_item: float, sgemm: float,
            peaks: dict[str, float], **facts):
    rate(benchmark, items, flops_per_item, sgemm, peaks.get(precision(impl)))
    benchmark.extra_info.update(impl=impl, arch=peers.arch, workload=tower, precision=precision(impl), **facts)
    for key in (f"{impl} {tower}", f"ort-int8 {tower}" if impl == "ort-int8" else None):
        benchmark.extra_info.update(peers.info.get(key, {}))


def test_sgemm(benchmark, sgemm_gflops, peak_rates):
    """This machine's sgemm rate (the yardstick of every fraction_of_sgemm) and arithmetic peaks (of every
    fraction_of_peak: fp32 rows against the FMA peak, int8 rows against the int8 dot-product peak), as a row."""
    benchmark.group = "sgemm"
    m, k, n = SHAPES["2048^3"]
    a, b = torch.randn(m, k), torch.randn(k, n)
    benchmark.pedantic(torch.mm, args=(a, b), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(impl="torch.mm", sgemm_gflops=sgemm_gflops,
                                **{f"peak_{name}": value for name, value in peak_rates.items()})


@pytest.mark.parametrize("impl", [pytest.param(impl, marks=_missing(impl)) for impl in TEXT_IMPLS])
def test_captions(benchmark, peer_set, sgemm_gflops, peak_rates, impl):
    peers = peer_set("ViT-B-32")
    benchmark.group = f"ViT-B-32 text, {len(CAPTIONS)} captions"
    if "captions" not in _FLOPS:
        _FLOPS["captions"] = caption_flops(peers.hf, peers.hf_tokenizer, CAPTIONS) / len(CAPTIONS)
    fn = _build_or_skip(lambda: peers.text_encoder(impl, CAPTIONS), impl)
    with torch.inference_mode():
        benchmark.pedantic(fn, args=(CAPTIONS,), rounds=3, warmup_rounds=1)
    _record(benchmark, peers, impl, "text", len(CAPTIONS), _FLOPS["captions"], sgemm_gflops, peak_rates,
            batch=len(CAPTIONS))


@pytest.mark.parametrize("arch, batch, impl", list(_image_cases()))
def test_images(benchmark, peer_set, sgemm_gflops, peak_rates, arch, batch, impl):
    _time_images(benchmark, peer_set(arch), arch, batch, impl, IMAGE_ROUNDS[arch][batch], sgemm_gflops, peak_rates)


def _time_images(benchmark, peers, arch: str, batch: int, impl: str, rounds: int, sgemm_gflops, peak_rates):
    """One image row: ``impl`` of ``peers`` on (batch, 3, S, S) standard-normal pixels, ``rounds`` timed calls."""
    benchmark.group = f"{arch} images, batch {batch}"
    size = peers.cfg.vision.image_size
    if (arch, batch) not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[arch, batch] = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    if arch not in _FLOPS:
        _FLOPS[arch] = image_flops(peers.open_clip, size)
    pixels = _INPUTS[arch, batch]
    fn = _build_or_skip(lambda: peers.image_encoder(impl, pixels), impl)
    with torch.inference_mode():
        benchmark.pedantic(fn, args=(pixels,), rounds=rounds, warmup_rounds=1)
    _record(benchmark, peers, impl, "image", batch, _FLOPS[arch], sgemm_gflops, peak_rates, batch=batch)


# ---------------------------------------------------------------- EVA02 / PE-Core and SigLIP 2 NaFlex images
# EVA02-B-16 and PE-Core-B-16 (open_clip with timm trunks, bench/peers/ OpenClipPeerSet): every image peer but
# transformers, on standard-normal pixels. SigLIP 2 NaFlex (a transformers Siglip2Model of
# siglip2-base-patch16-naflex's sizes, loaded by fastclip from its directory, bench/peers/ NaflexPeerSet): PIL
# images of mixed aspect ratios (peers.NAFLEX_SIZES, cycled), preprocessing included in every row (peers:
# peers.NAFLEX_IMAGE_PEERS, OpenVINO ov-fp32 / ov-int8 among them); FLOPs per image at its own patch count
# (bench/flops.py naflex_image_flops).
EVA_ROUNDS = {"EVA02-B-16": {1: 10, 32: 3}, "PE-Core-B-16": {1: 10, 32: 3}}  # architecture: {batch: rounds}
NAFLEX = "SigLIP2-NaFlex-B-16"
NAFLEX_ROUNDS = {1: 10, 32: 3}
_FAMILY: dict = {}  # the latest OpenClipPeerSet / NaflexPeerSet, keyed by architecture (one alive at a time)


def _family_peers(peer_set, arch: str, build):
    """The peers of ``arch`` (built by ``build`` on first use), freeing the CLIP rows' PeerSet and any other
    family's peers first."""
    if arch not in _FAMILY:
        peer_set.arch, peer_set.peers = None, None  # conftest's latest CLIP PeerSet is no longer needed
        _FAMILY.clear()
        _FAMILY[arch] = build()
    return _FAMILY[arch]


def _model_cases(rounds: dict, impls) -> list:
    return [pytest.param(arch, batch, impl, id=f"{arch}-b{batch}-{impl}", marks=_missing(impl))
            for arch, batches in rounds.items() for batch in batches for impl in impls]


@pytest.mark.parametrize("arch, batch, impl", _model_cases(EVA_ROUNDS, OPENCLIP_IMAGE_PEERS))
def test_eva_images(benchmark, peer_set, sgemm_gflops, peak_rates, arch, batch, impl):
    peers = _family_peers(peer_set, arch, lambda: OpenClipPeerSet(arch))
    _time_images(benchmark, peers, arch, batch, impl, EVA_ROUNDS[arch][batch], sgemm_gflops, peak_rates)


@pytest.mark.parametrize("arch, batch, impl", _model_cases({NAFLEX: NAFLEX_ROUNDS}, NAFLEX_IMAGE_PEERS))
def test_naflex_images(benchmark, peer_set, sgemm_gflops, peak_rates, arch, batch, impl):
    peers = _family_peers(peer_set, arch, lambda: NaflexPeerSet(arch))
    sizes = ", ".join(f"{w}x{h}" for w, h in NAFLEX_SIZES)
    benchmark.group = f"{arch} images ({sizes}), batch {batch}"
    if (arch, batch) not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[arch, batch] = naflex_images(batch, seed=batch)
    images = _INPUTS[arch, batch]
    if (arch, batch) not in _FLOPS:
        _FLOPS[arch, batch] = naflex_image_flops(peers.hf.vision_model, peers.processor, images)
    fn = _build_or_skip(lambda: peers.image_encoder(impl, images), impl)
    with torch.inference_mode():
        benchmark.pedantic(fn, args=(images,), rounds=NAFLEX_ROUNDS[batch], warmup_rounds=1)
    _record(benchmark, peers, impl, "image", batch, _FLOPS[arch, batch], sgemm_gflops, peak_rates, batch=batch)


# ---------------------------------------------------------------- OpenAI ResNet images
# RN50 and RN50x4 (open_clip's ModifiedResNet, built by name, bench/peers/ OpenClipPeerSet): the EVA rows' peers
# on standard-normal pixels; FLOPs per image counted from the config (bench/flops.py resnet_image_flops).
RESNET_ROUNDS = {"RN50": {1: 10, 32: 3}, "RN50x4": {1: 5, 32: 2}}  # architecture: {batch: rounds}


@pytest.mark.parametrize("arch, batch, impl", _model_cases(RESNET_ROUNDS, OPENCLIP_IMAGE_PEERS))
def test_resnet_images(benchmark, peer_set, sgemm_gflops, peak_rates, arch, batch, impl):
    peers = _family_peers(peer_set, arch, lambda: OpenClipPeerSet(arch))
    if arch not in _FLOPS:
        _FLOPS[arch] = resnet_image_flops(peers.cfg)
    _time_images(benchmark, peers, arch, batch, impl, RESNET_ROUNDS[arch][batch], sgemm_gflops, peak_rates)


# ---------------------------------------------------------------- Chinese-CLIP text tower
CN_CLIP = "CN-CLIP-ViT-B-16"
CN_CAPTIONS = chinese_captions(256, seed=0)


@pytest.mark.parametrize("impl", [pytest.param(impl, marks=_missing(impl)) for impl in CN_CLIP_TEXT_PEERS])
def test_chinese_clip_captions(benchmark, peer_set, sgemm_gflops, peak_rates, impl):
    peers = _family_peers(peer_set, CN_CLIP, ChineseClipPeerSet)
    benchmark.group = f"{CN_CLIP} text, {len(CN_CAPTIONS)} Chinese captions"
    if CN_CLIP not in _FLOPS:
        _FLOPS[CN_CLIP] = bert_caption_flops(peers.hf, peers.tokenizer, CN_CAPTIONS) / len(CN_CAPTIONS)
    fn = _build_or_skip(lambda: peers.text_encoder(impl, CN_CAPTIONS), impl)
    with torch.inference_mode():
        benchmark.pedantic(fn, args=(CN_CAPTIONS,), rounds=3, warmup_rounds=1)
    _record(benchmark, peers, impl, "text", len(CN_CAPTIONS), _FLOPS[CN_CLIP], sgemm_gflops, peak_rates,
            batch=len(CN_CAPTIONS))
