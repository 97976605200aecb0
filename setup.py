"""Build script: installs `fastclip`, the top-level `kernels/` folder as `fastclip.kernels`, and the C++
CPU kernels of `csrc/` as the extension `fastclip._C`.

How `fastclip._C` is built, and why (install with the plain `pip install -e .`):

* pybind11 on raw buffers, no torch at build time. The kernels receive data pointers, sizes and
  element strides (fastclip/backends/cpu/ checks dtype, device and layout and passes them). So an isolated
  PEP 517 build needs only setuptools + pybind11 (pyproject.toml), never downloads torch a second time,
  and the extension does not depend on torch's C++ ABI: upgrading torch needs no rebuild.
* One thread pool, torch's. No OpenMP runtime is linked (no -fopenmp). At the first parallel call the
  kernels find the OpenMP runtime already loaded in the process -- torch's bundled libgomp -- and call
  its GOMP_parallel entry point (csrc/common.h, csrc/module.cpp). Linking libgomp ourselves would be
  fragile: with torch wheels that bundle it under a hashed name (older ones: libgomp-<hash>.so.1) the
  system's libgomp would load beside it, a second pool of spinning threads fighting torch's.
  torch.set_num_threads() sizes the kernels' thread teams as it does torch's own.
* AVX2 + FMA code only inside `#pragma GCC target("avx2,fma")` regions; the module glue is baseline
  x86-64, so importing on an older CPU cannot crash and fastclip.backends.cpu.ops declines to load there.
* The sources compile in parallel (pybind11's ParallelCompile, one job per core): about 25 s of
  compiling on 2 cores, about 1 min for a whole `pip install -e .` (isolated build environment included).
* The extension is optional: without a C++17 compiler (or if compiling fails) the install goes on with a
  warning and CPUs use the reference ops; FASTCLIP_REQUIRE_EXT=1 makes that an error (CI), and
  FASTCLIP_NO_EXT=1 skips the extension. It is built on Linux x86-64 only.
"""
import glob
import os
import platform
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns and carries on when fastclip._C cannot be compiled (see the module docstring)."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 -- compiler missing, headers missing, ...
            self._skip(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._skip(exc)

    @staticmethod
    def _skip(exc: Exception) -> None:
        if os.environ.get("FASTCLIP_REQUIRE_EXT", "") not in ("", "0"):
            raise exc
        sys.stderr.write(
            f"\nWARNING: fastclip: building the C++ CPU kernels (fastclip._C) failed: {exc}\n"
            "fastclip is installed without them: the 'cpu' backend is unavailable and CPUs use the reference ops.\n"
            "Install a C++17 compiler (e.g. `apt-get install g++`) and reinstall; FASTCLIP_REQUIRE_EXT=1 makes "
            "this an error.\n\n")

ext_modules = []
csrc_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
want_ext = (os.environ.get("FASTCLIP_NO_EXT", "") in ("", "0") and platform.machine().lower() in ("x86_64", "amd64")
            and platform.system() == "Linux")
if csrc_sources and want_ext:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension

    ParallelCompile("FASTCLIP_BUILD_JOBS", default=os.cpu_count() or 1).install()
    ext_modules.append(
        Pybind11Extension(
            "fastclip._C",
            csrc_sources,
            depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),
            extra_compile_args=["-O3", "-fno-math-errno"],
            libraries=["dl"],
            cxx_std=17,
        )
    )

setup(
    # every package under fastclip/ (found, not listed: a new folder cannot be left out of the wheel), plus
    # the top-level kernels/ folder as fastclip.kernels
    packages=find_packages(include=["fastclip", "fastclip.*"]) + ["fastclip.kernels"],
    package_dir={"fastclip.kernels": "kernels"},
    package_data={"fastclip": ["py.typed", "_C.pyi"], "fastclip.models": ["configs/*.json"],
                  "fastclip.data": ["*.txt.gz"], "fastclip.loading": ["pretrained.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
)
