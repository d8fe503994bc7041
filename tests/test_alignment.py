"""Tests of stampdefect.alignment: the Aligner on synthetic panels, its refusals of bad input, saving, and the corner
error that measures it."""
import json
import math

import numpy as np
import pytest
import torch

from stampdefect.alignment import Aligner, AlignerConfig, corner_error
from stampdefect.geometry import invert_matrix
from stampdefect.stn import STNConfig

synthetic = pytest.importorskip('stampdefect.synthetic')

pytestmark = pytest.mark.usefixtures('one_thread')   # tiny tensors: one thread (see conftest.py)


def test_corner_error_zero_for_true_alignment(pose):
    P, R = pose(2.0, 1.01, (10, 5), (540, 960)), pose(-1.0, 0.99, (-3, 4), (540, 960))
    corners = [[100, 80], [860, 80], [860, 460], [100, 460]]
    matrix = P @ invert_matrix(R)                  # aligned (= reference photo) px -> this photo px
    assert corner_error(invert_matrix(matrix), P, R, corners) < 1e-9
    assert corner_error(np.eye(3), P, R, corners) > 5


@pytest.fixture(scope='module')
def small_cfg():
    return synthetic.PanelConfig(size=(270, 480), crack_length_px=(10.0, 30.0), crack_width_px=(1.0, 2.0))


@pytest.fixture(scope='module')
def fitted(small_cfg):
    renders = [synthetic.render_panel(small_cfg, s) for s in range(10, 14)]
    torch.set_num_threads(1)
    al = Aligner(stn=STNConfig(steps=40, batch_size=8)).fit([r['image'] for r in renders])
    return al, renders


def test_aligner_aligns_synthetic_panels(fitted, small_cfg):
    al, renders = fitted
    ref = np.array(renders[0]['pose']['matrix'])
    corners = synthetic.template_corners(small_cfg)
    for seed in (50, 51):
        r = synthetic.render_panel(small_cfg, seed, defective=True)
        P = np.array(r['pose']['matrix'])
        before = corner_error(np.eye(3), P, ref, corners)
        res = al.align(r['image'], method='direct')
        assert res.ok, res.reason
        assert corner_error(res.inverse, P, ref, corners) < 0.25 < before
        assert res.mask_iou_after > res.mask_iou_before and res.mask_iou_after > 0.99
        assert res.image.shape == (3, 270, 480)
        np.testing.assert_allclose(res.inverse @ res.matrix, np.eye(3), atol=1e-9)
        gt = torch.from_numpy(r['mask'] > 0)
        back = res.to_photo(res.to_template(gt, mode='nearest').float()) > 0.5
        assert (back & gt).sum() >= 0.5 * gt.sum()
        refined = al.align(r['image'], method='stn+refine', warp_image=False)
        assert refined.ok and refined.image is None
        assert corner_error(refined.inverse, P, ref, corners) < 0.5


def test_aligner_refuses_bad_input(fitted):
    al, renders = fitted
    img = renders[1]['image']
    empty = al.align(torch.full((3, 270, 480), 0.3))
    assert not empty.ok and 'no product found' in empty.reason and empty.image is None
    full = al.align(img, mask=np.ones((270, 480), bool))
    assert not full.ok and 'whole frame' in full.reason
    tm = al.template.numpy() > 0.5
    yy, xx = np.mgrid[:270, :480]
    disc = (xx - 240) ** 2 + (yy - 135) ** 2 < tm.sum() / np.pi                # right area, wrong shape
    blob = al.align(img, mask=disc)
    assert not blob.ok and blob.reason.startswith('alignment'), blob.reason
    small = al.align(img, mask=tm & (xx < 200))
    assert not small.ok and "area is" in small.reason


def test_aligner_reports_divergence(fitted, monkeypatch):
    al, renders = fitted
    wild = torch.tensor([[[1.0, 0.0, 0.9], [0.0, 1.0, -0.8]]])                  # half the frame away
    monkeypatch.setattr(al.stn, 'predict_theta', lambda masks, iterations=2: wild.expand(len(masks), -1, -1))
    res = al.align(renders[1]['image'], method='stn')
    assert not res.ok and res.reason.startswith('alignment diverged') and 'shift' in res.reason
    turned = torch.tensor([[[math.cos(0.6), -math.sin(0.6) * 270 / 480, 0.0], [math.sin(0.6) * 480 / 270, math.cos(0.6), 0.0]]])
    monkeypatch.setattr(al.stn, 'predict_theta', lambda masks, iterations=2: turned.expand(len(masks), -1, -1))
    res = al.align(renders[1]['image'], method='stn')
    assert not res.ok and 'rotation' in res.reason
    nan = torch.full((1, 2, 3), float('nan'))
    monkeypatch.setattr(al.stn, 'predict_theta', lambda masks, iterations=2: nan.expand(len(masks), -1, -1))
    res = al.align(renders[1]['image'], method='stn')
    assert not res.ok and 'not finite' in res.reason and res.image is None


def test_aligner_save_load_and_errors(fitted, tmp_path):
    al, renders = fitted
    st = al.state_dict()
    json.dumps(st['config']); json.dumps(st['extra'])                          # JSON-able
    assert all(isinstance(v, torch.Tensor) for v in st['tensors'].values())
    path = al.save(tmp_path / 'a.safetensors')
    al2 = Aligner.load(path)
    img = renders[2]['image']
    np.testing.assert_allclose(al2.align(img, 'stn', False).theta, al.align(img, 'stn', False).theta, atol=1e-6)
    (tmp_path / 'junk').write_bytes(b'x')
    with pytest.raises(ValueError, match='not an aligner file'): Aligner.load(tmp_path / 'junk')
    with pytest.raises(FileNotFoundError): Aligner.load(tmp_path / 'nope')
    with pytest.raises(ValueError, match='not fitted'): Aligner().align(img)
    with pytest.raises(ValueError, match='Model Checkpoints'): Aligner(mask_method='sam')
    with pytest.raises(ValueError, match='method must be one of'): al.align(img, method='magic')
    with pytest.raises(ValueError, match='template'): AlignerConfig(template='best')
    with pytest.raises(ValueError, match='train_images\\[1\\]: no product found'):
        Aligner(stn=STNConfig(steps=1)).fit([img, np.full((270, 480, 3), 80, np.uint8)])
    with pytest.raises(ValueError, match='size'):
        Aligner(stn=STNConfig(steps=1)).fit([img, renders[0]['image'][:200]])


def test_mean_template(fitted):
    _, renders = fitted
    al = Aligner(template='mean', stn=STNConfig(steps=5, batch_size=4)).fit([r['image'] for r in renders])
    t = al.template.numpy()
    assert t.shape == (270, 480) and 0 <= t.min() and t.max() <= 1
    # the mean of aligned masks is sharp: few pixels are neither clearly in nor clearly out
    assert ((t > 0.05) & (t < 0.95)).mean() < 0.02
    assert al.align(renders[3]['image'], method='direct').ok
