"""What an install gets: a wheel of the checkout holds every module and data file (kernels/ as fastclip.kernels)
and the console script, and ``python -m fastclip`` is the ``fastclip`` command."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["fastclip/**/*.py", "kernels/**/*.py"]
# every data file the code reads, and typing markers wherever they are
DATA = ["fastclip/models/configs/*.json", "fastclip/loading/pretrained.json", "fastclip/data/*.txt.gz",
        "fastclip/**/*.pyi", "fastclip/**/py.typed", "kernels/**/*.pyi", "kernels/**/py.typed"]


def expected_files(root: Path) -> set[str]:
    """The checkout's modules and data files, named as they are inside the wheel."""
    found = set()
    for pattern in MODULES + DATA:
        for path in root.glob(pattern):
            rel = path.relative_to(root).as_posix()
            found.add("fastclip/" + rel if rel.startswith("kernels/") else rel)
    return found


def build_wheel(root: Path, tmp: Path) -> Path:
    """A pure-Python wheel (no C++ extension) of the checkout at ``root``, built from a clean copy of it:
    setuptools builds inside the source tree, and files a stale build/ folder still holds would go into
    the wheel whatever the package list says."""
    src = tmp / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".*cache", ".hypothesis", ".benchmarks"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-deps", "--no-build-isolation",
         "-w", str(tmp), str(src)],
        env={**os.environ, "FASTCLIP_NO_EXT": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp.glob("fastclip-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    with zipfile.ZipFile(build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))) as zf:
        yield zf


def test_wheel_holds_every_module_and_data_file(wheel):
    expected = expected_files(ROOT)
    assert {"fastclip/server/app.py", "fastclip/kernels/ops.py", "fastclip/loading/pretrained.json"} <= expected
    missing = sorted(expected - set(wheel.namelist()))
    assert not missing, f"{len(missing)} files of the checkout are not in the wheel:\n" + "\n".join(missing)


def test_wheel_installs_nothing_else(wheel):
    outside = sorted(n for n in wheel.namelist() if n.split("/")[0] != "fastclip" and ".dist-info/" not in n)
    assert not outside, f"the wheel installs files outside fastclip/: {outside}"


def test_wheel_has_the_console_script(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "fastclip = fastclip.cli:main" in wheel.read(entry_points).decode()


CONSOLE_SCRIPT = Path(sys.executable).with_name("fastclip")


def run_fastclip(cwd: Path, *args: str, via_module: bool = True) -> subprocess.CompletedProcess:
    """``python -m fastclip ARGS`` (or the console script) run in ``cwd``, with help text 80 columns wide."""
    cmd = [sys.executable, "-m", "fastclip"] if via_module else [str(CONSOLE_SCRIPT)]
    return subprocess.run([*cmd, *args], cwd=cwd, env={**os.environ, "COLUMNS": "80"},
                          capture_output=True, text=True, timeout=120)


def test_python_m_fastclip_help(tmp_path):
    proc = run_fastclip(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fastclip ")
    for command in ("models", "embed", "verify", "info", "serve"):
        assert f"    {command} " in proc.stdout
    if CONSOLE_SCRIPT.is_file():  # installed (not only on sys.path): the same text as the `fastclip` command
        assert proc.stdout == run_fastclip(tmp_path, "--help", via_module=False).stdout


def test_python_m_fastclip_info(tmp_path):
    import fastclip

    proc = run_fastclip(tmp_path, "info")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split() == ["fastclip", fastclip.__version__]
    assert "C++ extension" in proc.stdout and "cpu backend (auto)" in proc.stdout


def test_python_m_fastclip_exits_with_the_command_status(tmp_path):
    proc = run_fastclip(tmp_path, "embed", str(tmp_path), "--model", "ViT-B-32", "--out", str(tmp_path / "e.npy"))
    assert proc.returncode == 2 and proc.stderr.startswith("fastclip embed: error: ") and str(tmp_path) in proc.stderr
