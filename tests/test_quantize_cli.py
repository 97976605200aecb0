"""``fastclip quantize``: calibrate on a folder of images, report, save an int8 safetensors file that
``fastclip.load(..., precision="int8")`` uses without re-calibrating (fastclip/quantize.py, docs/int8.md)."""
from __future__ import annotations

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

import fastclip
from fastclip import cli, quantize, tolerance
from fastclip.models.outliers import add_outliers
from helpers.upstream import clip_tokens, make_images

MODEL = "tiny-clip"


@pytest.fixture(scope="module")
def setup(tiny_config_dir, tmp_path_factory):
    """(fp32 model with outliers, its checkpoint, a folder of 6 PNGs)."""
    folder = tmp_path_factory.mktemp("quantize")
    fp32 = add_outliers(fastclip.create_model(MODEL, seed=3), channels=2)
    ckpt = folder / "fp32.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in fp32.state_dict().items()}, str(ckpt))
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 56, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return fp32, ckpt, images


@pytest.fixture(scope="module")
def quantized(setup, tmp_path_factory):
    """(output path, stdout) of one ``fastclip quantize`` run."""
    _, ckpt, images = setup
    out = tmp_path_factory.mktemp("quantize_out") / "model-int8.safetensors"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = cli.main(["quantize", MODEL, "--pretrained", str(ckpt), "--calibrate", str(images), "--out", str(out),
                       "--batch-size", "4", "-q"])
    assert rc == 0
    return out, buffer.getvalue()


def test_report_and_file(setup, quantized):
    fp32, ckpt, _ = setup
    out, report = quantized
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in report and "runs as" in report
    assert "image embeddings, cosine int8 to fp32 over 6 items" in report
    assert "text embeddings, cosine int8 to fp32 over 16 items" in report
    with safetensors.safe_open(str(out), framework="pt") as f:
        assert f.metadata()["format"] == quantize.FORMAT and f.metadata()["model"] == MODEL
        assert f.get_tensor("visual.transformer.resblocks.0.mlp.c_fc.weight").dtype == torch.int8
    raw = out.read_bytes()  # safetensors: an 8-byte little-endian header length, then a JSON header
    assert raw[8:9] == b"{" and int.from_bytes(raw[:8], "little") < len(raw)
    assert out.stat().st_size < ckpt.stat().st_size


def test_loaded_equals_calibrated(setup, quantized):
    """The file's model against the in-memory calibrated one (same images) and against fp32."""
    fp32, _, images = setup
    out, _ = quantized
    loaded = fastclip.load(MODEL, pretrained=out, precision="int8")
    paths = sorted(str(p) for p in images.glob("*.png"))
    pixels = torch.stack([loaded.preprocess(p) for p in paths])
    texts = loaded.tokenizer(list(cli.CAPTIONS))
    memory = add_outliers(fastclip.create_model(MODEL, seed=3), channels=2)
    memory, _ = quantize.quantize_calibrated(memory, lambda: [("image", pixels[:4]), ("image", pixels[4:]),
                                                              ("text", texts[:4]), ("text", texts[4:8]),
                                                              ("text", texts[8:12]), ("text", texts[12:])])
    test_images, test_tokens = make_images(8, 48, seed=9), clip_tokens(8, seed=9)
    with torch.inference_mode():
        for encode in ("encode_image", "encode_text"):
            x = test_images if encode == "encode_image" else test_tokens
            got, mem, ref = (getattr(m, encode)(x, normalize=True) for m in (loaded, memory, fp32))
            assert F.cosine_similarity(got, mem, dim=-1).min().item() > tolerance.INT8_SAME_GEMM_COSINE
            assert F.cosine_similarity(got, ref, dim=-1).min().item() >= tolerance.MIN_COSINE
    alone = fastclip.load(out, precision="int8")  # the file names its architecture
    with torch.inference_mode():
        torch.testing.assert_close(alone.encode_image(test_images), loaded.encode_image(test_images),
                                   rtol=0, atol=tolerance.REPEAT_ATOL)


def test_fp32_load_is_dequantised_and_other_precisions_refused(setup, quantized):
    fp32, _, _ = setup
    out, _ = quantized
    dequantised = fastclip.load(MODEL, pretrained=out, precision="fp32")
    assert dequantised.int8_weights is None
    x = make_images(4, 48, seed=5)
    with torch.inference_mode():
        cos = F.cosine_similarity(dequantised.encode_image(x), fp32.encode_image(x), dim=-1)
    assert cos.min().item() >= tolerance.MIN_COSINE
    with pytest.raises(ValueError, match="int8 checkpoint"):
        fastclip.load(MODEL, pretrained=out, precision="fp16")


def test_clear_errors(setup, tmp_path):
    _, ckpt, _ = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["quantize", MODEL, "--pretrained", str(ckpt), "--out", str(tmp_path / "o.safetensors"), "-q"]
    with pytest.raises(SystemExit, match="no images"):
        cli.main(args + ["--calibrate", str(empty)])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="cannot read image .*broken.png"):
        cli.main(args + ["--calibrate", str(bad)])
    with pytest.raises(SystemExit, match="must end in .safetensors"):
        cli.main(["quantize", MODEL, "--pretrained", str(ckpt), "--calibrate", str(bad), "--out", "x.pt"])
    assert not (tmp_path / "o.safetensors").exists()
