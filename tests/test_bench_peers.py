"""bench/peers.py's OpenVINO peers on a tiny CLIP: ONNX export -> OpenVINO IR (fp32 weights kept) -> NNCF int8,
compiled for the CPU with the precision each peer is named for, and checked against open_clip eager (fp32:
``assert_close``; bf16 / int8: per-item cosine >= ``MIN_COSINE``). Needs the ``bench`` extra (openvino, nncf)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import peers  # noqa: E402  (bench/peers.py)
from captions import realistic_captions  # noqa: E402  (bench/captions.py)

pytestmark = pytest.mark.skipif(peers.unavailable("ov-int8") is not None,
                                reason=str(peers.unavailable("ov-int8")))
OV_PEERS = ("ov-fp32", "ov-bf16", "ov-int8")


@pytest.fixture(scope="module")
def tiny_peers(tiny_config_dir, tmp_path_factory):
    """A PeerSet of tiny-clip (QuickGELU, CLIP-shaped), its ONNX / IR cache in a temporary folder."""
    cache, peers.CACHE = peers.CACHE, tmp_path_factory.mktemp("bench_cache")
    try:
        yield peers.PeerSet("tiny-clip", model_name="tiny-clip")
    finally:
        peers.CACHE = cache


@pytest.fixture(scope="module")
def pixels(tiny_peers):
    size = tiny_peers.cfg.vision.image_size
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))


CAPTIONS = realistic_captions(8, seed=0)


@pytest.mark.parametrize("impl", OV_PEERS)
def test_ov_peers_agree_with_open_clip(tiny_peers, pixels, impl):
    """Each encoder is checked inside image_encoder / text_encoder (raising on disagreement); here also
    the compiled precision, the recorded cosines, and the outputs once more."""
    expected_precision = {"ov-fp32": "f32", "ov-bf16": "bf16", "ov-int8": "f32"}[impl]
    for tower, inputs, build in (("image", pixels, tiny_peers.image_encoder), ("text", CAPTIONS, tiny_peers.text_encoder)):
        fn = build(impl, inputs)
        info = tiny_peers.info[f"{impl} {tower}"]
        assert info["inference_precision"] == expected_precision
        assert info["performance_hint"] in ("LATENCY", "THROUGHPUT")
        with torch.inference_mode():
            got, want = fn(inputs), tiny_peers.reference(tower, inputs)
        if impl == "ov-fp32":
            peers.check_close(f"tiny-clip {tower} {impl}", got, want)
        else:
            assert info["min_cosine_to_fp32"] >= peers.MIN_COSINE
            assert peers.per_item_cosine(got, want).min().item() >= peers.MIN_COSINE
        if impl == "ov-int8":
            assert "TRANSFORMER" in info["quantization"]


def test_ov_cache_and_throughput_split(tiny_peers, pixels):
    """The IR sits next to the ONNX export; the THROUGHPUT runner (the batch split over several requests)
    returns the rows in order, equal to open_clip eager."""
    for tower in ("image", "text"):
        folder = tiny_peers.onnx_path(tower).parent
        assert tiny_peers.ov_ir_path(tower) == folder / "openvino.xml"
        assert (folder / "openvino.bin").is_file()
        assert tiny_peers.ov_int8_path(tower).parent == folder
    compiled = tiny_peers.ov_compiled("ov-fp32", "image", "THROUGHPUT")
    run = peers._OvRunner(compiled)
    with torch.inference_mode():
        peers.check_close("tiny-clip image ov-fp32 THROUGHPUT", run(pixels), tiny_peers.reference("image", pixels))


def test_unavailable_names_missing_packages(monkeypatch):
    monkeypatch.setitem(peers.NEEDS, "ov-fp32", ("openvino", "no_such_package_for_fastclip"))
    assert "no_such_package_for_fastclip" in peers.unavailable("ov-fp32")
    assert peers.unavailable("open_clip") is None
    assert [peers.precision(i) for i in ("ov-fp32", "ov-bf16", "ov-int8", "fastclip")] == ["fp32", "bf16", "int8", "fp32"]


@pytest.mark.parametrize("impl", ("open_clip-bf16", "fastclip-bf16"))
def test_bf16_peers_agree_with_open_clip(tiny_peers, pixels, impl):
    """The bf16 rows beside ov-bf16: open_clip eager in bfloat16 and fastclip's precision="bf16" (which
    raises ValueError on CPUs without AVX512-BF16 / AMX: skipped there, as bench/bench_e2e.py skips its row)."""
    for tower, inputs, build in (("image", pixels, tiny_peers.image_encoder), ("text", CAPTIONS, tiny_peers.text_encoder)):
        try:
            build(impl, inputs)  # raises if a per-item cosine is below MIN_COSINE
        except ValueError as exc:
            if impl == "fastclip-bf16":
                pytest.skip(f"fastclip bf16 not available here: {exc}")
            raise
        assert tiny_peers.info[f"{impl} {tower}"]["min_cosine_to_fp32"] >= peers.MIN_COSINE
