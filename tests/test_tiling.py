"Tests for stampdefect.tiling: origins, tile, stitch (mean / max / gaussian), dtypes, backends, GPU kernels."
import os, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stampdefect.tiling import (tile_origins, tile, stitch, blend_window, WINDOW_FLOOR, bench_tiling)

ROOT = Path(__file__).resolve().parents[1]


def reference_stitch(maps, origins, hw, blend='mean', sigma=None):
    "Plain scatter-accumulate in float64 over canvases: the definition stitch must match. maps (N, C, th, tw)."
    n, c, th, tw = maps.shape
    if blend == 'max':
        out = np.full((c, *hw), -np.inf)
        for m, (r, q) in zip(maps, origins):
            out[:, r:r + th, q:q + tw] = np.maximum(out[:, r:r + th, q:q + tw], m)
        return out
    w = np.outer(blend_window(th, blend, sigma), blend_window(tw, blend, sigma))
    num, den = np.zeros((c, *hw)), np.zeros(hw)
    for m, (r, q) in zip(maps, origins):
        num[:, r:r + th, q:q + tw] += w * m
        den[r:r + th, q:q + tw] += w
    return num / den


# ---------------------------------------------------------------- origins
@pytest.mark.parametrize('hw,size,stride', [((600, 1000), 256, 128), ((256, 256), 256, 256), ((257, 300), 256, 100),
                                            ((37, 53), (8, 16), (3, 16)), ((2160, 3840), 256, 128), ((50, 50), 7, 7)])
def test_origins_cover_everything_inside(hw, size, stride):
    o = tile_origins(hw, size, stride)
    th, tw = (size, size) if isinstance(size, int) else size
    sr, sc = (stride, stride) if isinstance(stride, int) else stride
    assert o.dtype == np.int64 and o.ndim == 2 and o.shape[1] == 2
    cover = np.zeros(hw, int)
    for r, c in o:
        assert 0 <= r and r + th <= hw[0] and 0 <= c and c + tw <= hw[1]      # never outside: no padding
        cover[r:r + th, c:c + tw] += 1
    assert cover.min() >= 1
    rows, cols = np.unique(o[:, 0]), np.unique(o[:, 1])
    assert rows[-1] == hw[0] - th and cols[-1] == hw[1] - tw                 # last tiles end on the border
    for starts, step in ((rows, sr), (cols, sc)):                              # regular grid, last one shifted inward
        d = np.diff(starts)
        assert (d[:-1] == step).all() and (d[-1:] <= step).all()
    assert len(o) == len(rows) * len(cols) and (o[:len(cols), 0] == 0).all()  # row-major


def test_origins_last_tile_shifted_inward():
    o = tile_origins((600, 1000), 256, 128)
    assert sorted(set(o[:, 0])) == [0, 128, 256, 344]
    assert sorted(set(o[:, 1])) == [0, 128, 256, 384, 512, 640, 744]


def test_origins_bad_inputs():
    with pytest.raises(ValueError, match='height 100 is smaller than the tile height 256'):
        tile_origins((100, 300), 256, 128)
    with pytest.raises(ValueError, match='width 200 is smaller'):
        tile_origins((300, 200), 256)
    with pytest.raises(ValueError, match='larger than the tile'):
        tile_origins((600, 600), 256, 300)
    with pytest.raises(ValueError, match='stride must be positive'):
        tile_origins((600, 600), 256, 0)
    with pytest.raises(TypeError, match='size must be an int or a pair'):
        tile_origins((600, 600), 'big')


# ---------------------------------------------------------------- tile
@pytest.mark.parametrize('dtype', [np.float32, np.float16, np.uint8, np.float64])
def test_tile_copies_exact_tiles(dtype):
    rng = np.random.default_rng(0)
    img = (rng.random((3, 70, 90)) * 200).astype(dtype)
    tiles, o = tile(img, (32, 40), (16, 20))
    assert tiles.shape == (len(o), 3, 32, 40) and tiles.dtype == img.dtype
    for t, (r, c) in zip(tiles, o):
        np.testing.assert_array_equal(t, img[:, r:r + 32, c:c + 40])
    tiles2d, _ = tile(img[1], (32, 40), (16, 20))
    assert tiles2d.shape == (len(o), 32, 40)
    np.testing.assert_array_equal(tiles2d, tiles[:, 1])


def test_tile_non_contiguous_input():
    img = np.random.default_rng(1).random((80, 60, 3), dtype=np.float32).transpose(2, 0, 1)   # HWC viewed as CHW
    tiles, o = tile(img, 32, 16)
    r, c = o[-1]
    np.testing.assert_array_equal(tiles[-1], img[:, r:r + 32, c:c + 32])


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16, torch.uint8])
def test_tile_torch_in_torch_out(dtype):
    img = (torch.rand(2, 50, 70) * 100).to(dtype)
    tiles, o = tile(img, 24, 12)
    assert isinstance(tiles, torch.Tensor) and tiles.dtype == dtype and tiles.shape == (len(o), 2, 24, 24)
    r, c = o[3]
    assert torch.equal(tiles[3], img[:, r:r + 24, c:c + 24])


def test_tile_bad_inputs():
    with pytest.raises(ValueError, match=r'\(C, H, W\) or \(H, W\)'):
        tile(np.zeros((1, 1, 64, 64), np.float32), 32)
    with pytest.raises(ValueError, match='smaller than the tile'):
        tile(np.zeros((3, 20, 64), np.float32), 32)
    with pytest.raises(TypeError, match='got list'):
        tile([[1.0]], 1)


# ---------------------------------------------------------------- stitch
@pytest.mark.parametrize('shape', [(3, 300, 410), (300, 410)])
@pytest.mark.parametrize('dtype', [np.float32, np.float16, np.uint8])
def test_round_trip_mean_is_exact(shape, dtype):
    img = (np.random.default_rng(2).random(shape) * 250).astype(dtype)
    tiles, o = tile(img, 64, 24)                       # up to 9 tiles over one pixel near the shifted border
    back = stitch(tiles, o, shape[-2:], blend='mean')
    assert back.shape == img.shape
    assert back.dtype == (np.float32 if dtype == np.uint8 else dtype)
    np.testing.assert_array_equal(back, img.astype(back.dtype))


@pytest.mark.parametrize('blend', ['mean', 'max', 'gaussian'])
def test_stitch_matches_reference(blend):
    rng = np.random.default_rng(3)
    o = tile_origins((150, 230), (40, 50), (25, 30))
    maps = rng.normal(size=(len(o), 2, 40, 50)).astype(np.float32)
    got = stitch(maps, o, (150, 230), blend=blend)
    np.testing.assert_allclose(got, reference_stitch(maps, o, (150, 230), blend), rtol=1e-6, atol=1e-6)
    # arbitrary (non-grid) origins in any order also work, as long as every pixel is covered
    perm = rng.permutation(len(o))
    np.testing.assert_array_equal(stitch(maps[perm], o[perm], (150, 230), blend=blend)[0] if blend == 'max' else 0,
                                  got[0] if blend == 'max' else 0)


def test_max_semantics():
    o = tile_origins((64, 64), 32, 16)
    maps = np.zeros((len(o), 32, 32), np.float32)
    maps[0, 20, 20] = 5.0                     # pixel (20, 20) lies in 4 tiles; only tile 0 says 5
    maps[1, 20, 20 - 16] = -3.0               # tile 1 starts at column 16: its own view of the same pixel
    out = stitch(maps, o, (64, 64), blend='max')
    assert out[20, 20] == 5.0 and (out >= 0).all() and (out > 0).sum() == 1
    assert stitch(-np.ones((len(o), 32, 32), np.float32), o, (64, 64), blend='max').max() == -1.0
    mean = stitch(maps, o, (64, 64), blend='mean')
    assert mean[20, 20] == np.float32((5 - 3) / 4)


@pytest.mark.parametrize('dtype', [np.float32, np.float16])
@pytest.mark.parametrize('value', [0.7, 1e-3, 123.25])
def test_gaussian_constant_map_is_exactly_constant(dtype, value):
    o = tile_origins((300, 517), 64, 40)
    maps = np.full((len(o), 64, 64), value, dtype)
    out = stitch(maps, o, (300, 517), blend='gaussian')
    assert out.dtype == dtype
    assert (out == dtype(value)).all()
    out = stitch(maps, o, (300, 517), blend='gaussian', sigma=2.0)     # tiny sigma: the floor keeps borders defined
    assert (out == dtype(value)).all()


def test_gaussian_removes_seams():
    o = tile_origins((256, 384), 64, 32)
    yy, xx = np.mgrid[:256, :384]
    truth = (np.sin(xx / 40) * np.cos(yy / 30)).astype(np.float32)
    offsets = np.random.default_rng(4).normal(0, 0.1, (len(o), 1, 1)).astype(np.float32)
    maps = np.stack([truth[r:r + 64, c:c + 64] for r, c in o]) + offsets
    step = lambda e: max(np.abs(np.diff(e, axis=0)).max(), np.abs(np.diff(e, axis=1)).max())
    mean_step = step(stitch(maps, o, (256, 384), blend='mean') - truth)
    gauss_step = step(stitch(maps, o, (256, 384), blend='gaussian') - truth)
    # sigma = 8 px hands over between tile centres 32 px apart within ~8 px: steps shrink ~3-4x (more for larger sigma)
    assert gauss_step < mean_step / 3
    wide_step = step(stitch(maps, o, (256, 384), blend='gaussian', sigma=16.0) - truth)
    assert wide_step < gauss_step


def test_blend_window():
    w = blend_window(64)
    assert w.shape == (64,) and w.dtype == np.float64 and np.allclose(w, w[::-1]) and w.min() >= WINDOW_FLOOR
    np.testing.assert_allclose(w, np.maximum(np.exp(-(np.arange(64) - 31.5) ** 2 / (2 * 8.0 ** 2)), WINDOW_FLOOR))
    assert (blend_window(5, 'mean') == 1).all()
    with pytest.raises(ValueError, match='sigma must be positive'):
        blend_window(8, 'gaussian', sigma=0)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_stitch_torch_in_torch_out(dtype):
    img = torch.rand(3, 100, 130).to(dtype)
    tiles, o = tile(img, 48, 24)
    out = stitch(tiles, o, (100, 130), blend='mean')
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (3, 100, 130)
    assert torch.equal(out, img)
    g = stitch(tiles[:, 0], torch.from_numpy(o), (100, 130), blend='gaussian')     # origins as a tensor, 1 channel
    assert g.shape == (100, 130) and g.dtype == dtype


def test_stitch_low_resolution_maps():
    o = tile_origins((96, 160), 32, 16)
    coarse = np.random.default_rng(5).random((len(o), 1, 8, 8), dtype=np.float32)
    got = stitch(coarse, o, (96, 160), blend='gaussian', tile_size=32)
    up = F.interpolate(torch.from_numpy(coarse), size=(32, 32), mode='bilinear', align_corners=False).numpy()
    np.testing.assert_allclose(got, stitch(up, o, (96, 160), blend='gaussian'), rtol=1e-6)
    assert got.shape == (1, 96, 160)
    half = stitch(coarse.astype(np.float16), o, (96, 160), blend='mean', tile_size=(32, 32))
    assert half.dtype == np.float16 and half.shape == (1, 96, 160)


def test_stitch_bad_inputs():
    o = tile_origins((64, 64), 32, 16)
    maps = np.zeros((len(o), 32, 32), np.float32)
    with pytest.raises(ValueError, match='covered by no tile'):
        stitch(maps[:2], o[:2], (64, 64))
    with pytest.raises(ValueError, match='does not fit in out_shape'):
        stitch(maps, o, (60, 64))
    with pytest.raises(ValueError, match='does not fit in out_shape'):
        stitch(maps, o - 1, (64, 64))
    with pytest.raises(ValueError, match='tile_maps has 9 tiles but origins has 8 rows'):
        stitch(maps, o[:-1], (64, 64))
    with pytest.raises(ValueError, match='integers'):
        stitch(maps, o.astype(float), (64, 64))
    with pytest.raises(ValueError, match=r'\(N, th, tw\) or \(N, C, th, tw\)'):
        stitch(maps[0], o, (64, 64))
    with pytest.raises(ValueError, match="got 'median'"):
        stitch(maps, o, (64, 64), blend='median')
    with pytest.raises(ValueError, match='sigma only applies'):
        stitch(maps, o, (64, 64), blend='mean', sigma=3.0)
    with pytest.raises(ValueError, match='out_shape must be positive'):
        stitch(maps, o, (0, 64))


# ---------------------------------------------------------------- GPU kernels
def test_cuda_kernels_under_simulator():
    "The Numba-CUDA kernels, run by Numba's CUDA simulator on the CPU, agree with the CPU kernels exactly."
    code = textwrap.dedent('''
        import numpy as np
        from stampdefect.tiling import (_launch_tile, _launch_stitch, _stitch_plan, _tile_kernel, _stitch_kernel,
                                        tile_origins, blend_window)
        rng = np.random.default_rng(0)
        img = rng.random((2, 13, 17), dtype=np.float32)
        o = tile_origins((13, 17), (6, 5), (4, 3)); rows, cols = o[:, 0].copy(), o[:, 1].copy()
        got = np.zeros((len(o), 2, 6, 5), np.float32); _launch_tile(img, rows, cols, got)
        ref = np.zeros_like(got); _tile_kernel(img.view(np.uint8), rows, cols * 4, ref.view(np.uint8))
        assert (got == ref).all()
        plan = _stitch_plan(o, 6, 13)
        for blend in ('mean', 'max', 'gaussian'):
            wy, wx = blend_window(6, blend), blend_window(5, blend)
            for maps in (ref, ref.astype(np.float16)):
                g = np.zeros((2, 13, 17), np.float32); r = np.zeros_like(g)
                assert _launch_stitch(maps, *plan, wy, wx, blend == 'max', g) == 0
                _stitch_kernel(maps.astype(np.float32), *plan, wy, wx, blend == 'max', r)
                assert (g == r).all(), blend
        g = np.zeros((2, 13, 17), np.float32)
        assert _launch_stitch(ref[:2], *_stitch_plan(o[:2], 6, 13), wy, wx, False, g) > 0     # gaps are counted
        print('cudasim ok')''')
    env = {**os.environ, 'NUMBA_ENABLE_CUDASIM': '1', 'PYTHONPATH': str(ROOT)}
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and 'cudasim ok' in res.stdout, res.stderr[-3000:]


def _cuda_ok():
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_gpu_torch_matches_cpu(dtype):
    img = torch.rand(3, 700, 1100).to(dtype)
    tiles_cpu, o = tile(img, 256, 128)
    tiles_gpu, o2 = tile(img.cuda(), 256, 128)
    assert tiles_gpu.is_cuda and tiles_gpu.dtype == dtype and (o == o2).all()
    assert torch.equal(tiles_gpu.cpu(), tiles_cpu)
    for blend in ('mean', 'max', 'gaussian'):
        a = stitch(tiles_cpu, o, (700, 1100), blend=blend)
        b = stitch(tiles_gpu, o, (700, 1100), blend=blend)
        assert b.is_cuda and b.dtype == dtype
        assert torch.equal(a, b.cpu()), blend
    assert torch.equal(stitch(tiles_gpu, o, (700, 1100)).cpu(), img)


@pytest.mark.gpu
def test_gpu_cupy_matches_cpu():
    cupy = pytest.importorskip('cupy')
    img = np.random.default_rng(0).random((2, 300, 500), dtype=np.float32)
    tiles_cpu, o = tile(img, 128, 64)
    tiles_gpu, _ = tile(cupy.asarray(img), 128, 64)
    assert isinstance(tiles_gpu, cupy.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(tiles_gpu), tiles_cpu)
    for blend in ('mean', 'max', 'gaussian'):
        np.testing.assert_array_equal(cupy.asnumpy(stitch(tiles_gpu, o, (300, 500), blend=blend)),
                                      stitch(tiles_cpu, o, (300, 500), blend=blend))


# ---------------------------------------------------------------- benchmark
def test_bench_quick_runs():
    cases = bench_tiling(quick=True)
    assert [c['case'].split()[0] for c in cases] == ['stitch', 'stitch', 'tile']
    for c in cases:
        assert c['seconds'] > 0 and any(k.startswith('ratio_to_') for k in c)
    assert cases[0]['max_abs_diff_interior'] < 1e-5 and 'met' in cases[0]
