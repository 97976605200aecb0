"""Bounded decode memory (fastclip/data/budget.py and its use in the image pipeline).

* ``PixelBudget``: holds within the budget run together, a hold that does not fit blocks until it does, an
  item larger than the whole budget waits until nothing is held and runs alone, waiters are served in order,
  an exception releases, and under many threads the pixels held never exceed the budget (no deadlock);
* ``Preprocess.batch`` / ``NaflexPreprocess.sequences`` / ``embed_images`` over large flat-colour PNGs
  (4000 x 4000) and small photos: the peak held in the preprocess's one budget stays within it -- across
  concurrent calls and ``embed_images``' prefetch too -- and the outputs equal those without a budget (and
  open_clip's transform on a large image) exactly;
* ``max_image_pixels``: refused from the header (a PNG header with no pixel data is refused, not found
  truncated) with an ``ImageLoadError`` naming the size;
* the strip-wise conversions (16-bit, float, RGB -> (3, H, W)) equal the whole-image formulas; errors kept by
  ``on_error="skip"`` carry no traceback (which would keep a failed image's pixels alive);
* peak RSS of a child process preprocessing three 60 M-pixel flat PNGs with 2 threads: within a figure
  derived from the budget, and well below the same run with an unbounded budget.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import fastclip
from fastclip.data.budget import DEFAULT_INFLIGHT_PIXELS, PixelBudget
from fastclip.data.images import DEFAULT_MAX_PIXELS, _u16_to_u8, load_image, rgb_to_chw
from fastclip.data.naflex import NaflexConfig, NaflexPreprocess
from fastclip.data.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess, PreprocessConfig
from fastclip.errors import ImageLoadError

ROOT = Path(__file__).resolve().parents[1]
BIG = 4000 * 4000  # pixels of each large test image
TIMEOUT = 20  # seconds any thread of these tests may take


# -- PixelBudget ------------------------------------------------------------------------------------------
class Runner(threading.Thread):
    """A thread running ``fn``; ``join_ok`` re-raises its exception and fails if it did not finish."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.error = fn, None
        self.start()

    def run(self):
        try:
            self.fn()
        except BaseException as e:  # noqa: BLE001 (re-raised in the test thread)
            self.error = e

    def join_ok(self):
        self.join(TIMEOUT)
        assert not self.is_alive(), "thread did not finish (deadlock?)"
        if self.error is not None:
            raise self.error


def wait_until(cond, what: str):
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def holder(budget: PixelBudget, n: int, gate: threading.Event, log: list, name: str) -> Runner:
    """A thread that holds ``n`` pixels until ``gate`` is set, logging (name, pixels held on entry)."""
    def run():
        with budget.hold(n):
            log.append((name, budget.held))
            assert gate.wait(TIMEOUT)
    return Runner(run)


def test_holds_that_fit_run_together():
    budget, both_in = PixelBudget(10), threading.Barrier(2, timeout=TIMEOUT)

    def work():
        with budget.hold(4):
            both_in.wait()  # fails (BrokenBarrierError) unless both hold at once
    threads = [Runner(work), Runner(work)]
    for t in threads:
        t.join_ok()
    assert budget.peak == 8 and budget.held == 0


def test_hold_blocks_until_pixels_fit():
    budget, log = PixelBudget(10), []
    gate_a, gate_b = threading.Event(), threading.Event()
    a = holder(budget, 6, gate_a, log, "a")
    wait_until(lambda: budget.held == 6, "a to hold")
    b = holder(budget, 6, gate_b, log, "b")
    wait_until(lambda: budget.waiting == 1, "b to wait")
    time.sleep(0.05)
    assert [name for name, _ in log] == ["a"] and budget.held == 6  # 6 + 6 > 10: b still waits
    gate_a.set()
    wait_until(lambda: len(log) == 2, "b to hold")
    assert log[1] == ("b", 6)
    gate_b.set()
    a.join_ok(), b.join_ok()
    assert budget.peak == 6 and budget.held == 0 and budget.waiting == 0


def test_oversized_item_waits_for_empty_then_runs_alone_in_order():
    budget, log = PixelBudget(10), []
    gates = {k: threading.Event() for k in "abc"}
    a = holder(budget, 3, gates["a"], log, "a")
    wait_until(lambda: budget.held == 3, "a to hold")
    b = holder(budget, 50, gates["b"], log, "b")  # larger than the whole budget
    wait_until(lambda: budget.waiting == 1, "b to wait")
    c = holder(budget, 1, gates["c"], log, "c")  # would fit next to a, but b came first
    wait_until(lambda: budget.waiting == 2, "c to wait")
    time.sleep(0.05)
    assert [name for name, _ in log] == ["a"]
    gates["a"].set()
    wait_until(lambda: len(log) == 2, "b to hold")
    time.sleep(0.05)
    assert log[1] == ("b", 50) and budget.waiting == 1  # b alone; c waits while b holds
    gates["b"].set()
    wait_until(lambda: len(log) == 3, "c to hold")
    gates["c"].set()
    for t in (a, b, c):
        t.join_ok()
    assert [name for name, _ in log] == ["a", "b", "c"] and log[2] == ("c", 1)
    assert budget.peak == 50 and budget.held == 0


def test_exception_releases_and_bad_values():
    budget = PixelBudget(10)
    with pytest.raises(RuntimeError, match="boom"):
        with budget.hold(7):
            raise RuntimeError("boom")
    assert budget.held == 0
    with budget.hold(10):  # the whole budget is free again
        assert budget.held == 10
    with pytest.raises(ValueError, match="n_pixels"):
        budget.acquire(-1)
    with pytest.raises(ValueError, match="max_pixels"):
        PixelBudget(0)
    with budget.hold(3):
        for twin in (copy.deepcopy(budget), pickle.loads(pickle.dumps(budget))):  # a fresh budget, same size
            assert twin.max_pixels == 10 and twin.held == 0
    assert DEFAULT_INFLIGHT_PIXELS == 64 * 2**20 and PixelBudget().max_pixels == DEFAULT_INFLIGHT_PIXELS


def test_many_threads_never_exceed_the_budget():
    """8 threads x 150 holds of random sizes (some larger than the budget, some raising): the pixels held
    inside ``hold`` -- counted by the test itself -- never exceed the budget unless one item runs alone."""
    limit = 100
    budget, lock = PixelBudget(limit), threading.Lock()
    inside = {"pixels": 0, "holders": 0, "max": 0, "violations": 0}

    def work(seed):
        rng = random.Random(seed)
        for k in range(150):
            n = rng.choice([0, 1, 5, 20, 40, 70, 100, 130])
            try:
                with budget.hold(n):
                    with lock:
                        inside["pixels"] += n
                        inside["holders"] += 1
                        inside["max"] = max(inside["max"], inside["pixels"])
                        if inside["pixels"] > limit and inside["holders"] > 1:
                            inside["violations"] += 1
                    if k % 7 == 0:
                        time.sleep(0.0005)
                    with lock:
                        inside["pixels"] -= n
                        inside["holders"] -= 1
                    if k % 11 == 0:
                        raise KeyError(k)
            except KeyError:
                pass
    threads = [Runner(lambda s=s: work(s)) for s in range(8)]
    for t in threads:
        t.join_ok()
    assert inside["violations"] == 0
    assert inside["max"] <= budget.peak <= 130  # never more than the budget or one oversized item alone
    assert budget.held == 0 and budget.waiting == 0


# -- the image pipeline -----------------------------------------------------------------------------------
def flat_png(path: Path, size: tuple[int, int], colour) -> str:
    Image.new("RGB", size, colour).save(path, compress_level=1)
    return str(path)


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> list:
    """Three 4000 x 4000 flat-colour PNGs (a few hundred kB each, 16 M pixels decoded) among small photos."""
    from skimage import data

    d = tmp_path_factory.mktemp("budget_img")
    big = [flat_png(d / f"big{i}.png", (4000, 4000), c) for i, c in enumerate([(200, 30, 90), (10, 250, 120),
                                                                              (90, 90, 255)])]
    small = [data.astronaut()[::4, ::4], data.coffee()[::3, ::5], data.chelsea()]  # (H, W, 3) uint8
    return [big[0], small[0], big[1], small[1], Image.fromarray(small[2]), big[2]]


CFG = PreprocessConfig(48, OPENAI_MEAN, OPENAI_STD)  # tiny-clip's input size


def test_preprocess_batch_within_budget_and_unchanged(items):
    bounded = Preprocess(CFG, threads=3, max_inflight_pixels=20_000_000)  # one large image + small ones
    free = Preprocess(CFG, threads=3, max_inflight_pixels=None)
    got, kept, errors = bounded.batch(items)
    want, _, _ = free.batch(items)
    assert kept == list(range(len(items))) and errors == []
    assert BIG <= bounded.budget.peak <= 20_000_000 and bounded.budget.held == 0
    assert torch.equal(got, want)
    raw, _, _ = bounded.batch(items, raw=True)
    assert torch.equal(raw, free.batch(items, raw=True)[0])
    # independent reference: open_clip's eval transform on the large image
    ref = open_clip.image_transform(48, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    with Image.open(items[0]) as im:
        assert torch.equal(got[0], ref(im.convert("RGB")))


def test_oversized_images_run_alone_across_concurrent_calls(items):
    """A budget smaller than one large image: each runs alone -- also with two batch calls at once on the
    same Preprocess (one budget per Preprocess, not per call) -- so the peak is exactly one image."""
    pre = Preprocess(CFG, threads=2, max_inflight_pixels=10_000_000)
    results = [None, None]

    def call(k):
        results[k] = pre.batch(items)[0]
    threads = [Runner(lambda k=k: call(k)) for k in range(2)]
    for t in threads:
        t.join_ok()
    assert pre.budget.peak == BIG and pre.budget.held == 0
    assert torch.equal(results[0], results[1])
    assert torch.equal(pre(items[1]), results[0][1])  # __call__ goes through the same budget
    assert pre.budget.peak == BIG


def test_naflex_sequences_within_budget_and_unchanged(items):
    cfg = NaflexConfig(patch_size=8, max_num_patches=48)
    bounded = NaflexPreprocess(cfg, threads=2, max_inflight_pixels=10_000_000)
    got, kept, _ = bounded.sequences(items, raw=True)
    want, _, _ = NaflexPreprocess(cfg, threads=2, max_inflight_pixels=None).sequences(items, raw=True)
    assert bounded.budget.peak == BIG and kept == list(range(len(items)))
    for (g, ghw), (w, whw) in zip(got, want, strict=True):
        assert ghw == whw and torch.equal(g, w)
    with pytest.raises(ImageLoadError, match="4000x4000 = 16000000 > max_pixels=1000000"):
        bounded.sequences(items, max_image_pixels=1_000_000)


@pytest.fixture(scope="module")
def model(tiny_config_dir):
    return fastclip.create_model("tiny-clip", seed=0)


def test_embed_images_within_budget_and_unchanged(model, items):
    """Batches of 2 with prefetch: two batches decode at once, all in the preprocess's one budget."""
    cfg = model.preprocess.cfg
    model.preprocess = Preprocess(cfg, threads=2, max_inflight_pixels=None)
    want = model.embed_images(items, batch_size=2)
    model.preprocess = Preprocess(cfg, threads=2, max_inflight_pixels=20_000_000)
    got = model.embed_images(items, batch_size=2)
    assert BIG <= model.preprocess.budget.peak <= 20_000_000
    np.testing.assert_array_equal(got, want)
    model.preprocess = Preprocess(cfg, threads=2, max_inflight_pixels=1_000_000)  # each large one alone
    np.testing.assert_array_equal(model.embed_images(items, batch_size=2), want)
    assert model.preprocess.budget.peak == BIG


def png_header(w: int, h: int) -> bytes:
    """A PNG with a valid header declaring w x h pixels and no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_max_image_pixels_refuses_from_the_header(model, items):
    model.preprocess = Preprocess(model.preprocess.cfg, threads=2)
    assert model.preprocess.max_image_pixels == DEFAULT_MAX_PIXELS
    with pytest.raises(ImageLoadError) as info:
        model.embed_images(items, batch_size=2, max_image_pixels=1_000_000)
    assert info.value.index == 0 and "4000x4000 = 16000000 > max_pixels=1000000" in str(info.value)
    res = model.embed_images(items, batch_size=2, on_error="skip", max_image_pixels=1_000_000)
    assert list(res.indices) == [1, 3, 4] and [e.index for e in res.errors] == [0, 2, 5]
    assert all("too many pixels" in e.reason for e in res.errors)
    np.testing.assert_array_equal(res.embeddings, model.embed_images([items[i] for i in (1, 3, 4)]))
    # the Preprocess's own setting is the default of embed_images and batch
    strict = Preprocess(model.preprocess.cfg, max_image_pixels=10**6)
    with pytest.raises(ImageLoadError, match="max_pixels=1000000"):
        strict.batch([items[2]])
    assert strict.batch([items[1]])[1] == [0]
    # refused before decoding: a header without pixel data is "too many pixels", not "truncated"
    header = png_header(3000, 3000)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(header)
    with pytest.raises(ImageLoadError, match=r"3000x3000 = 9000000 > max_pixels=1000000"):
        strict(header)
    assert strict.budget.peak == 128 * 128 and strict.budget.held == 0  # only the small photo was ever held
    with pytest.raises(ImageLoadError, match="too many pixels"):
        Preprocess(CFG).batch([np.zeros((2000, 1000, 3), np.uint8)], max_image_pixels=10**6)


# -- strip-wise conversions equal the whole-image formulas --------------------------------------------------
def test_strip_conversions_equal_whole_image_formulas():
    rng = np.random.default_rng(0)
    h, w = 1500, 1001  # > 1 Mi pixels: several strips, the last one short
    v16 = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    want = ((v16.astype(np.int64) + 128) // 257).astype(np.uint8)
    np.testing.assert_array_equal(_u16_to_u8(v16), want)
    np.testing.assert_array_equal(_u16_to_u8(v16.astype(">u2")), want)
    i32 = rng.integers(-70000, 140000, (h, w), dtype=np.int32)
    np.testing.assert_array_equal(_u16_to_u8(i32), ((np.clip(i32, 0, 65535).astype(np.int64) + 128) // 257))
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(v16)))[..., 1], want)  # I;16 image
    f = rng.uniform(-20, 280, (h, w)).astype(np.float32)
    f[rng.random((h, w)) < 0.01] = np.nan
    want_f = np.clip(np.rint(np.nan_to_num(f, nan=0.0)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(f)))[..., 2], want_f)  # F image
    unit = rng.random((h, w, 3))
    np.testing.assert_array_equal(np.asarray(load_image(unit)), np.rint(unit * 255).astype(np.uint8))
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), rgba[..., :3])
    grey = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(grey)), np.repeat(grey, 3, axis=2))
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    np.testing.assert_array_equal(rgb_to_chw(img), np.asarray(img).transpose(2, 0, 1))


# -- peak RSS of a child process ------------------------------------------------------------------------------
CHILD = r"""
import json, sys
from fastclip.data.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess, PreprocessConfig

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

budget, warm, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
pre = Preprocess(PreprocessConfig(48, OPENAI_MEAN, OPENAI_STD), threads=2, max_inflight_pixels=budget)
pre.batch([warm])  # first use (lazy imports, thread pool) before measuring
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
base = status("VmRSS")
pixels, kept, _ = pre.batch(paths)
print(json.dumps({"base": base, "peak": status("VmHWM"), "budget_peak": pre.budget.peak, "kept": kept}))
"""
HUGE_W, HUGE_H = 7800, 7700  # 60.06 M pixels: 240 MB decoded (Pillow keeps RGB as 4 bytes a pixel)


def child_peak(warm: str, paths: list[str], budget: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PILLOW_BLOCK_SIZE", None)  # fastclip.data.images picks the block size (see there)
    out = subprocess.run([sys.executable, "-c", CHILD, str(budget), warm, *paths], capture_output=True, text=True,
                         env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_rss_bounded_by_the_budget(tmp_path):
    paths = [flat_png(tmp_path / f"big{i}.png", (HUGE_W, HUGE_H), (40 * i, 200, 100)) for i in range(3)]
    warm = flat_png(tmp_path / "warm.png", (64, 64), (1, 2, 3))
    one = HUGE_W * HUGE_H
    bounded = child_peak(warm, paths, DEFAULT_INFLIGHT_PIXELS)  # 64 Mi pixels: one 60 M image at a time
    unbounded = child_peak(warm, paths, 10**12)
    assert bounded["kept"] == unbounded["kept"] == [0, 1, 2]
    assert bounded["budget_peak"] == one and unbounded["budget_peak"] == 2 * one  # 2 threads: 2 at once
    grew = {k: (r["peak"] - r["base"]) / 2**20 for k, r in (("bounded", bounded), ("unbounded", unbounded))}
    print(f"\npeak RSS above baseline, 3 x {one / 1e6:.1f} M-pixel PNGs, 2 threads: "
          f"budget {DEFAULT_INFLIGHT_PIXELS} px {grew['bounded']:.0f} MiB, unbounded {grew['unbounded']:.0f} MiB")
    decoded = 4 * one / 2**20  # MiB of one decoded image
    limit = 4 * DEFAULT_INFLIGHT_PIXELS / 2**20 * 1.25 + 32  # budget's pixels at 4 bytes, + 25 % and 32 MiB
    assert grew["bounded"] <= limit, grew
    assert grew["unbounded"] >= 1.6 * decoded > limit, grew  # two decodes at once really do take more


def test_skipped_errors_keep_no_decoded_pixels_alive(items):
    """A truncated large PNG fails after its pixels were allocated; the error returned by ``on_error="skip"``
    carries no traceback (whose frames would hold that image) and the budget is free again."""
    with open(items[0], "rb") as f:
        data = f.read()
    pre = Preprocess(CFG, threads=2, max_inflight_pixels=10_000_000)
    pixels, kept, errors = pre.batch([data[: len(data) // 2], items[1]], on_error="skip")
    assert kept == [1] and [e.index for e in errors] == [0] and "truncated" in errors[0].reason
    assert errors[0].__traceback__ is None and errors[0].__context__ is None
    assert pre.budget.peak == BIG and pre.budget.held == 0


def test_hf_resize_of_a_large_image_equals_transformers():
    """The "hf" numerics resize a large image (several strips of rows) from its RGBX copy (x86) or (3, H, W)
    copy: equal to transformers' SiglipImageProcessor (bicubic and bilinear) and Siglip2 NaFlex processor."""
    import transformers

    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (150, 100, 3), dtype=np.uint8)
    img = Image.fromarray(np.kron(base, np.ones((10, 10, 1), np.uint8)) ^ rng.integers(0, 8, (1500, 1000, 3),
                                                                                       dtype=np.uint8))
    for resample in (3, 2):
        proc = transformers.SiglipImageProcessor(resample=resample)
        want = proc(img, return_tensors="pt")["pixel_values"][0]
        got = Preprocess(PreprocessConfig.from_hf(proc.to_dict()))(img)
        assert torch.equal(got, want), resample
    proc = transformers.Siglip2ImageProcessor(patch_size=16, max_num_patches=256)
    want = proc(images=[img], return_tensors="pt")
    patches, hw = NaflexPreprocess(NaflexConfig.from_hf(proc.to_dict()))(img)
    assert tuple(hw) == tuple(want["spatial_shapes"][0].tolist())
    assert torch.equal(patches, want["pixel_values"][0, : hw[0] * hw[1]])
