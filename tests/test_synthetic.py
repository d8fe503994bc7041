"""Tests of the synthetic stamped-panel renderer (stampdefect.synthetic, nbs/01_synthetic.ipynb)."""
import json, math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.measure import find_contours
from skimage.morphology import skeletonize

import stampdefect.synthetic as syn
from stampdefect.synthetic import (PanelConfig, SAMPLE_CONFIG, SAMPLE_COUNTS, apply_affine, image_seed, invert_affine,
                                   make_panel_dataset, make_sample_data, panel_geometry, pose_matrix, render_panel,
                                   template_corners, template_mask)

ROOT = Path(__file__).resolve().parents[1]
SMALL = PanelConfig(size=(540, 960), crack_length_px=(12.0, 120.0), crack_width_px=(1.0, 2.5))
TINY = PanelConfig(size=(216, 384), crack_length_px=(8.0, 40.0), crack_width_px=(1.0, 2.0))


def gray(img): return img.astype(np.float64).mean(-1)


# ---------------------------------------------------------------- determinism
def test_same_seed_same_bytes_different_seed_differs():
    a, b = render_panel(SMALL, 11, True), render_panel(SMALL, 11, True)
    assert a['image'].tobytes() == b['image'].tobytes() and a['mask'].tobytes() == b['mask'].tobytes()
    assert a['pose'] == b['pose'] and a['cracks'] == b['cracks'] and a['lookalikes'] == b['lookalikes']
    c = render_panel(SMALL, 12, True)
    assert a['image'].tobytes() != c['image'].tobytes() and a['mask'].tobytes() != c['mask'].tobytes()
    assert a['pose'] != c['pose']
    assert a['image'].shape == (540, 960, 3) and a['image'].dtype == np.uint8


def test_channels_are_tinted_grey():
    img = render_panel(SMALL, 3)['image'].astype(int)
    on = img[..., 0] > 100
    assert np.all(img[..., 0] >= img[..., 1]) and np.all(img[..., 1] >= img[..., 2])      # warm tint, no colour
    ratio = img[..., 2][on].mean() / img[..., 0][on].mean()
    assert abs(ratio - SMALL.tint[2] / SMALL.tint[0]) < 0.01


# ---------------------------------------------------------------- masks
def test_masks_binary_empty_for_good_nonempty_for_defective_and_on_the_panel():
    for s in range(4):
        g, d = render_panel(SMALL, s, False), render_panel(SMALL, s, True)
        assert g['mask'].dtype == np.uint8 and g['mask'].shape == (540, 960)
        assert not g['mask'].any() and g['cracks'] == []
        assert set(np.unique(d['mask'])) == {0, 255}
        assert SMALL.n_cracks[0] <= len(d['cracks']) <= SMALL.n_cracks[1]
        assert (d['panel_mask'][d['mask'] > 0] == 255).all()                     # cracks lie on the sheet
        for c in d['cracks']:                                                    # each bbox is tight on mask pixels
            x0, y0, x1, y1 = c['bbox']
            box = d['mask'][y0:y1 + 1, x0:x1 + 1] > 0
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()


def test_crack_pixels_are_darker():
    for s in range(3):
        d, g = render_panel(SMALL, s, True), render_panel(SMALL, s, False)    # same seed: same photo without cracks
        m = d['mask'] > 0
        dg, gg = gray(d['image']), gray(g['image'])
        assert dg[m].mean() < 0.8 * gg[m].mean()
        assert (dg[m] < gg[m]).mean() > 0.95
        lab, n = ndimage.label(m, np.ones((3, 3)))
        for k in range(1, n + 1):                                              # and darker than their surroundings
            comp = lab == k
            ring = ndimage.binary_dilation(comp, iterations=6) & ~ndimage.binary_dilation(comp, iterations=3) & (d['panel_mask'] > 0)
            assert dg[comp].mean() < dg[ring].mean(), (s, k)


def test_full_resolution_crack_sizes():
    cfg = replace(PanelConfig(), n_cracks=(3, 3), lookalike_prob=0.0)            # the paper's 3840x2160
    d = render_panel(cfg, 0, True)
    assert d['image'].shape == (2160, 3840, 3)
    wmin, wmax = cfg.crack_width_px
    lo, hi = cfg.crack_length_px
    boxes = [c['bbox'] for c in d['cracks']]
    for i, c in enumerate(d['cracks']):
        assert lo - 1e-6 <= c['length_px'] <= hi + 1e-6 and wmin <= c['width_px'] <= wmax
        x0, y0, x1, y1 = c['bbox']
        assert max(x1 - x0, y1 - y0) + 1 <= 1.2 * c['length_px'] + wmax + 2
        if any(not (b[2] < x0 or b[0] > x1 or b[3] < y0 or b[1] > y1) for j, b in enumerate(boxes) if j != i):
            continue                                                             # overlapping cracks: skip the measurement
        m = d['mask'][y0:y1 + 1, x0:x1 + 1] > 0
        skel = skeletonize(m).sum()
        assert 0.5 * c['total_length_px'] <= skel <= 1.1 * c['total_length_px'] + wmax
        assert 0.8 * wmin <= m.sum() / skel <= wmax                           # mean width
        assert 2 * ndimage.distance_transform_edt(np.pad(m, 1)).max() <= c['width_px'] + 2


# ---------------------------------------------------------------- pose
def test_identity_pose_renders_the_template():
    r = render_panel(SMALL, 5, pose=dict(tx=0, ty=0, angle_deg=0, scale=1))
    np.testing.assert_array_equal(r['panel_mask'], template_mask(SMALL))
    np.testing.assert_allclose(r['pose']['matrix'], [[1, 0, 0], [0, 1, 0]], atol=1e-12)


def _fit_line(p):
    "Total least squares line through points p (N, 2): (point, unit direction)."
    c = p.mean(0)
    _, _, vt = np.linalg.svd(p - c)
    return c, vt[0]


def _intersect(l1, l2):
    (p, u), (q, v) = l1, l2
    t = np.linalg.solve(np.stack([u, -v], 1), q - p)
    return p + t[0] * u


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_pose_matrix_maps_template_corners_onto_the_photo(seed):
    "Fit the four edges of the panel in the photo itself (subpixel contour), intersect them, compare with M @ corners."
    r = render_panel(SMALL, seed, True)
    M = np.array(r['pose']['matrix'])
    g = gray(r['image'])
    near_edge = ndimage.binary_dilation(r['panel_mask'] > 0, iterations=3) & ~ndimage.binary_erosion(r['panel_mask'] > 0, iterations=3)
    inner, outer = ndimage.binary_erosion(r['panel_mask'] > 0, iterations=2), ~ndimage.binary_dilation(r['panel_mask'] > 0, iterations=2)
    panel_lo, bg_hi = np.percentile(g[inner & near_edge], 0.5), np.percentile(g[outer & near_edge], 99.5)
    assert panel_lo > bg_hi + 20                                                # the sheet stands out from the background
    contour = max(find_contours(g, (panel_lo + bg_hi) / 2), key=len)[:, ::-1]  # (x, y) of the outer boundary
    cx, cy, a, b, S = panel_geometry(SMALL)
    tc = apply_affine(invert_affine(M), contour)                                # only used to say which edge a point is on
    straight = SMALL.corner_radius * S + 10
    sides = [(np.abs(tc[:, 1] - (cy - b)) < 3) & (np.abs(tc[:, 0] - cx) < a - straight),
             (np.abs(tc[:, 0] - (cx + a)) < 3) & (np.abs(tc[:, 1] - cy) < b - straight),
             (np.abs(tc[:, 1] - (cy + b)) < 3) & (np.abs(tc[:, 0] - cx) < a - straight),
             (np.abs(tc[:, 0] - (cx - a)) < 3) & (np.abs(tc[:, 1] - cy) < b - straight)]
    assert all(s.sum() > 100 for s in sides)
    lines = [_fit_line(contour[s]) for s in sides]
    found = np.array([_intersect(lines[3], lines[0]), _intersect(lines[0], lines[1]),
                      _intersect(lines[1], lines[2]), _intersect(lines[2], lines[3])])   # TL, TR, BR, BL
    expected = apply_affine(M, template_corners(SMALL))
    assert np.abs(found - expected).max() < 1.0, (found, expected)


def test_pose_moments_follow_the_matrix():
    def moments(m):
        ys, xs = np.nonzero(m)
        x, y = xs.mean(), ys.mean()
        mu20, mu02, mu11 = ((xs - x) ** 2).mean(), ((ys - y) ** 2).mean(), ((xs - x) * (ys - y)).mean()
        return len(xs), np.array([x, y]), 0.5 * math.degrees(math.atan2(2 * mu11, mu20 - mu02))
    n_t, c_t, th_t = moments(template_mask(SMALL) > 0)
    for s in range(4):
        r = render_panel(SMALL, s, True)
        n_i, c_i, th_i = moments(r['panel_mask'] > 0)
        M = np.array(r['pose']['matrix'])
        np.testing.assert_allclose(c_i, apply_affine(M, [c_t])[0], atol=0.3)
        assert abs(th_i - (th_t - r['pose']['angle_deg'])) < 0.05                # counter-clockwise on screen
        assert abs(n_i / n_t - r['pose']['scale'] ** 2) < 0.005
        np.testing.assert_allclose(M, pose_matrix(*(r['pose'][k] for k in ('tx', 'ty', 'angle_deg', 'scale')), SMALL.size))
        assert abs(r['pose']['angle_deg']) <= SMALL.max_angle_deg and SMALL.scale_range[0] <= r['pose']['scale'] <= SMALL.scale_range[1]


def test_cracks_sit_on_bends_whatever_the_pose():
    "Crack sites, mapped back to the template, lie where the height field curves (the bend sites)."
    B = syn.panel_template(SMALL)['bend']
    for s in range(4):
        r = render_panel(SMALL, s, True)
        M = np.array(r['pose']['matrix'])
        for c in r['cracks']:
            t = apply_affine(invert_affine(M), [c['site_image']])[0]
            np.testing.assert_allclose(t, c['site_template'], atol=1e-6)
            assert np.hypot(*(B['sites'] - t).T).min() < 2 * B['step']


# ---------------------------------------------------------------- look-alikes
def test_lookalikes_are_not_in_the_mask():
    on, off = replace(SMALL, lookalike_prob=1.0, max_lookalikes=3), replace(SMALL, lookalike_prob=0.0)
    kinds = set()
    for s in range(5):
        a, b = render_panel(on, s, True), render_panel(off, s, True)
        assert a['lookalikes'] and not b['lookalikes']
        np.testing.assert_array_equal(a['mask'], b['mask'])                      # same cracks, look-alikes not masked
        assert a['cracks'] == b['cracks']
        for l in a['lookalikes']:
            kinds.add(l['kind'])
            x0, y0, x1, y1 = l['bbox']
            assert x0 <= l['center'][0] <= x1 and y0 <= l['center'][1] <= y1
            diff = np.abs(gray(a['image'])[y0:y1 + 1, x0:x1 + 1] - gray(b['image'])[y0:y1 + 1, x0:x1 + 1])
            assert diff.max() > 5                                                # it is really drawn there
        g = render_panel(on, s, False)
        assert g['lookalikes'] and not g['mask'].any()
    assert kinds == set(on.lookalike_kinds)


# ---------------------------------------------------------------- bad input
def test_bad_inputs():
    with pytest.raises(ValueError, match='size'): PanelConfig(size=(32, 32))
    with pytest.raises(ValueError, match='crack_length_px'): PanelConfig(crack_length_px=(400, 20))
    with pytest.raises(ValueError, match='n_cracks'): PanelConfig(n_cracks=(0, 2))
    with pytest.raises(ValueError, match='leave the'): PanelConfig(max_shift=0.2)
    with pytest.raises(ValueError, match='lookalike_prob'): PanelConfig(lookalike_prob=1.5)
    with pytest.raises(ValueError, match='seed'): render_panel(SMALL, -3)
    with pytest.raises(ValueError, match='seed'): render_panel(SMALL, 1.5)
    with pytest.raises(TypeError, match='PanelConfig'): render_panel({'size': (540, 960)}, 1)
    with pytest.raises(ValueError, match='unknown keys'): render_panel(SMALL, 1, pose={'shift': 3})
    with pytest.raises(ValueError, match='n_train'): make_panel_dataset('/nonexistent/x', n_train=-1, config=TINY)
    with pytest.raises(ValueError, match='points'): apply_affine(np.eye(2, 3), [1, 2, 3])


# ---------------------------------------------------------------- datasets
def _files(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob('*') if p.is_file())


def test_dataset_layout_and_metadata(tmp_path):
    meta = make_panel_dataset(tmp_path, n_train=3, n_test_good=2, n_test_defect=2, config=TINY, seed=7)
    assert _files(tmp_path) == ['ground_truth/crack/000_mask.png', 'ground_truth/crack/001_mask.png', 'metadata.json',
                                'test/crack/000.png', 'test/crack/001.png', 'test/good/000.png', 'test/good/001.png',
                                'train/good/000.png', 'train/good/001.png', 'train/good/002.png']
    on_disk = json.loads((tmp_path / 'metadata.json').read_text())
    assert on_disk == meta and on_disk['format'] == syn.FORMAT and on_disk['seed'] == 7
    assert PanelConfig.from_dict(on_disk['config']) == TINY
    assert on_disk['counts'] == dict(train_good=3, test_good=2, test_crack=2)
    seeds = [e['seed'] for e in on_disk['images'].values()]
    assert len(set(seeds)) == len(seeds)                                         # every image its own seed
    for rel, e in on_disk['images'].items():
        img = np.asarray(Image.open(tmp_path / rel))
        assert img.shape == (216, 384, 3) and img.dtype == np.uint8
        assert e['seed'] == image_seed(7, e['split'], e['label'], int(rel[-7:-4]))
        assert set(e) >= {'split', 'label', 'defective', 'seed', 'mask', 'pose', 'cracks', 'lookalikes', 'light'}
        assert len(e['pose']['matrix']) == 2 and len(e['pose']['matrix'][0]) == 3
        if e['label'] == 'crack':
            m = np.asarray(Image.open(tmp_path / e['mask']))
            assert m.shape == (216, 384) and set(np.unique(m)) == {0, 255} and e['cracks'] and e['defective']
        else:
            assert e['mask'] is None and e['cracks'] == [] and not e['defective']
    e = on_disk['images']['test/crack/001.png']                                  # the metadata re-renders the image
    r = render_panel(PanelConfig.from_dict(on_disk['config']), e['seed'], e['defective'])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'test/crack/001.png')), r['image'])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / e['mask'])), r['mask'])
    assert r['cracks'] == e['cracks']


def test_dataset_resumes_and_writes_atomically(tmp_path, monkeypatch):
    kw = dict(n_train=3, n_test_good=1, n_test_defect=2, config=TINY, seed=1)
    reference = make_panel_dataset(tmp_path / 'ref', **kw)

    # 1. interrupted in the middle of writing a PNG: nothing half-written under a final name, no temporary left
    real_save, calls = Image.Image.save, {'n': 0}
    def flaky_save(self, fp, *a, **k):
        calls['n'] += 1
        if calls['n'] == 4:
            Path(fp).write_bytes(b'\x89PNG partial')
            raise KeyboardInterrupt('simulated crash')
        return real_save(self, fp, *a, **k)
    monkeypatch.setattr(Image.Image, 'save', flaky_save)
    with pytest.raises(KeyboardInterrupt):
        make_panel_dataset(tmp_path / 'run', **kw)
    monkeypatch.setattr(Image.Image, 'save', real_save)
    run = tmp_path / 'run'
    assert not [f for f in run.rglob('*') if f.name.endswith('.tmp')]
    for f in run.rglob('*.png'): Image.open(f).load()                              # every PNG present is complete
    partial = json.loads((run / 'metadata.json').read_text())
    assert 0 < len(partial['images']) < 6 and all((run / k).exists() for k in partial['images'])

    # 2. resuming renders only what is missing and ends identical to an uninterrupted run
    rendered = []
    real_render = syn.render_panel
    monkeypatch.setattr(syn, 'render_panel', lambda *a, **k: rendered.append(a[1]) or real_render(*a, **k))
    meta = make_panel_dataset(run, **kw)
    assert 0 < len(rendered) < 6
    assert meta == reference
    for rel in reference['images']:
        np.testing.assert_array_equal(np.asarray(Image.open(run / rel)), np.asarray(Image.open(tmp_path / 'ref' / rel)))

    # 3. a complete dataset is not rendered again
    rendered.clear()
    assert make_panel_dataset(run, **kw) == reference and rendered == []

    # 4. a smaller run removes our own extra files; a foreign PNG is an error; another config re-renders
    make_panel_dataset(run, **dict(kw, n_train=1, n_test_defect=1))
    assert _files(run) == ['ground_truth/crack/000_mask.png', 'metadata.json', 'test/crack/000.png',
                           'test/good/000.png', 'train/good/000.png']
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(run / 'train/good/foreign.png')
    with pytest.raises(ValueError, match='foreign.png'):
        make_panel_dataset(run, **kw)
    (run / 'train/good/foreign.png').unlink()
    rendered.clear()
    make_panel_dataset(run, **dict(kw, n_train=1, n_test_defect=1, config=replace(TINY, drift=0.05)))
    assert len(rendered) == 3
    (run / 'metadata.json').write_text('{broken')
    with pytest.raises(ValueError, match='not valid JSON'):
        make_panel_dataset(run, **kw)


# ---------------------------------------------------------------- the committed sample set
SAMPLES = ROOT / 'data_samples'


def _close(a, b, rel=1e-9):
    "Equal structure, equal strings/ints, floats equal to ~1e-9 (tolerates last-bit differences across CPUs)."
    if isinstance(a, dict): return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list): return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)): return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)
    return a == b


@pytest.mark.skipif(not (SAMPLES / 'metadata.json').exists(), reason='data_samples/ not generated')
def test_sample_data_regenerates_identically(tmp_path):
    meta = make_sample_data(tmp_path)
    committed = json.loads((SAMPLES / 'metadata.json').read_text())
    assert committed['config'] == json.loads(json.dumps(SAMPLE_CONFIG.to_dict()))
    assert committed['counts'] == dict(train_good=SAMPLE_COUNTS['n_train'], test_good=SAMPLE_COUNTS['n_test_good'],
                                       test_crack=SAMPLE_COUNTS['n_test_defect'])
    assert list(meta['images']) == list(committed['images'])
    for rel, e in committed['images'].items():
        new = meta['images'][rel]
        assert {k: new[k] for k in ('split', 'label', 'defective', 'seed', 'mask')} == {k: e[k] for k in ('split', 'label', 'defective', 'seed', 'mask')}
        assert _close(new, e), rel
        a, b = np.asarray(Image.open(tmp_path / rel)), np.asarray(Image.open(SAMPLES / rel))
        # Identical on the machine that made them. Another CPU's libm/SIMD may round a float differently in the
        # last bit, which can flip an 8-bit value by one here and there; anything more is a real difference.
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-4, rel
        if e['mask']:
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / e['mask'])), np.asarray(Image.open(SAMPLES / e['mask'])))
    assert sum(f.stat().st_size for f in SAMPLES.rglob('*') if f.is_file()) < 15e6
