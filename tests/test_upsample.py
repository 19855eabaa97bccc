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
