"""Tests of stampdefect.geometry: coordinate conversions, warps, and the image helpers."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stampdefect.geometry import (apply_affine, as_image, invert_matrix, pixel_matrix_to_theta, theta_to_pixel_matrix,
                                  transform_points)
from stampdefect.stn import IDENTITY_THETA

pytestmark = pytest.mark.usefixtures('one_thread')   # tiny tensors: one thread (see conftest.py)


@pytest.mark.parametrize('align_corners', [False, True])
def test_theta_pixel_round_trip(align_corners, pose):
    rng = np.random.default_rng(0)
    for src, dst in [((2160, 3840), (2160, 3840)), ((144, 256), (2160, 3840)), ((7, 9), (5, 13))]:
        theta = np.array([[1, 0, 0], [0, 1, 0]]) + rng.normal(0, 0.1, (2, 3))
        M = theta_to_pixel_matrix(theta, src, dst, align_corners)
        np.testing.assert_allclose(pixel_matrix_to_theta(M, src, dst, align_corners), theta, atol=1e-12)
        P = pose(3.0, 1.02, (15.0, -7.0), dst)
        np.testing.assert_allclose(theta_to_pixel_matrix(pixel_matrix_to_theta(P, src, dst, align_corners), src, dst, align_corners), P, atol=1e-9)
    # identity theta is the identity pixel map only when source and output have the same size
    np.testing.assert_allclose(theta_to_pixel_matrix(np.array(IDENTITY_THETA).reshape(2, 3), (50, 80), (50, 80), align_corners), np.eye(3), atol=1e-12)


def test_pixel_matrix_matches_grid_sample():
    "grid_sample with theta samples exactly where the pixel matrix says."
    src = torch.rand(1, 1, 11, 17, dtype=torch.float64)
    theta = torch.tensor([[[0.95, 0.08, 0.03], [-0.05, 1.04, -0.07]]], dtype=torch.float64)
    from scipy import ndimage as ndi
    for ac in (False, True):
        out = F.grid_sample(src, F.affine_grid(theta, (1, 1, 9, 14), align_corners=ac), mode='bilinear', align_corners=ac)
        M = theta_to_pixel_matrix(theta[0], (11, 17), (9, 14), ac)
        yy, xx = np.mgrid[0:9, 0:14]
        p = transform_points(M, np.stack([xx.ravel(), yy.ravel()], 1))
        want = ndi.map_coordinates(src[0, 0].numpy(), [p[:, 1], p[:, 0]], order=1, mode='grid-constant').reshape(9, 14)
        np.testing.assert_allclose(out[0, 0].numpy(), want, atol=1e-9)


def test_known_shift_rotation_on_rectangle_mask(pose):
    "A known rotation + shift, given as a pixel matrix, warps a rectangle mask exactly where geometry says."
    hw = (90, 160)
    P = pose(10.0, 1.0, (6.0, -4.0), hw)                       # template -> image
    rect = np.zeros(hw, bool); rect[30:60, 40:120] = True        # template rectangle, pixels [30, 60) x [40, 120)
    posed = apply_affine(torch.from_numpy(rect), invert_matrix(P), hw, mode='nearest').numpy()  # image(q) = rect(P^-1 q)
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
    t = transform_points(invert_matrix(P), np.stack([xx.ravel(), yy.ravel()], 1))
    ti, tj = np.round(t[:, 1]).reshape(hw), np.round(t[:, 0]).reshape(hw)
    want = (ti >= 30) & (ti < 60) & (tj >= 40) & (tj < 120)
    ties = (np.abs(np.abs(t[:, 0] % 1) - 0.5) < 1e-3).reshape(hw) | (np.abs(np.abs(t[:, 1] % 1) - 0.5) < 1e-3).reshape(hw)
    assert (posed == want)[~ties].all()
    assert posed.sum() > 0.9 * rect.sum()


def test_apply_affine_inverse_round_trip(pose):
    y, x = np.mgrid[0:120, 0:200].astype(np.float64)
    # bilinear interpolation is exact on a linear image, so the round trip must be exact away from the border
    img = torch.from_numpy(np.stack([0.003 * x + 0.002 * y, 0.5 - 0.001 * x + 0.004 * y]))   # (2, H, W) float64
    M = pose(4.0, 1.03, (5.5, -3.25), (120, 200))
    out = apply_affine(img, M, (120, 200))
    q = transform_points(M, [[100, 60]])[0]                                             # out(p) = img(M p)
    assert abs(out[0, 60, 100].item() - (0.003 * q[0] + 0.002 * q[1])) < 1e-9
    back = apply_affine(out, invert_matrix(M), (120, 200))
    inner = (slice(None), slice(20, 100), slice(25, 175))
    np.testing.assert_allclose(back[inner].numpy(), img[inner].numpy(), atol=1e-9)
    shift = np.array([[1, 0, 3], [0, 1, 2], [0, 0, 1.0]])                              # integer shift: exact
    np.testing.assert_allclose(apply_affine(img, shift, (120, 200))[:, :118, :197].numpy(), img[:, 2:, 3:].numpy(), atol=1e-9)
    m = torch.zeros(120, 200, dtype=torch.bool); m[40:60, 50:90] = True
    mo = apply_affine(m, M, (120, 200), mode='nearest')
    assert mo.dtype == torch.bool and abs(int(mo.sum()) - 800 / 1.03 ** 2) < 40
    with pytest.raises(TypeError, match="mode='nearest'"): apply_affine(m, M, (120, 200))
    with pytest.raises(ValueError, match='2x3 or 3x3'): apply_affine(img, np.eye(2), (120, 200))
    with pytest.raises(ValueError, match='out_hw'): apply_affine(img, M, (0, 5))


def test_as_image_rejects_bad_input():
    with pytest.raises(ValueError, match='C = 1 or 3'): as_image(torch.rand(4, 20, 20))
    with pytest.raises(TypeError, match='float values'): as_image(torch.zeros(3, 20, 20, dtype=torch.int32))
    with pytest.raises(ValueError, match='NaN'): as_image(torch.full((3, 20, 20), float('nan')))
    assert as_image(np.zeros((20, 30, 3), np.uint8)).shape == (3, 20, 30)
