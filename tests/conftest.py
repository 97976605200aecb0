"""Session fixtures of the model / loading suites (the builders they use live in tests/helpers/), and the
table of max-abs errors against upstream printed at the end of the run."""
from __future__ import annotations

import os

# The Triton tests (tests/kernels) run the compiled kernels on CUDA tensors where there is a CUDA device,
# else on CPU tensors under Triton's interpreter (helpers/device.py decides, from torch alone). Triton
# reads TRITON_INTERPRET when `@triton.jit` decorates a function, and `import open_clip` (tests/helpers)
# imports triton, so it is set here, before anything imports triton.
from helpers.device import INTERPRET  # (tests/helpers; pytest puts tests/ on sys.path for this conftest)

if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402
import transformers  # noqa: E402

from fastclip.models import tiny  # noqa: E402
from fastclip.tolerance import UPSTREAM_ATOL  # noqa: E402
from helpers.upstream import (  # noqa: E402  (tests/helpers; pytest puts tests/ on sys.path for this conftest)
    _TABLE,
    OPENCLIP_TINY,
    TINY_CONFIGS,
    Upstream,
    hf_clip_config,
    hf_siglip_config,
    hf_upstream,
    openclip_upstream,
    register_configs,
    save_hf_dir,
)


def pytest_terminal_summary(terminalreporter):
    if not _TABLE:
        return
    tr = terminalreporter
    tr.section("fastclip vs upstream: max-abs error (fp32, random weights)")
    tr.write_line(f"{'suite':6} {'case':54} {'B':>2} {'image':>9} {'image/L2':>9} {'text':>9} {'text/L2':>9}")
    for suite, case, b, i, inorm, t, tnorm in _TABLE:
        tr.write_line(f"{suite:6} {case:54} {b:>2} {i:9.2e} {inorm:9.2e} {t:9.2e} {tnorm:9.2e}")
    worst = max(max(row[3:]) for row in _TABLE)
    tr.write_line(f"worst: {worst:.2e} (tolerance {UPSTREAM_ATOL:.0e}, fastclip.tolerance.UPSTREAM_ATOL)")



@pytest.fixture(scope="session")
def tiny_config_dir(tmp_path_factory) -> Path:
    """The tiny configs as JSON files, registered with fastclip (all) and open_clip (those it builds)."""
    folder = register_configs(tmp_path_factory, "tiny_configs", TINY_CONFIGS)
    open_clip.add_model_config(tiny.write_configs(tmp_path_factory.mktemp("tiny_openclip"), OPENCLIP_TINY))
    return folder


@pytest.fixture(scope="session")
def oc_b32_quickgelu() -> Upstream:
    return openclip_upstream("ViT-B-32-quickgelu", seed=1)


@pytest.fixture(scope="session")
def oc_b32(oc_b32_quickgelu) -> Upstream:
    """GELU ViT-B-32 (OpenCLIP-trained shape) with the same weights as oc_b32_quickgelu."""
    return openclip_upstream("ViT-B-32", seed=0, like=oc_b32_quickgelu.model)


@pytest.fixture(scope="session")
def oc_tiny(tiny_config_dir) -> dict[str, Upstream]:
    return {name: openclip_upstream(name, seed=10 + i) for i, name in enumerate(OPENCLIP_TINY)}


@pytest.fixture(scope="session")
def hf_clip() -> Upstream:
    return hf_upstream(lambda: transformers.CLIPModel(hf_clip_config()), "transformers CLIPModel (small)")


@pytest.fixture(scope="session")
def hf_siglip() -> Upstream:
    return hf_upstream(lambda: transformers.SiglipModel(hf_siglip_config()), "transformers SiglipModel (small)")


@pytest.fixture(scope="session")
def hf_clip_dir(hf_clip, tmp_path_factory) -> Path:
    return save_hf_dir(hf_clip, tmp_path_factory.mktemp("hf_clip"))


@pytest.fixture(scope="session")
def hf_siglip_dir(hf_siglip, tmp_path_factory) -> Path:
    return save_hf_dir(hf_siglip, tmp_path_factory.mktemp("hf_siglip"))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """HF_HUB_OFFLINE=1 and HF_HOME / HF_HUB_CACHE in a tmp dir; returns the (empty) hub cache.

    huggingface_hub reads these variables once, at import, so its constants are patched too."""
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def _int8_gemm_params() -> list:
    """Both int8 GEMMs (fastclip/backends/int8.py); one that cannot run here is skipped with the reason."""
    from fastclip.backends import int8

    params = []
    for name in int8.GEMMS:
        try:
            int8.choose_gemm(name)
            params.append(pytest.param(name, id=f"gemm-{name}"))
        except ValueError as exc:
            params.append(pytest.param(name, id=f"gemm-{name}", marks=pytest.mark.skip(reason=str(exc))))
    return params


@pytest.fixture(scope="module", params=_int8_gemm_params())
def int8_gemm(request) -> str:
    """Each int8 GEMM in turn (FASTCLIP_INT8_GEMM set for the module's tests that use it): int8 models made
    meanwhile pack their weights for it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTCLIP_INT8_GEMM", request.param)
        yield request.param
