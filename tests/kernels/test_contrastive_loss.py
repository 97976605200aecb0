"""Triton contrastive-loss kernels (kernels/contrastive_loss*.py) on DEVICE: compiled on CUDA tensors where
there is a GPU, else under the Triton interpreter on CPU tensors.

Through ``ClipLoss`` / ``SigLipLoss`` with ``backend="triton"``: the loss and every gradient (image, text,
logit_scale, logit_bias) against a dense float64 reference written from the definitions and against
OpenCLIP's dense ``ClipLoss`` / ``SigLipLoss``. Errors are relative: max-abs error / max-abs of the
float64 value. Bars (fastclip/tolerance.py):
  fp32       <= LOSS_FP32_FACTOR (2) x OpenCLIP's own fp32 error + LOSS_FP32_FLOOR;
  fp16/bf16  <= 2 x the error of OpenCLIP's dense loss run in that dtype + LOW_PRECISION_ATOL, the
             flash-attention rule; float64 sees the same rounded inputs.
The block functions are also checked directly on rectangular (rows x columns) block pairs with a shifted
or absent diagonal, the layout the multi-process ring feeds them, under the fp32 rule (they compute in
fp32 for every input dtype), and through the ring itself (2 gloo processes, always under the interpreter)
against the torch backend in the same processes. Sizes stay small: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import contrastive_loss_ring  # tests/kernels: the ring test's worker, a light module to spawn
from fastclip import tolerance
from fastclip.errors import BackendUnavailableError
from fastclip.kernels import contrastive_loss as fwd
from fastclip.kernels import contrastive_loss_bwd as bwd
from fastclip.loss import ClipLoss, LossInputError, SigLipLoss, clip_loss
from fastclip.losses import blocks as loss_blocks
from helpers.device import DEVICE, INTERPRET
from helpers.loss_reference import rel_err, run

NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = list(NAMES)


def features(n, d, seed, dtype=torch.float32, spread=1.0):
    """Unnormalised features (norms ~sqrt(d)), paired rows more alike, rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g) * spread
    txt = torch.randn(n, d, generator=g) + 0.5 * img
    return img.to(dtype).double(), txt.to(dtype).double()


# (N, D, logit_scale): N = 1 (a single pair), 7, 70, 130 (not multiples of the 32/64 tiles); D = 16, 64, 80
# (80 = a full and a masked BLOCK_K chunk); scales chosen so unnormalised logits span ~1-50.
SHAPES = [(1, 16, 1.0), (7, 64, 0.3), (70, 80, 0.2), (130, 16, 1.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("n,d,scale", SHAPES)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_matches_open_clip_and_float64(kind, n, d, scale, dtype, record_error):
    img, txt = features(n, d, seed=n * d, dtype=dtype)
    bias = -2.0
    scale = float(torch.tensor(scale).to(dtype))  # every implementation sees the same rounded values
    ours = run(kind, "triton", img, txt, scale, bias, dtype, device=DEVICE)
    ref = run(kind, "float64", img, txt, scale, bias, torch.float64)
    low = run(kind, "open_clip", img, txt, scale, bias, dtype)  # OpenCLIP's dense loss in this dtype
    oc32 = run(kind, "open_clip", img, txt, scale, bias, torch.float32)
    for key in ref:
        err = rel_err(ours[key], ref[key])
        if kind == "clip" and n == 1:  # one pair: the loss is the constant 0
            assert ours[key].abs().max() < tolerance.ZERO_LOSS_ATOL, (key, ours[key])
            continue
        if dtype == torch.float32:
            oc_err = rel_err(oc32[key], ref[key])
            record_error(f"{kind} {key}", "fp32", err, oc_err)
            limit = tolerance.loss_fp32_bound(oc_err)
            assert err <= limit, f"{kind} {key}: rel err {err:.2e} > {limit:.2e} (open_clip {oc_err:.2e})"
        else:
            ref_err = rel_err(low[key], ref[key])
            record_error(f"{kind} {key}", NAMES[dtype], err, ref_err)
            bound = tolerance.low_precision_bound(ref_err, dtype)
            assert err <= bound, (f"{kind} {key} {NAMES[dtype]}: rel err {err:.2e} > 2 x {ref_err:.2e} "
                                  f"(dense in {NAMES[dtype]}) + atol = {bound:.2e}")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_wide_rows_and_large_logits(kind, record_error):
    """D = 1024 (16 BLOCK_K chunks) fp16, and fp32 rows whose logits reach the thousands (exp overflows
    without the running max; confident pairs need the expm1 / -sigmoid(-z) diagonal)."""
    img, txt = features(9, 1024, seed=1, dtype=torch.float16)  # paired logits ~5, others ~0.4
    ours = run(kind, "triton", img, txt, 0.01, -3.0, torch.float16, device=DEVICE)
    ref = run(kind, "float64", img, txt, 0.01, -3.0, torch.float64)
    low = run(kind, "open_clip", img, txt, 0.01, -3.0, torch.float16)
    for key in ref:
        err, ref_err = rel_err(ours[key], ref[key]), rel_err(low[key], ref[key])
        record_error(f"{kind} {key}", "fp16", err, ref_err)
        assert err <= tolerance.low_precision_bound(ref_err, torch.float16), (key, err, ref_err)
    img, txt = features(40, 32, seed=2)
    img[:10] *= 20.0
    ours = run(kind, "triton", img, txt, 3.0, -5.0, torch.float32, device=DEVICE)
    ref = run(kind, "float64", img, txt, 3.0, -5.0, torch.float64)
    for key in ref:
        assert rel_err(ours[key], ref[key]) < tolerance.EXTREME_LOGITS_REL, key


# ---------------------------------------------------------------- block functions on ring-shaped block pairs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=NAMES.get)
@pytest.mark.parametrize("m,n,offset", [(70, 40, 5), (40, 70, -3), (33, 33, None)])
def test_block_pairs_with_shifted_diagonal(m, n, offset, dtype, record_error):
    """Rectangular (M, N) blocks, D = 20 (masked K chunk), the diagonal at (r, r + offset) or absent. Each
    result against its definition evaluated on the same inputs: the fp32 rule (float64 and fp32) for what
    the kernels compute in fp32; the low-precision rule (fp32 and fp16) for the fp16 features' gradients,
    whose G tile is rounded to the features' dtype before its product (as flash attention rounds P)."""
    g = torch.Generator().manual_seed(m + n)
    img, txt = (torch.randn(k, 20, generator=g).to(DEVICE, dtype) for k in (m, n))
    scale, bias = torch.tensor(0.7, device=DEVICE), torch.tensor(-1.5, device=DEVICE)
    rows = torch.arange(m, device=DEVICE)
    hit = ((rows + offset >= 0) & (rows + offset < n) if offset is not None
           else torch.zeros(m, dtype=torch.bool, device=DEVICE))
    cols = rows[hit] + (offset or 0)
    eye = torch.zeros(m, n, dtype=torch.bool, device=DEVICE)
    eye[rows[hit], cols] = True
    logits64 = 0.7 * img.double() @ txt.double().T
    lse = logits64.logsumexp(1), logits64.logsumexp(0)  # the backward's inputs, as the forward leaves them

    def definitions(dt):
        """Every value the block functions produce, written from the definitions, computed in ``dt``."""
        i, t, lr, lc = img.to(dt), txt.to(dt), lse[0].to(dt), lse[1].to(dt)
        logits = 0.7 * i @ t.T
        z = logits - 1.5
        clip_grad = (logits - lr[:, None]).exp() + (logits - lc[None, :]).exp() - 2 * eye.to(dt)
        sig_grad = torch.sigmoid(z) - eye.to(dt)
        return dict(
            lse_row=torch.logaddexp(torch.full((m,), 0.5, dtype=dt, device=DEVICE), logits.logsumexp(1)),
            lse_col=torch.logaddexp(torch.full((n,), -0.5, dtype=dt, device=DEVICE), logits.logsumexp(0)),
            diag=logits[rows[hit], cols], softplus=F.softplus(torch.where(eye, -z, z)).sum(),
            clip_d_img=1 + 0.5 * clip_grad @ t, clip_d_txt=1 + 2.0 * clip_grad.T @ i,
            siglip_sum=sig_grad.sum(), siglip_d_img=sig_grad @ t, siglip_d_txt=0.25 * sig_grad.T @ i)

    want64, want32, want_low = definitions(torch.float64), definitions(torch.float32), definitions(dtype)

    def check(key, got):
        got = torch.as_tensor(got, dtype=torch.float64, device=DEVICE)
        what = f"{key}: {m} x {n} block, offset {offset}, {NAMES[dtype]} features"
        if dtype != torch.float32 and "_d_" in key:  # a gradient, through the rounded G tile
            errs = tolerance.check_low_precision(got, want32[key], want_low[key], dtype, what)
        else:
            errs = tolerance.check_fp32(got, want64[key], want32[key], what)
        record_error("loss block grads" if "_d_" in key else "loss block values", NAMES[dtype], *errs)

    # forward: folded into existing float64 accumulators (as across ring steps)
    lse_row = torch.full((m,), 0.5, dtype=torch.float64, device=DEVICE)
    lse_col = torch.full((n,), -0.5, dtype=torch.float64, device=DEVICE)
    diag = torch.full((m,), 123.0, dtype=torch.float64, device=DEVICE)
    fwd.clip_lse_(img, txt, scale, lse_row, lse_col, diag=diag, diag_offset=offset or 0)
    check("lse_row", lse_row)
    check("lse_col", lse_col)
    if offset is not None:
        check("diag", diag[hit])
        assert (diag[~hit] == 123.0).all()  # rows without a diagonal column are left alone
    check("softplus", fwd.siglip_softplus_sum(img, txt, scale, bias, offset))

    # backward: accumulated into existing gradients, alpha per side
    d_img, d_txt = torch.ones(m, 20, device=DEVICE), torch.ones(n, 20, device=DEVICE)
    bwd.clip_grad_(img, txt, scale, *lse, d_img, d_txt, alpha_img=0.5, alpha_txt=2.0, diag_offset=offset)
    check("clip_d_img", d_img)
    check("clip_d_txt", d_txt)
    d_img, d_txt = torch.zeros(m, 20, device=DEVICE), torch.zeros(n, 20, device=DEVICE)
    g_sum = bwd.siglip_grad_blocks_(img, txt, scale, bias, d_img, d_txt, alpha_txt=0.25, diag_offset=offset)
    check("siglip_sum", g_sum)
    check("siglip_d_img", d_img)
    check("siglip_d_txt", d_txt)


def test_column_buffer_is_bounded_by_row_chunks(monkeypatch):
    """Several forward launches over row chunks give the single-launch result."""
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(150, 16, generator=g).to(DEVICE), torch.randn(90, 16, generator=g).to(DEVICE)
    scale = torch.tensor(1.3, device=DEVICE)
    one = [torch.full((k,), float("-inf"), dtype=torch.float64, device=DEVICE) for k in (150, 90, 150)]
    fwd.clip_lse_(img, txt, scale, one[0], one[1], diag=one[2], diag_offset=-20)
    monkeypatch.setattr(fwd, "_MAX_PARTIAL", 90 * 2)  # one 32-row block per launch
    many = [torch.full((k,), float("-inf"), dtype=torch.float64, device=DEVICE) for k in (150, 90, 150)]
    many[2].zero_()
    fwd.clip_lse_(img, txt, scale, many[0], many[1], diag=many[2], diag_offset=-20)
    torch.testing.assert_close(many[0], one[0], rtol=0, atol=0)
    torch.testing.assert_close(many[1], one[1], rtol=tolerance.CHUNKED_LSE_RTOL, atol=0)  # folded in float64
    torch.testing.assert_close(many[2][20:110], one[2][20:110], rtol=0, atol=0)


# ---------------------------------------------------------------- backend choice and errors
def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert loss_blocks.tiles_for("auto", cpu) is loss_blocks.TorchTiles  # never Triton on a CPU
    assert loss_blocks.tiles_for("triton", DEVICE) is loss_blocks.TritonTiles  # CUDA, or TRITON_INTERPRET=1
    img, txt = features(20, 16, seed=4)
    img, txt = img.float().to(DEVICE), txt.float().to(DEVICE)
    a = clip_loss(img, txt, 2.0, backend="torch")
    b = clip_loss(img, txt, 2.0, backend="triton")
    assert rel_err(b.double(), a.double()) <= tolerance.LOSS_BACKEND_REL[torch.float32], (a, b)
    with pytest.raises(LossInputError, match="unknown backend"):
        ClipLoss(backend="cuda")
    with pytest.raises(LossInputError, match="unknown backend"):
        clip_loss(img, txt, 2.0, backend="cpp")
    monkeypatch.delenv("TRITON_INTERPRET", raising=not INTERPRET)
    with pytest.raises(BackendUnavailableError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        SigLipLoss(backend="triton")(img.cpu(), txt.cpu(), 2.0, 0.0)
    assert loss_blocks.tiles_for("auto", cpu) is loss_blocks.TorchTiles


def test_kernel_input_errors():
    a16, b32 = torch.randn(8, 16, dtype=torch.float16, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    s = torch.tensor(1.0, device=DEVICE)
    lse = [torch.zeros(8, dtype=torch.float64, device=DEVICE) for _ in range(2)]
    with pytest.raises(TypeError, match="share one of"):
        fwd.clip_lse_(a16, b32, s, *lse)
    with pytest.raises(ValueError, match="one D"):
        fwd.clip_lse_(b32, torch.randn(8, 32, device=DEVICE), s, *lse)
    with pytest.raises(ValueError, match="contiguous"):
        fwd.clip_lse_(b32, torch.randn(16, 8, device=DEVICE).T, s, *lse)
    with pytest.raises(TypeError, match="one fp32 value"):
        fwd.siglip_softplus_sum(b32, b32, s.double(), s)
    with pytest.raises(ValueError, match="contiguous fp32"):
        bwd.clip_grad_(b32, b32, s, *lse, torch.zeros(8, 16, dtype=torch.float16, device=DEVICE),
                       torch.zeros(8, 16, device=DEVICE))


# ---------------------------------------------------------------- the ring across processes
def test_ring_across_processes_matches_torch_backend(tmp_path, monkeypatch):
    """Text blocks (in the features' dtype) and gradient accumulators travel the ring between the Triton
    tile calls; each rank's loss and gradients equal the torch backend's in the same processes. The ranks
    use gloo, whose point-to-point ops take CPU tensors only, so the spawned processes run the kernels under
    the interpreter on any machine."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by each spawned process when it imports triton
    world = contrastive_loss_ring.WORLD
    mp.spawn(contrastive_loss_ring.worker, args=(str(tmp_path / "init"), str(tmp_path / "result")), nprocs=world,
             join=True)
    for rank in range(world):
        res = torch.load(tmp_path / f"result.{rank}")
        assert len(res) == 8
        for kind in ("clip", "siglip"):
            for dtype, limit in (("fp32", tolerance.LOSS_BACKEND_REL[torch.float32]),
                                 ("fp16", tolerance.LOSS_BACKEND_REL[torch.float16])):
                ref_outputs = res[kind, dtype, "torch"]
                assert len(ref_outputs) == (5 if kind == "siglip" else 4)
                for i, (ours, ref) in enumerate(zip(res[kind, dtype, "triton"], ref_outputs, strict=True)):
                    err = rel_err(ours.double(), ref.double())
                    assert err < limit, f"rank {rank} {kind} {dtype} output {i}: rel err {err:.2e}"
