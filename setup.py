"""Build script: installs `fastclip` and the top-level `kernels/` folder as `fastclip.kernels`.

C++ CPU kernels in `csrc/` (one file per op) are compiled into `fastclip._C` with pybind11. They take
raw buffers, so no torch is needed at build time and an isolated build never downloads torch.
"""
import glob
import os

from setuptools import setup

ext_modules = []
csrc_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if csrc_sources:
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules.append(
        Pybind11Extension(
            "fastclip._C",
            csrc_sources,
            extra_compile_args=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            cxx_std=17,
        )
    )

setup(
    packages=["fastclip", "fastclip.kernels"],
    package_dir={"fastclip": "fastclip", "fastclip.kernels": "kernels"},
    package_data={"fastclip": ["model_configs/*.json", "*.txt.gz", "pretrained.json"]},
    ext_modules=ext_modules,
)
