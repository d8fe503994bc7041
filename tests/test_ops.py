"Tests for stampdefect.ops: array dispatch, sizes, device choice, resizers and the Gaussian blur, against the code they replace."
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stampdefect.ops import (array_backend, as_pair, cuda_view, get_numba_cuda, gaussian_blur, pick_device,
                             resize_images, resize_maps)


# ---------------------------------------------------------------- dispatch and sizes

def test_array_backend():
    assert array_backend(np.zeros(1)) == 'numpy' and array_backend(torch.zeros(1)) == 'torch'
    with pytest.raises(TypeError, match='got tuple'):
        array_backend((1,))
    assert array_backend((1,), array_like=True) == 'numpy' and array_backend(3.0, array_like=True) == 'numpy'


def test_as_pair():
    assert as_pair(4, 'size') == (4, 4) and as_pair(np.int64(3), 'size') == (3, 3) and as_pair([2, 5], 'size') == (2, 5)
    with pytest.raises(ValueError, match='stride must be positive'):
        as_pair((1, 0), 'stride')
    with pytest.raises(TypeError, match='size must be an int or a pair of ints'):
        as_pair(None, 'size')


def test_gpu_helpers_on_host_arrays():
    import numba
    a = np.arange(3.0)
    assert get_numba_cuda() is numba.cuda and cuda_view(a) is a


def test_pick_device():
    assert pick_device('cpu') == torch.device('cpu') and pick_device(torch.device('cpu')) == torch.device('cpu')
    assert pick_device().type == ('cuda' if torch.cuda.is_available() else 'cpu')


# ---------------------------------------------------------------- resizers: the same bits as the calls they replace

@pytest.mark.parametrize('hw', [(20, 31), (128, 96), (61, 83)])
def test_resize_images_matches_interpolate(hw):
    x = torch.rand(2, 3, 61, 83, generator=torch.Generator().manual_seed(0))
    old = F.interpolate(x, size=hw, mode='bilinear', antialias=True, align_corners=False).clamp(0, 1)   # CLI, pipeline, PatchCore
    assert torch.equal(resize_images(x, hw), old)
    assert torch.equal(resize_images(x[0], hw), old[0])                                                   # widgets: (C, H, W)
    assert resize_images(x.double(), hw).dtype == torch.float32


@pytest.mark.parametrize('hw', [(7, 9), (64, 80), (16, 16)])
def test_resize_maps_matches_interpolate(hw):
    g = torch.Generator().manual_seed(1)
    m = torch.rand(3, 16, 16, generator=g) * 50
    old = F.interpolate(m[:, None], size=hw, mode='bilinear', align_corners=False)[:, 0]          # PatchCore, metrics
    assert torch.equal(resize_maps(m, hw), old)
    f = torch.rand(2, 5, 16, 16, generator=g)
    assert torch.equal(resize_maps(f, hw), F.interpolate(f, size=hw, mode='bilinear', align_corners=False))  # features, tiles
    a = m[0].numpy()
    ref = F.interpolate(torch.from_numpy(a)[None, None], size=hw, mode='bilinear', align_corners=False)[0, 0].numpy()
    out = resize_maps(a, hw)                                                                      # pipeline: NumPy in, NumPy out
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and np.array_equal(out, ref)
    assert resize_maps(a.astype(np.float16), hw).dtype == np.float32


def test_resizers_reject_bad_input():
    with pytest.raises(ValueError, match=r'\(C, H, W\) or \(B, C, H, W\)'):
        resize_images(torch.rand(4, 4), 2)
    with pytest.raises(ValueError, match=r'\(H, W\), \(B, H, W\) or \(B, C, H, W\)'):
        resize_maps(np.zeros(3), 2)
    with pytest.raises(ValueError, match='hw must be positive'):
        resize_maps(np.zeros((3, 3)), (0, 2))
    with pytest.raises(TypeError, match='got list'):
        resize_maps([[1.0]], 2)


# ---------------------------------------------------------------- Gaussian blur: both former copies, bit for bit

def blur_patchcore(maps, sigma):
    "models/patchcore.py's gaussian_blur before stampdefect.ops, verbatim."
    if sigma <= 0: return maps
    r = int(4 * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2)); k = k / k.sum()
    mode = 'reflect' if min(maps.shape[-2:]) > r else 'replicate'
    m = F.conv2d(F.pad(maps[:, None].float(), (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    return m[:, 0]


def blur_mna(maps, sigma):
    "models/mna.py's gaussian_blur before stampdefect.ops, verbatim."
    if sigma <= 0: return maps
    r = int(math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32, device=maps.device) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.pad(maps[:, None].float(), (r, r, r, r), mode='replicate')
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))[:, 0]


@pytest.mark.parametrize('shape', [(1, 5, 7), (2, 41, 41), (1, 256, 256), (3, 100, 37), (1, 13, 300)])
@pytest.mark.parametrize('sigma', [0.0, 0.5, 1.1, 1.5, 2.0, 3.3, 4.0])
def test_gaussian_blur_is_both_former_copies(shape, sigma):
    m = torch.rand(*shape, generator=torch.Generator().manual_seed(len(shape) + shape[-1])) * 10
    assert torch.equal(gaussian_blur(m, sigma), blur_patchcore(m, sigma))                         # PatchCore's call
    assert torch.equal(gaussian_blur(m, sigma, radius=math.ceil(3 * sigma), padding='replicate'),  # the MNA detector's
                       blur_mna(m, sigma))


def test_gaussian_blur_properties_and_errors():
    imp = torch.zeros(1, 41, 41); imp[0, 20, 20] = 1
    out = gaussian_blur(imp, 4)
    assert abs(float(out.sum()) - 1) < 1e-4 and int(out.argmax()) == 20 * 41 + 20
    assert gaussian_blur(torch.ones(1, 3, 5), 4).shape == (1, 3, 5)
    assert torch.allclose(gaussian_blur(torch.ones(2, 9, 9), 2.0, radius=6, padding='replicate'), torch.ones(2, 9, 9), atol=1e-5)
    with pytest.raises(ValueError, match="'reflect' or 'replicate'"):
        gaussian_blur(imp, 1.0, padding='zeros')
    with pytest.raises(ValueError, match='radius must be an int >= 0'):
        gaussian_blur(imp, 1.0, radius=-1)
