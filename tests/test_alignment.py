"""Tests of stampdefect.alignment: coordinate conversions, warps, product masks, SAM loading, STN, direct
optimisation, and the Aligner's refusals of bad input."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stampdefect.alignment import (
    Aligner, AlignerConfig, STN, STNConfig, TINY_SAM, IDENTITY_THETA, apply_affine, as_image,
    build_sam, classical_mask, corner_error, direct_align, fill_holes, invert_matrix, load_sam, pixel_matrix_to_theta,
    sam_config_from_state_dict, sam_mask, soft_edges, theta_to_pixel_matrix, transform_points, warp)

synthetic = pytest.importorskip('stampdefect.synthetic')


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: a single thread avoids oversubscription on shared CI machines
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pose(angle_deg, scale, shift, hw):
    "Pixel matrix (3, 3): rotation/scale about the image centre, then shift; template px -> image px."
    H, W = hw
    c = np.array([(W - 1) / 2, (H - 1) / 2]); a = math.radians(angle_deg)
    R = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    P = np.eye(3); P[:2, :2] = R; P[:2, 2] = c + np.asarray(shift) - R @ c
    return P


def render_rect(P, hw=(72, 128), box=(24, 16, 104, 56), ss=8):
    "Area coverage of the rectangle `box` (pixel edges, template frame) posed by P, supersampled ss x ss."
    H, W = hw
    yy, xx = np.mgrid[0:H * ss, 0:W * ss]
    pts = np.stack([(xx.ravel() + 0.5) / ss - 0.5, (yy.ravel() + 0.5) / ss - 0.5], 1)
    tx, ty = transform_points(invert_matrix(P), pts).T + 0.5
    inside = (tx >= box[0]) & (tx < box[2]) & (ty >= box[1]) & (ty < box[3])
    return inside.reshape(H, ss, W, ss).mean((1, 3)).astype(np.float32)


# -- coordinates ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('align_corners', [False, True])
def test_theta_pixel_round_trip(align_corners):
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


def test_known_shift_rotation_on_rectangle_mask():
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


def test_apply_affine_inverse_round_trip():
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


def test_corner_error_zero_for_true_alignment():
    P, R = pose(2.0, 1.01, (10, 5), (540, 960)), pose(-1.0, 0.99, (-3, 4), (540, 960))
    corners = [[100, 80], [860, 80], [860, 460], [100, 460]]
    matrix = P @ invert_matrix(R)                  # aligned (= reference photo) px -> this photo px
    assert corner_error(invert_matrix(matrix), P, R, corners) < 1e-9
    assert corner_error(np.eye(3), P, R, corners) > 5


# -- masks ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def small_cfg():
    return synthetic.PanelConfig(size=(270, 480), crack_length_px=(10.0, 30.0), crack_width_px=(1.0, 2.0))


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


def test_as_image_rejects_bad_input():
    with pytest.raises(ValueError, match='C = 1 or 3'): as_image(torch.rand(4, 20, 20))
    with pytest.raises(TypeError, match='float values'): as_image(torch.zeros(3, 20, 20, dtype=torch.int32))
    with pytest.raises(ValueError, match='NaN'): as_image(torch.full((3, 20, 20), float('nan')))
    assert as_image(np.zeros((20, 30, 3), np.uint8)).shape == (3, 20, 30)


# -- SAM --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_sam_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('sam') / 'tiny_sam.pth'
    torch.save(build_sam(TINY_SAM).state_dict(), path)
    return path


def test_tiny_random_sam_path_runs(tiny_sam_file):
    sd = torch.load(tiny_sam_file, weights_only=True)
    assert sam_config_from_state_dict(sd) == TINY_SAM
    img = torch.rand(3, 90, 160)
    for kw in [dict(mode='box'), dict(mode='box', box=[10, 10, 150, 80]),
               dict(mode='auto', amg_kwargs=dict(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0))]:
        m = sam_mask(img, tiny_sam_file, **kw)
        assert m.shape == (90, 160) and m.dtype == np.bool_
    sam = load_sam(tiny_sam_file)                                     # an already loaded model works too
    assert sam_mask(img, sam).shape == (90, 160)
    al = Aligner(mask_method='sam', sam=sam)                          # the aligner's SAM path: mask at working size
    m = al.mask_of(img)
    assert m.shape == (90, 160) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1
    with pytest.raises(ValueError, match="mode must be 'box' or 'auto'"): sam_mask(img, sam, mode='points')


def test_sam_checkpoint_errors(tmp_path, tiny_sam_file):
    missing = tmp_path / 'sam_vit_h_4b8939.pth'
    with pytest.raises(FileNotFoundError) as e: load_sam(missing)
    msg = str(e.value)
    assert str(missing) in msg and 'Model Checkpoints' in msg and 'sam_vit_b_01ec64.pth' in msg and 'segment-anything' in msg
    with pytest.raises(FileNotFoundError, match='Model Checkpoints'): sam_mask(torch.rand(3, 32, 32), missing)
    other = tmp_path / 'resnet.pth'; torch.save({'conv1.weight': torch.zeros(2, 3, 3, 3)}, other)
    with pytest.raises(ValueError, match='does not look like a Segment Anything checkpoint') as e: load_sam(other)
    assert str(other) in str(e.value) and 'Model Checkpoints' in str(e.value)
    junk = tmp_path / 'junk.pth'; junk.write_bytes(b'not a checkpoint at all')
    with pytest.raises(ValueError, match='not a readable PyTorch weights file') as e: load_sam(junk)
    assert 'Model Checkpoints' in str(e.value)
    notdict = tmp_path / 'list.pth'; torch.save([torch.zeros(1)], notdict)
    with pytest.raises(ValueError, match='state dict of tensors'): load_sam(notdict)
    with pytest.raises(ValueError, match='does not fit'): load_sam(tiny_sam_file, 'vit_b')
    with pytest.raises(ValueError, match='model_type must be'): load_sam(tiny_sam_file, 'vit_x')


# -- STN and direct optimisation --------------------------------------------------------------------------------
def test_stn_identity_at_init():
    net = STN((72, 128))
    x = torch.rand(3, 1, 72, 128)
    with torch.no_grad():
        theta = net(x)
        assert torch.equal(theta, torch.tensor(IDENTITY_THETA).view(1, 2, 3).expand(3, -1, -1))
        torch.testing.assert_close(net.predict_theta(x, 2), theta)
        torch.testing.assert_close(warp(x, theta), x, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r'\(B, 1, 72, 128\)'): net(torch.rand(1, 1, 64, 64))


def test_direct_optimisation_recovers_known_affine():
    hw = (72, 128)
    P = pose(2.0, 1.01, (1.7, -1.2), hw)
    rect, moved = render_rect(np.eye(3), hw), render_rect(P, hw)
    est = direct_align(moved, rect)                # sample `moved` to match the template: template -> image = P
    corners = [[24, 16], [104, 16], [104, 56], [24, 56]]
    err = np.hypot(*(transform_points(theta_to_pixel_matrix(est, hw, hw), corners) - transform_points(P, corners)).T)
    assert err.max() < 0.1, err
    with pytest.raises(ValueError, match='same size'): direct_align(rect, rect[:10])


# -- the Aligner ------------------------------------------------------------------------------------------------
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
