"""Helpers shared by the tests of the alignment chapters (geometry, masks, sam, stn, alignment)."""
import math

import numpy as np
import pytest
import torch


@pytest.fixture
def one_thread():
    "Tiny tensors: a single thread avoids oversubscription on shared CI machines (a module opts in with `pytestmark`)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pose(angle_deg, scale, shift, hw):
    "Pixel matrix (3, 3): rotation/scale about the image centre, then shift; template px -> image px."
    H, W = hw
    c = np.array([(W - 1) / 2, (H - 1) / 2]); a = math.radians(angle_deg)
    R = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    P = np.eye(3); P[:2, :2] = R; P[:2, 2] = c + np.asarray(shift) - R @ c
    return P


@pytest.fixture
def pose():
    "`pose(angle_deg, scale, shift, hw)`: a known pose as a (3, 3) pixel matrix (template px -> image px)."
    return _pose
