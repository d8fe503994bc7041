"""The contract every registered detector passes, on tiny data, untiled and through the tiling stage.

A new method gets all of these checks by adding its registry line (`stampdefect.core.METHODS`) and a 'tiny'
preset: fit on normal images, predict shapes and dtypes, an obvious defect scores above normal images, thresholds
calibrated from normal images only, save/load gives bit-identical predictions, bad input is refused clearly."""
import numpy as np
import pytest
import torch

from stampdefect.core import Detector, available_methods, detector_class, get_detector, CalibrationConfig
from stampdefect.tiled import Tiled, TileConfig

METHODS = available_methods()
FREQ = 0.25          # stripes of the normal texture (radians per pixel along the diagonal; a period of 18 px)


def test_every_builtin_method_is_checked():
    assert {'reference', 'patchcore', 'mna', 'vqvae_ar', 'draem', 'autoencoder'} <= set(METHODS)


def _images(n, size, channels, seed, defect=False):
    """Textured normal images (n, C, H, W) in [0, 1]: soft diagonal stripes plus a little noise, the same texture
    at every position; with `defect`, a dark bar across the middle (a fifth of the side long, 3 px wide)."""
    H, W = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing='ij')
    base = 0.5 + 0.15 * torch.sin((xx + yy) * FREQ)
    x = (base + 0.03 * torch.randn(n, channels, H, W, generator=g)).clamp(0, 1)
    if defect:
        r, c0, L = H // 2, W // 2 - max(W // 10, 2), max(W // 5, 4)
        x[:, :, r - 1:r + 2, c0:c0 + L] = 0.02
    return x


def _setup(name):
    "(fresh detector from the 'tiny' preset, its image side S, channels C)."
    det = get_detector(name, preset='tiny')
    cap = det.capabilities
    size = cap.input_size if cap.input_size is not None and cap.min_size == cap.input_size else 32
    return det, size, cap.channels


@pytest.fixture(scope='module', params=METHODS)
def fitted(request):
    det, S, C = _setup(request.param)
    det.fit(_images(8, S * 2 if det.capabilities.fits_on_panels else S, C, seed=0), batch_size=4, progress=False)
    return det, S, C


def test_predict_shapes_and_dtypes(fitted):
    det, S, C = fitted
    pred = det.predict(_images(3, S, C, seed=1))
    assert pred.scores.shape == (3,) and pred.scores.dtype == np.float32
    assert pred.maps.shape == (3, S, S) and pred.maps.dtype == np.float32
    assert np.isfinite(pred.scores).all() and np.isfinite(pred.maps).all()
    for k, v in pred.extras.items(): assert len(v) == 3, k


def test_obvious_defect_scores_higher(fitted):
    det, S, C = fitted
    normal = det.predict(_images(4, S, C, seed=2)).scores
    bad = det.predict(_images(4, S, C, seed=2, defect=True)).scores
    assert np.median(bad) > normal.max(), (det.name, normal, bad)


def test_thresholds_from_normal_images(fitted):
    det, S, C = fitted
    thr = det.calibrate(_images(8, S, C, seed=3))
    normal = det.predict(_images(8, S, C, seed=4)).scores
    assert np.isfinite(thr) and np.isfinite(det.pixel_threshold) and det.threshold == thr
    assert det.decide(normal).mean() <= 0.5                    # not degenerate: normal images are mostly passed
    assert thr > np.min(normal)                                 # ... and the threshold is not below every normal score
    assert det.calibration['n_images'] == 8 and det.calibration['rule'] == 'robust'
    bad = det.predict(_images(4, S, C, seed=4, defect=True)).scores
    assert det.decide(bad).any()
    det.calibrate(_images(8, S, C, seed=3), CalibrationConfig(rule='quantile', quantile=1.0))
    assert not det.decide(det.predict(_images(8, S, C, seed=3)).scores).any()   # the maximum rule flags none of them


def test_save_load_bit_identical(fitted, tmp_path):
    det, S, C = fitted
    det.calibrate(_images(6, S, C, seed=5))
    x = _images(2, S, C, seed=6, defect=True)
    back = Detector.load(det.save(tmp_path / f'{det.name}.sdm'))
    assert type(back).__name__ == type(det).__name__
    assert (back.threshold, back.pixel_threshold) == (det.threshold, det.pixel_threshold)
    a, b = det.predict(x), back.predict(x)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)


def test_tiled(fitted, tmp_path):
    "Through the tiling stage: fit on panels, predict panels at their size, calibrate, save and load."
    det, S, C = fitted
    cls = detector_class(det.name)
    fresh = cls(det.config)
    tiled = Tiled(fresh, TileConfig(S, S // 2, batch=4))
    panels = lambda n, seed, defect=False: _images(n, (S * 2, S * 3), C, seed, defect)
    tiled.fit(panels(3, 10), batch_size=4)
    tiled.calibrate(panels(3, 11), batch_size=1)
    pred = tiled.predict(panels(2, 12, defect=True))
    assert pred.maps.shape == (2, S * 2, S * 3) and pred.scores.shape == (2,) and np.isfinite(pred.maps).all()
    back = Detector.load(tiled.save(tmp_path / 'tiled.sdm'))
    assert isinstance(back, Tiled) and back.tiling == tiled.tiling
    np.testing.assert_array_equal(back.predict(panels(1, 13)).maps, tiled.predict(panels(1, 13)).maps)
    with pytest.raises(ValueError, match='smaller than'):
        tiled.predict(_images(1, S // 2, C, seed=14))


def test_bad_input(fitted):
    det, S, C = fitted
    other = 3 if C == 1 else 1
    with pytest.raises(ValueError, match='channel'): det.predict(_images(1, S, other, seed=7))
    nan = _images(1, S, C, seed=7); nan[0, 0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN'): det.predict(nan)
    with pytest.raises(ValueError, match='empty'): det.predict(torch.zeros(0, C, S, S))
    with pytest.raises(ValueError, match=r'\[0, 1\]'): det.predict(_images(1, S, C, seed=7) * 4)
    with pytest.raises(ValueError, match='no images'): detector_class(det.name)(det.config).fit([])
    cap = det.capabilities
    if cap.input_size is not None and cap.min_size == cap.input_size:       # fixed-size input: another size is refused
        with pytest.raises(ValueError, match='tiling stage|expected'): det.predict(_images(1, S + 8, C, seed=7))


def test_fit_options_are_declared(fitted):
    "Time budget and checkpoints exist for trained methods only; the CLI reads `capabilities.trained`, it does not probe."
    det, S, C = fitted
    import inspect
    params = inspect.signature(det.fit).parameters
    for k in ('batch_size', 'progress', 'max_minutes', 'ckpt_dir'): assert k in params, (det.name, k)
    assert isinstance(det.capabilities.trained, bool)
