"""bench/peers/'s OpenVINO peers on a tiny CLIP: ONNX export -> OpenVINO IR (fp32 weights kept) -> NNCF int8,
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

import peers  # noqa: E402  (bench/peers/)
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


# ---------------------------------------------------------------- EVA02 / PE-Core / SigLIP 2 NaFlex peers
# Tiny versions of the configs bench/bench_e2e.py times at full size: open_clip's EVA02-B-16 and PE-Core-B-16
# configs with timm's trunk shrunk through timm.create_model keywords (fastclip reads the same keywords from
# vision_cfg.timm_model_kwargs), and a tiny transformers Siglip2Model (8-pixel patches, 48-patch budget).
# Each peer is built once (its own check against the upstream eager output runs inside) and its embeddings
# are compared with fastclip's fp32 ones: fp32 peers to UPSTREAM_ATOL, int8 / bf16 peers by per-item cosine.
# torch.compile is left to bench/bench_e2e.py's own check (its compile alone takes longer than this file may):
# on open_clip it is the CLIP rows' peer; on transformers' NaFlex vision model it is called as transformers' is.
import json  # noqa: E402

import open_clip  # noqa: E402
import timm  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

import fastclip  # noqa: E402
import flops  # noqa: E402  (bench/flops.py)
from fastclip.tolerance import MIN_COSINE, UPSTREAM_ATOL  # noqa: E402
from helpers.upstream import _TABLE, register_configs  # noqa: E402

EVA_TINY = {  # tiny name: (open_clip config, timm.create_model keywords)
    "bench-tiny-EVA02-B": ("EVA02-B-16", dict(img_size=64, embed_dim=128, num_heads=2, depth=2)),
    "bench-tiny-PE-Core-B": ("PE-Core-B-16", dict(img_size=64, embed_dim=128, num_heads=2, depth=2)),
}
EVA_SMOKE_PEERS = [impl for impl in peers.OPENCLIP_IMAGE_PEERS if impl != "torch.compile"]
NAFLEX_SMOKE_PEERS = [impl for impl in peers.NAFLEX_IMAGE_PEERS if impl != "torch.compile"]
NAFLEX_TINY = dict(patch=8, grid=8, budget=48, scale=4)  # images: peers.NAFLEX_SIZES divided by scale


def _eva_tiny_config(real: str, kwargs: dict) -> dict:
    raw = json.loads((Path(open_clip.__file__).parent / "model_configs" / f"{real}.json").read_text())
    text = dict(context_length=raw["text_cfg"]["context_length"], vocab_size=49408, width=64, heads=2, layers=2)
    return dict(raw, embed_dim=48, text_cfg=text,
                vision_cfg=dict(raw["vision_cfg"], image_size=kwargs["img_size"], timm_model_kwargs=kwargs))


def _eva_tiny_openclip(raw: dict, seed: int):
    """open_clip's CustomTextCLIP of ``raw``, its timm trunk built with ``timm_model_kwargs``, perturbed."""
    kwargs = raw["vision_cfg"]["timm_model_kwargs"]
    create = timm.create_model
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timm, "create_model", lambda name, **kw: create(name, **kw, **kwargs))
        vision_cfg = {k: v for k, v in raw["vision_cfg"].items() if k != "timm_model_kwargs"}
        torch.manual_seed(seed)
        model = open_clip.model.CustomTextCLIP(raw["embed_dim"], vision_cfg, raw["text_cfg"])
    return peers.perturb_(model, seed)


@pytest.fixture(scope="module")
def family_peers(tmp_path_factory):
    """{name: OpenClipPeerSet of the tiny EVA02 / PE-Core, NaflexPeerSet of the tiny NaFlex}, built on first use,
    their exports in a temporary folder."""
    raws = {name: _eva_tiny_config(*spec) for name, spec in EVA_TINY.items()}
    register_configs(tmp_path_factory, "bench_eva_tiny", raws)
    cache, peers.CACHE = peers.CACHE, tmp_path_factory.mktemp("bench_family_cache")
    built = {}

    def get(name: str):
        if name not in built:
            if name in raws:
                built[name] = peers.OpenClipPeerSet(name, model=_eva_tiny_openclip(raws[name], seed=len(name)))
            else:
                t = NAFLEX_TINY
                config = transformers.Siglip2Config(
                    text_config=dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=2,
                                     vocab_size=300, max_position_embeddings=16, projection_size=96, pad_token_id=1,
                                     eos_token_id=1, bos_token_id=None),
                    vision_config=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=2, patch_size=t["patch"], num_patches=t["grid"] ** 2))
                built[name] = peers.NaflexPeerSet(name, config=config, max_num_patches=t["budget"],
                                                  calibration_scale=t["scale"])
        return built[name]

    try:
        yield get
    finally:
        peers.CACHE = cache


def _assert_close_to_fastclip(label: str, impl: str, got, ours, against: str = "fastclip") -> None:
    """fp32: max-abs <= UPSTREAM_ATOL (raw and L2-normalised, into the error table); else per-item cosine."""
    got, ours = torch.as_tensor(got).float(), torch.as_tensor(ours).float()
    if peers.precision(impl) == "fp32":
        err = (got - ours).abs().max().item()
        err_l2 = (F.normalize(got, dim=-1) - F.normalize(ours, dim=-1)).abs().max().item()
        _TABLE.append(("bench", f"{label} {impl} vs {against}", got.shape[0], err, err_l2, 0.0, 0.0))
        assert max(err, err_l2) <= UPSTREAM_ATOL, f"{label} {impl}: max-abs {err:.2e} to {against}"
    else:
        cosine = peers.per_item_cosine(got, ours).min().item()
        assert cosine >= MIN_COSINE, f"{label} {impl}: per-item cosine {cosine:.5f} to fastclip fp32"


@pytest.mark.parametrize("name", list(EVA_TINY))
@pytest.mark.parametrize("impl", EVA_SMOKE_PEERS)
def test_eva_peers_agree_with_fastclip(family_peers, name, impl):
    ps = family_peers(name)
    size = ps.cfg.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(3))
    try:
        fn = ps.image_encoder(impl, pixels)  # raises if it disagrees with open_clip eager
    except ValueError as exc:
        if impl == "fastclip-bf16":  # CPUs without AVX512-BF16 / AMX
            pytest.skip(f"fastclip bf16 not available here: {exc}")
        raise
    with torch.inference_mode():
        if impl == "fastclip":  # fastclip itself: against open_clip eager
            _assert_close_to_fastclip(name, impl, fn(pixels), ps.reference("image", pixels), "open_clip")
        else:
            _assert_close_to_fastclip(name, impl, fn(pixels), ps.fastclip().encode_image(pixels))


@pytest.mark.parametrize("impl", NAFLEX_SMOKE_PEERS)
def test_naflex_peers_agree_with_fastclip(family_peers, impl):
    ps = family_peers("bench-tiny-naflex")
    images = peers.naflex_images(3, seed=3, scale=NAFLEX_TINY["scale"])
    try:
        fn = ps.image_encoder(impl, images)  # raises if it disagrees with transformers eager
    except ValueError as exc:
        if impl == "fastclip-bf16":
            pytest.skip(f"fastclip bf16 not available here: {exc}")
        raise
    shapes = ps.inputs(images)["spatial_shapes"].tolist()
    assert len({tuple(s) for s in shapes}) == 3, shapes  # three aspect ratios, three patch grids
    with torch.inference_mode():
        got = fn(images)
    got = F.normalize(torch.as_tensor(got).float(), dim=-1)
    if impl == "fastclip":  # fastclip itself: against transformers eager
        _assert_close_to_fastclip("tiny NaFlex", impl, got, F.normalize(ps.reference(images), dim=-1), "transformers")
    else:
        _assert_close_to_fastclip("tiny NaFlex", impl, got, ps.fastclip().embed_images(images))
    if impl == "ort-int8":
        assert ps.info["ort-int8 image"]["quantization"] in ("per-tensor", "per-channel")
    if impl.startswith("ov-"):  # OpenVINO's IR of the same export, compiled in f32 (int8: NNCF's ops)
        assert ps.info[f"{impl} image"]["inference_precision"] == "f32"
    if impl == "ov-int8":
        assert ps.info["ov-int8 image"]["min_cosine_to_fp32"] >= MIN_COSINE


def test_family_flops_equal_the_counted_ones(family_peers):
    """bench/flops.py's formulas (SwiGLU fc1 of 2 M rows, the attention-pooling heads, NaFlex's own patch count)
    equal FlopCounterMode on the upstream towers."""
    for name in EVA_TINY:
        ps = family_peers(name)
        counted = flops.image_flops(ps.open_clip, ps.cfg.vision.image_size)
        assert flops.eva_image_flops(ps.cfg) == counted, name
    ps = family_peers("bench-tiny-naflex")
    images = peers.naflex_images(3, seed=3, scale=NAFLEX_TINY["scale"])
    cfg = ps.fastclip().cfg
    patches = [int(n) for n in ps.inputs(images)["pixel_attention_mask"].sum(-1)]
    want = sum(flops.naflex_flops(cfg, n) for n in patches) / len(patches)
    assert flops.naflex_image_flops(ps.hf.vision_model, ps.processor, images) == want


def test_full_size_family_configs():
    """The full-size rows' shapes: EVA02-B's SwiGLU hidden 2048, PE-Core-B's attention pooling, and the NaFlex
    config of siglip2-base-patch16-naflex (built on the meta device: no weights)."""
    eva, pe = fastclip.get_model_config("EVA02-B-16"), fastclip.get_model_config("PE-Core-B-16")
    assert (eva.vision.swiglu, eva.vision.mlp_width, pe.vision.pool) == (True, 2048, "map")
    config = peers.naflex_config()
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.num_patches) == (768, 12, 12, 16, 256)
    assert (t.hidden_size, t.num_hidden_layers) == (768, 12)


def test_report_prints_the_family_rows(tmp_path):
    """bench/report.py on rows shaped as bench_e2e.py's EVA02 / PE-Core / NaFlex rows write them: each group's
    table (latency at batch 1, fraction of peak) and its line of the best-peers table."""
    import report  # bench/report.py

    naflex = f"SigLIP2-NaFlex-B-16 images ({', '.join(f'{w}x{h}' for w, h in peers.NAFLEX_SIZES)}), batch 1"
    rows = [("EVA02-B-16 images, batch 32", "fastclip", 8.0, 32, 0.41), ("EVA02-B-16 images, batch 32", "ov-fp32", 5.0, 32, 0.26),
            ("PE-Core-B-16 images, batch 1", "fastclip", 10.0, 1, 0.30), ("PE-Core-B-16 images, batch 1", "open_clip", 4.0, 1, 0.12),
            (naflex, "fastclip", 5.0, 1, 0.22), (naflex, "transformers", 2.5, 1, 0.11)]
    benches = [{"group": g, "name": i, "stats": {"mean": b / r},
                "extra_info": {"impl": i, "items_per_s": r, "latency_ms": 1e3 * b / r, "fraction_of_peak": f,
                               "precision": "fp32"}} for g, i, r, b, f in rows]
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps({"benchmarks": benches}))
    text = report.report(str(path))
    assert "| fastclip | 8.0 | — | — | 0.41 | 1.00x |" in text and "| ov-fp32 | 5.0 | — | — | 0.26 | 1.60x |" in text
    assert "| open_clip | 250.0 | — | — | 0.12 | 2.50x |" in text  # batch 1: latency (ms)
    assert f"### {naflex}" in text and "| transformers | 400.0 | — | — | 0.11 | 2.00x |" in text
    assert f"| {naflex} | transformers (400.0 ms) | 2.00x |" in text
    assert "| EVA02-B-16 images, batch 32 | ov-fp32 (5.0 img/s) | 1.60x |" in text
