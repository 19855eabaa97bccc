"""Upsampling: PIL-exact (bit for bit), and the fast path's error bound and exact recomputation."""

import numpy as np
import pytest
import torch
from PIL import Image

from conceptrank.core.upsample import (
    upsample_approx_rows_cols,
    upsample_at,
    upsample_bilinear,
    upsample_error_bound,
)

SIZES = [(7, 7, 112, 112), (7, 7, 113, 113), (8, 8, 32, 32), (4, 6, 13, 17), (9, 5, 4, 3), (7, 7, 7, 112)]


@pytest.mark.parametrize("h,w,sh,sw", SIZES)
def test_upsample_equals_pil_bit_for_bit(h, w, sh, sw):
    x = np.random.default_rng(h * w + sh).standard_normal((12, h, w)).astype(np.float32)
    ref = np.stack([np.array(Image.fromarray(m).resize((sw, sh), resample=Image.BILINEAR)) for m in x])
    got = upsample_bilinear(torch.from_numpy(x), (sh, sw)).numpy()
    up = sh >= h and sw >= w  # PIL reduces differently when downsampling; masks are never smaller than maps
    if up:
        np.testing.assert_array_equal(got, ref)
    ex = upsample_bilinear(torch.from_numpy(x), (sh, sw))
    bound = upsample_error_bound(torch.from_numpy(x))
    full_r = torch.arange(sh).expand(12, sh)
    full_c = torch.arange(sw).expand(12, sw)
    ap = upsample_approx_rows_cols(torch.from_numpy(x), full_r, full_c, (sh, sw))
    assert ((ap - ex).abs().amax(dim=(1, 2)) <= bound).all()
    # a window per map (as dissect computes): the same values as the full map there
    r0 = torch.from_numpy(np.random.default_rng(2).integers(0, max(sh - 3, 1), 12))
    rows = (r0[:, None] + torch.arange(3)).clamp(max=sh - 1)
    win = upsample_approx_rows_cols(torch.from_numpy(x), rows, full_c, (sh, sw))
    exw = torch.gather(ex, 1, rows[:, :, None].expand(12, 3, sw))
    assert ((win - exw).abs().amax(dim=(1, 2)) <= bound).all()
    rng = np.random.default_rng(1)
    idx, r, c = (torch.from_numpy(rng.integers(0, n, 500)) for n in (12, sh, sw))
    assert torch.equal(upsample_at(torch.from_numpy(x), idx, r, c, (sh, sw)), ex[idx, r, c])


# -- reduced-precision matmuls (TF32 on CUDA, bf16 on some CPUs) ----------------------------------
def _cpu_matmul_precision() -> str:
    """What a float32 matmul on this CPU may use: 'ieee', 'tf32' or 'bf16'."""
    b = torch.backends
    if hasattr(getattr(b.mkldnn, "matmul", None), "fp32_precision"):
        for v in (b.mkldnn.matmul.fp32_precision, b.mkldnn.fp32_precision, b.fp32_precision):
            if v != "none":
                return v
        return "ieee"
    return {"highest": "ieee", "high": "tf32", "medium": "bf16"}[torch.get_float32_matmul_precision()]


def _emulated_reduced_bmm(real_bmm):
    """torch.bmm as hardware with TF32 / bf16 matmuls runs it when the settings allow them: inputs
    rounded to a 10-bit ("tf32") or 7-bit ("bf16") mantissa; true float32 only for "ieee"."""
    def bmm(a, b, *args, **kwargs):
        bits = {"ieee": None, "tf32": 10, "bf16": 7}[_cpu_matmul_precision()]
        if bits is not None:
            drop = 23 - bits
            a, b = (((t.contiguous().view(torch.int32) >> drop) << drop).view(torch.float32) for t in (a, b))
        return real_bmm(a, b, *args, **kwargs)
    return bmm


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_reduced_matmul_precision_still_gives_pil_exact_masks(monkeypatch, precision):
    from conceptrank.core.tally import TallyAccumulator, label_category_matrix
    from conceptrank.testing.reference import naive_tally

    monkeypatch.setattr(torch, "bmm", _emulated_reduced_bmm(torch.bmm))
    rng = np.random.default_rng(11)
    N, U, h, w, sh, sw, L = 4, 6, 7, 7, 112, 112, 5
    feats = rng.standard_normal((N, U, h, w)).astype(np.float32) * 3 + 1
    up = upsample_bilinear(torch.from_numpy(feats[0]), (sh, sw)).numpy()
    thr = np.array([np.sort(up[u].ravel())[-300] for u in range(U)], np.float64)  # on upsampled values
    label_cat = label_category_matrix(np.array([0, 0, 1, 0, 1]), 2)
    planes = [rng.integers(0, L, size=(1, sh, sw)).astype(np.int32) for _ in range(N)]
    scalars = [[] for _ in range(N)]
    def settings():
        return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32, _cpu_matmul_precision())

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        caller = settings()
        assert caller[3] != "ieee"  # the emulated hardware would really cut precision here
        acc = TallyAccumulator(thr, label_cat)
        acc.add(torch.from_numpy(feats), [torch.from_numpy(p) for p in planes], scalars)
        after = settings()
    finally:
        torch.set_float32_matmul_precision(before)
    assert after == caller  # the caller's settings are restored
    truth, both, act = naive_tally(feats, thr, planes, scalars, label_cat)
    np.testing.assert_array_equal(acc.intersect.numpy(), both)
    np.testing.assert_array_equal(acc.activation.numpy(), act)


def test_upsample_above_chunks_and_counts_equal_thresholding_the_exact_upsample():
    """Sparse hot maps, thresholds placed exactly on upsampled values (the ambiguous case), and maps
    with no cell near their threshold: the same masks and counts as thresholding PIL's upsampling."""
    from conceptrank.core.upsample import count_above, upsample_above_chunks

    g = torch.Generator().manual_seed(3)
    maps = torch.rand(300, 7, 9, generator=g) ** 6
    exact = upsample_bilinear(maps, (29, 40))
    thr = torch.rand(300, generator=g) * 0.4 + 0.5
    thr[:40] = exact[:40, 11, 17]  # on a value: only PIL's arithmetic decides '>'
    thr[40:60] = 2.0  # nothing near: not even upsampled
    want = exact > thr[:, None, None]
    got = torch.zeros_like(want)
    seen = []
    for chunk, mask in upsample_above_chunks(maps, thr, (29, 40)):
        got[chunk] = mask
        seen += chunk.tolist()
    assert torch.equal(got, want) and not set(seen) & set(range(40, 60))
    assert torch.equal(count_above(maps, thr, (29, 40)), want.flatten(1).sum(dim=1))
    assert want[:40].any() and not want[40:60].any()
