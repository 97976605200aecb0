"""``attention(..., key_mask=)`` (B, Lk) bool, True = a real key, on every backend available here: ``ref``,
``cpu`` (a prefix mask -- each row's real keys first -- runs in the C++ kernel as per-row key counts, any other
mask in the reference) and ``triton`` (the flash kernel's
key-padding mask; compiled on a GPU, else the Triton interpreter on CPU tensors, tests/helpers/device.py).

Reference: torch's SDPA with a boolean attention mask, run in float64 and in fp32 on the same inputs, under
the fp32 rule of fastclip/tolerance.py (``check_fp32``). Padded keys hold large values, so a mask that leaks
moves the result far beyond the tolerance.
"""
import pytest
import torch
import torch.nn.functional as F

from fastclip import ref, tolerance
from fastclip.backends.dispatch import get_ops
from helpers.device import DEVICE

BACKENDS = ["ref", "cpu", "triton"]


def _device(backend: str) -> torch.device:
    return DEVICE if backend == "triton" else torch.device("cpu")


def make_case(B, H, Lq, Lk, Dh, lengths, seed=0, device="cpu"):
    """q/k/v with keys at positions >= lengths[b] of row b set to large garbage, and the key mask."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, Dh, generator=gen) for n in (Lq, Lk, Lk))
    key_mask = torch.arange(Lk)[None, :] < torch.tensor(lengths)[:, None]  # (B, Lk)
    pad = ~key_mask[:, None, :, None]  # (B, 1, Lk, 1)
    k = torch.where(pad, 30.0 * torch.randn(k.shape, generator=gen), k)
    v = torch.where(pad, 1e4, v)
    return q.to(device), k.to(device), v.to(device), key_mask.to(device)


def sdpa_masked(q, k, v, key_mask, causal=False):
    """The dense masked softmax: SDPA with attn_mask (B, 1, 1, Lk) True = attend."""
    allowed = key_mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, H, Lq, Lk, Dh, lengths", [
    (3, 2, 37, 37, 32, [37, 20, 1]),  # self-attention over padded patch tokens
    (3, 2, 1, 50, 72, [50, 13, 2]),  # the attention-pooling probe over padded tokens
    (2, 1, 64, 64, 16, [64, 64]),  # a mask of all True
    (2, 2, 300, 300, 64, [300, 131]),  # several query and key blocks, a length inside the second key block
    (4, 1, 1, 257, 64, [257, 129, 128, 1]),  # lengths on and around the C++ kernel's key-block edge
])
def test_masked_attention_matches_dense_softmax(backend, B, H, Lq, Lk, Dh, lengths, record_error):
    device = _device(backend)
    q, k, v, key_mask = make_case(B, H, Lq, Lk, Dh, lengths, seed=Lq + Lk, device=device)
    out = get_ops(backend).attention(q, k, v, causal=False, key_mask=key_mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    want64 = sdpa_masked(q.double(), k.double(), v.double(), key_mask)
    want32 = sdpa_masked(q, k, v, key_mask)
    err, ref_err = tolerance.check_fp32(out, want64, want32, f"{backend} attention key_mask {(B, H, Lq, Lk, Dh)}")
    record_error(f"attention key_mask ({backend})", "fp32", err, ref_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_attention_equals_attention_over_the_real_keys(backend):
    """Row b with a mask equals plain attention over its first lengths[b] keys alone."""
    device = _device(backend)
    lengths = [29, 8, 17]
    q, k, v, key_mask = make_case(3, 2, 29, 29, 32, lengths, seed=3, device=device)
    out = get_ops(backend).attention(q, k, v, key_mask=key_mask)
    for b, n in enumerate(lengths):
        alone = ref.attention(q[b:b + 1].double(), k[b:b + 1, :, :n].double(), v[b:b + 1, :, :n].double())
        assert tolerance.max_abs(out[b:b + 1], alone) <= tolerance.UPSTREAM_ATOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_with_key_mask(backend, record_error):
    device = _device(backend)
    q, k, v, key_mask = make_case(2, 2, 20, 20, 16, [20, 9], seed=5, device=device)
    key_mask[1, 0] = True
    out = get_ops(backend).attention(q, k, v, causal=True, key_mask=key_mask)
    want64 = sdpa_masked(q.double(), k.double(), v.double(), key_mask, causal=True)
    err, ref_err = tolerance.check_fp32(out, want64, sdpa_masked(q, k, v, key_mask, causal=True),
                                        f"{backend} causal attention key_mask")
    record_error(f"attention causal+key_mask ({backend})", "fp32", err, ref_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_without_keys_is_zero(backend):
    device = _device(backend)
    q, k, v, key_mask = make_case(2, 2, 5, 12, 16, [12, 12], seed=7, device=device)
    key_mask[1] = False
    out = get_ops(backend).attention(q, k, v, key_mask=key_mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad, message", [
    (lambda m: m.int(), "bool"),
    (lambda m: m[:, :-1], "shape"),
])
def test_bad_key_masks_are_refused(backend, bad, message):
    device = _device(backend)
    q, k, v, key_mask = make_case(2, 1, 4, 6, 16, [6, 3], device=device)
    with pytest.raises(ValueError, match=message):
        get_ops(backend).attention(q, k, v, key_mask=bad(key_mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mask_that_is_not_a_prefix(backend, record_error):
    device = _device(backend)
    q, k, v, key_mask = make_case(2, 2, 16, 40, 32, [40, 40], seed=11, device=device)
    gen = torch.Generator().manual_seed(11)
    key_mask = (torch.rand(2, 40, generator=gen) < 0.6).to(device)
    key_mask[:, 5] = True  # every row sees a key
    k = k.masked_fill(~key_mask[:, None, :, None], 1e3)  # garbage keys where masked (every head)
    out = get_ops(backend).attention(q, k, v, key_mask=key_mask)
    want64 = sdpa_masked(q.double(), k.double(), v.double(), key_mask)
    err, ref_err = tolerance.check_fp32(out, want64, sdpa_masked(q, k, v, key_mask), f"{backend} scattered key_mask")
    record_error(f"attention scattered key_mask ({backend})", "fp32", err, ref_err)


def test_cpu_runs_prefix_masks_in_the_kernel(monkeypatch):
    from fastclip.backends.cpu import attention as cpu_attention

    calls, reference = [], ref.attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("key_mask"))
        return reference(*args, **kwargs)

    monkeypatch.setattr(cpu_attention.ref, "attention", counted)
    q, k, v, key_mask = make_case(2, 2, 20, 20, 16, [20, 7], seed=13)
    cpu_attention.attention(q, k, v, key_mask=key_mask)
    cpu_attention.attention(q, k, v, causal=True, key_mask=key_mask)
    assert calls == []  # both in the C++ kernel
    scattered = key_mask.clone()
    scattered[1, 3] = False
    cpu_attention.attention(q, k, v, key_mask=scattered)
    assert len(calls) == 1 and torch.equal(calls[0], scattered)  # not a prefix: the reference
