"""Tests of stampdefect.masks: the classical product mask and its soft edges."""
import numpy as np
import pytest
import torch

from stampdefect.masks import classical_mask, fill_holes, soft_edges

synthetic = pytest.importorskip('stampdefect.synthetic')

pytestmark = pytest.mark.usefixtures('one_thread')   # tiny tensors: one thread (see conftest.py)


def test_classical_mask_on_synthetic_panel():
    cfg = synthetic.PanelConfig(size=(540, 960))
    r = synthetic.render_panel(cfg, 11)
    m = classical_mask(r['image'])
    truth = fill_holes(r['panel_mask'] > 0)
    assert m.shape == truth.shape and m.dtype == bool
    assert (m & truth).sum() / (m | truth).sum() > 0.99
    assert not classical_mask(torch.full((3, 64, 64), 0.5)).any()          # nothing to find


def test_soft_edges_coverage():
    g = np.full((20, 30), 0.1, np.float32); g[5:15, 8:20] = 0.9; g[5:15, 20] = 0.1 + 0.8 * 0.25
    s = soft_edges(g > 0.5, g)
    assert abs(s[10, 20] - 0.25) < 1e-6 and s[10, 10] == 1 and s[0, 0] == 0
