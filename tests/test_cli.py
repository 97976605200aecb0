"""The fastclip command line: embed (npy, parquet), models, info."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fastclip
from fastclip import tolerance
from fastclip.backends import int8
from fastclip.cli import main
from helpers.upstream import save_tiny_openai_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small OpenAI-layout CLIP checkpoint (architecture inferred from its shapes when loaded)."""
    return save_tiny_openai_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-openai.pt")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).save(d / "a.png")
    Image.fromarray(data.coffee()).save(d / "b.jpg")
    (d / "sub").mkdir()
    Image.fromarray(data.chelsea()).save(d / "sub" / "c.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return d


def test_embed_npy_and_parquet(checkpoint, image_dir, tmp_path, capsys):
    files = sorted(str(p) for p in image_dir.rglob("*") if p.is_file())
    good = [f for f in files if "broken" not in f]
    expected = fastclip.load(checkpoint).embed_images(good)

    out = tmp_path / "emb.npy"
    assert main(["embed", str(image_dir), "--model", str(checkpoint), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "broken.png" in err and "1 skipped" in err
    np.testing.assert_allclose(np.load(out), expected, atol=tolerance.REPEAT_ATOL)
    assert out.with_suffix(".paths.txt").read_text().split() == good

    import pyarrow.parquet as pq

    pq_out = tmp_path / "emb.parquet"
    assert main(["embed", *good, "--model", str(checkpoint), "--out", str(pq_out), "-q"]) == 0
    table = pq.read_table(pq_out)
    assert table.column("path").to_pylist() == good
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist(), dtype=np.float32), expected,
                               atol=tolerance.REPEAT_ATOL)


def test_embed_raise_mode_and_bad_model(checkpoint, image_dir, tmp_path, capsys):
    out = tmp_path / "x.npy"
    assert main(["embed", str(image_dir), "--model", str(checkpoint), "--out", str(out), "--on-error", "raise"]) == 1
    assert "broken.png" in capsys.readouterr().err
    assert main(["embed", str(image_dir), "--model", "ViT-Nope-1", "--out", str(out)]) == 1
    assert "ViT-Nope-1" in capsys.readouterr().err


def test_models_and_info(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    b32 = next(line for line in lines if line.split()[0] == "ViT-B-32")
    assert "openai" in b32.split() and "laion2b_s34b_b79k" in b32.split()
    assert any(line.split()[0] == "ViT-B-16-SigLIP" for line in lines)
    assert main(["info"]) == 0
    info = capsys.readouterr().out
    assert fastclip.__version__ in info and "cpu backend (auto)" in info and "threads" in info
    paths = next(line for line in info.splitlines() if line.startswith("cpu paths"))
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    assert ("fp32 avx512" in paths) == ("avx512f" in flags and not os.environ.get("FASTCLIP_DISABLE_AVX512"))
    assert ("int8 fastclip kernel" in paths) == (int8.gemm() == "kernel")
    assert ("bf16 none" in paths) == (not flags & {"avx512_bf16", "amx_bf16"} or
                                      bool(os.environ.get("FASTCLIP_DISABLE_AVX512")))
    assert ("attention products bf16" in paths) == ("avx512_bf16" in flags and "fp32 avx512" in paths)


def test_console_script_installed():
    proc = subprocess.run([sys.executable, "-m", "fastclip.cli", "models", "--pretrained-only"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ViT-L-14-336-quickgelu" in proc.stdout
