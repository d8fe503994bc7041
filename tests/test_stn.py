"""Tests of stampdefect.stn: the Spatial Transformer at initialisation, and direct optimisation of the pose."""
import numpy as np
import pytest
import torch

from stampdefect.geometry import invert_matrix, theta_to_pixel_matrix, transform_points
from stampdefect.stn import IDENTITY_THETA, STN, direct_align, warp

pytestmark = pytest.mark.usefixtures('one_thread')   # tiny tensors: one thread (see conftest.py)


def render_rect(P, hw=(72, 128), box=(24, 16, 104, 56), ss=8):
    "Area coverage of the rectangle `box` (pixel edges, template frame) posed by P, supersampled ss x ss."
    H, W = hw
    yy, xx = np.mgrid[0:H * ss, 0:W * ss]
    pts = np.stack([(xx.ravel() + 0.5) / ss - 0.5, (yy.ravel() + 0.5) / ss - 0.5], 1)
    tx, ty = transform_points(invert_matrix(P), pts).T + 0.5
    inside = (tx >= box[0]) & (tx < box[2]) & (ty >= box[1]) & (ty < box[3])
    return inside.reshape(H, ss, W, ss).mean((1, 3)).astype(np.float32)


def test_stn_identity_at_init():
    net = STN((72, 128))
    x = torch.rand(3, 1, 72, 128)
    with torch.no_grad():
        theta = net(x)
        assert torch.equal(theta, torch.tensor(IDENTITY_THETA).view(1, 2, 3).expand(3, -1, -1))
        torch.testing.assert_close(net.predict_theta(x, 2), theta)
        torch.testing.assert_close(warp(x, theta), x, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r'\(B, 1, 72, 128\)'): net(torch.rand(1, 1, 64, 64))


def test_direct_optimisation_recovers_known_affine(pose):
    hw = (72, 128)
    P = pose(2.0, 1.01, (1.7, -1.2), hw)
    rect, moved = render_rect(np.eye(3), hw), render_rect(P, hw)
    est = direct_align(moved, rect)                # sample `moved` to match the template: template -> image = P
    corners = [[24, 16], [104, 16], [104, 56], [24, 56]]
    err = np.hypot(*(transform_points(theta_to_pixel_matrix(est, hw, hw), corners) - transform_points(P, corners)).T)
    assert err.max() < 0.1, err
    with pytest.raises(ValueError, match='same size'): direct_align(rect, rect[:10])
