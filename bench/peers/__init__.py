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

Modules: ``common`` (the cache root, tolerances, ``NEEDS`` / ``unavailable`` / ``precision``, the output checks,
``perturb_``), ``openvino`` (the OpenVINO peers of ``PeerSet`` and ``NaflexPeerSet``: IR, NNCF int8, ``_OvRunner``),
``openclip`` (``PeerSet``, ``OpenClipPeerSet``), ``naflex`` (``NaflexPeerSet``), ``chinese_clip``
(``ChineseClipPeerSet``). Every name is importable from the package (``from peers import PeerSet``). The cache root
is this package's ``CACHE``, read by every peer set when it is built (``common.cache_root``): assigning
``peers.CACHE`` moves every cache path.
"""
from .chinese_clip import (
    CN_CLIP_CONTEXT,
    CN_CLIP_TEXT_PEERS,
    ChineseClipPeerSet,
    _CnText,
    chinese_captions,
    chinese_clip_config,
)
from .common import (
    ATOL,
    BROKEN_COSINE,
    CACHE,
    MIN_COSINE,
    NEEDS,
    RTOL,
    WEIGHT_NOISE,
    Encoder,
    _features,
    _HfDirectoryPeers,
    _seconds,
    _weights_fingerprint,
    cache_root,
    check_close,
    per_item_cosine,
    perturb_,
    precision,
    unavailable,
)
from .naflex import (
    NAFLEX_IMAGE_PEERS,
    NAFLEX_INPUTS,
    NAFLEX_SIZES,
    NaflexPeerSet,
    _NaflexVision,
    naflex_config,
    naflex_images,
)
from .openclip import (
    OPENCLIP_IMAGE_PEERS,
    OpenClipPeerSet,
    PeerSet,
    _Tower,
    hf_config,
    hf_tokenizer,
    openclip_state_dict,
)
from .openvino import OV_CALIBRATION, OV_INT8_OPTIONS, OV_PRECISION, _OvPeers, _OvRunner, _save_ir

__all__ = [
    "ATOL", "BROKEN_COSINE", "CACHE", "CN_CLIP_CONTEXT", "CN_CLIP_TEXT_PEERS", "MIN_COSINE", "NAFLEX_IMAGE_PEERS",
    "NAFLEX_INPUTS", "NAFLEX_SIZES", "NEEDS", "OPENCLIP_IMAGE_PEERS", "OV_CALIBRATION", "OV_INT8_OPTIONS",
    "OV_PRECISION", "RTOL", "WEIGHT_NOISE", "ChineseClipPeerSet", "Encoder", "NaflexPeerSet", "OpenClipPeerSet",
    "PeerSet", "_CnText", "_HfDirectoryPeers", "_NaflexVision", "_OvPeers", "_OvRunner", "_Tower", "_features",
    "_save_ir", "_seconds", "_weights_fingerprint", "cache_root", "check_close", "chinese_captions",
    "chinese_clip_config", "hf_config", "hf_tokenizer", "naflex_config", "naflex_images", "openclip_state_dict",
    "per_item_cosine", "perturb_", "precision", "unavailable",
]
