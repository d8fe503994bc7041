"""The latent-prior detectors (stampdefect.models.mna, stampdefect.models.vqvae_ar): NLL, resampling, crack maps,
fit/predict, tiling, save/load, time budget and resume, bad inputs. Their blocks are tested in test_blocks.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stampdefect.tiled import Tiled, TileConfig
from stampdefect.core import Detector, get_detector
from stampdefect.models.mna import MNAConfig, MNADetector, code_nll, crack_map, replacement_codes


def test_code_nll_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, codes = torch.randn(3, 11, 4, 5, generator=g), torch.randint(11, (3, 4, 5), generator=g)
    torch.testing.assert_close(code_nll(logits, codes), F.cross_entropy(logits, codes, reduction='none'))
    with pytest.raises(ValueError, match=r'\[0, 11\)'): code_nll(logits, codes + 11)
    with pytest.raises(ValueError, match='must match'): code_nll(logits, codes[:, :2])
    with pytest.raises(TypeError, match='int64'): code_nll(logits, codes.float())


def test_resampling_modes():
    book = torch.tensor([[0., 0.], [1., 0.], [5., 5.], [0., 2.]])
    codes = torch.tensor([[[0, 1], [2, 3]]])
    logits = torch.zeros(1, 4, 2, 2); logits[0, 3] = 1.0
    assert replacement_codes(codes, logits, book, 'probable').tolist() == [[[3, 3], [3, 3]]]
    # farthest vectors: from 0 -> 2, from 1 -> 2, from 2 -> 0, from 3 -> 2
    assert replacement_codes(codes, logits, book, 'dissimilar').tolist() == [[[2, 2], [0, 2]]]
    with pytest.raises(ValueError, match='resample mode'): replacement_codes(codes, logits, book, 'nearest')


def test_crack_map_zero_without_change():
    x = torch.rand(2, 3, 16, 16)
    assert crack_map(x, x).abs().max() == 0
    y = x.clone(); y[0, :, 8, 8] += 0.5
    m = crack_map(x, y)
    assert m[1].abs().max() == 0 and m[0, 8, 8] > 0 and m[0, 8, 8] == m[0].max()


def _tiny_detector(name, **kw):
    prior = dict(u2net='small', width=0.25, blocks=('4', '4F'), side_channels=8, head_channels=16) if name == 'mna' \
        else dict(channels=8, n_blocks=1)
    cfg = dict(patch_size=16, channels=1, vqvae=dict(hidden_channels=8, residual_channels=4, n_residual_blocks=1,
               codebook_size=16, code_dim=4, perceptual_weight=0.0), prior=prior, vqvae_steps=3, prior_steps=3,
               vqvae_batch=4, prior_batch=4, calib_patches=8, device='cpu')
    return get_detector(name, {**cfg, **kw})


def _panels(n=2, hw=(24, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, hw[0]), torch.linspace(0, 1, hw[1]), indexing='ij')
    return torch.stack([(0.5 + 0.3 * torch.sin(9 * xx + 5 * yy + k) + 0.05 * torch.rand(hw, generator=g)).clamp(0, 1)[None]
                        for k in range(n)])


@pytest.fixture(scope='module', params=['mna', 'vqvae_ar'])
def fitted(request):
    return _tiny_detector(request.param).fit(_panels())


def test_detector_predict_and_round_trip(fitted, tmp_path):
    assert fitted.nll_threshold is not None
    patches = _panels(3, (16, 16), seed=5)
    pred = fitted.predict(patches)
    assert pred.maps.shape == (3, 16, 16) and pred.scores.shape == (3,) and pred.extras['nll_map'].shape == (3, 16, 16)
    cap = fitted.capabilities
    assert (cap.input_size, cap.uses_positions, cap.fits_on_panels, cap.trained) == (16, True, True, True)
    tiled = Tiled(fitted, TileConfig(16, 8))
    tiled.calibrate(_panels(2, (24, 40), seed=7), batch_size=1)
    assert tiled.pixel_threshold > 0
    panel = tiled.predict(_panels(1, (30, 41), seed=6))           # tiled and stitched
    assert panel.maps.shape == (1, 30, 41) and np.isfinite(panel.maps).all() and panel.extras['nll_map'].shape == (1, 30, 41)
    f = fitted.save(tmp_path / 'm.sdm')
    back = Detector.load(f)
    assert type(back) is type(fitted) and back.nll_threshold == fitted.nll_threshold
    again = back.predict(patches)
    np.testing.assert_array_equal(again.maps, pred.maps)
    np.testing.assert_array_equal(again.scores, pred.scores)


def test_nothing_resampled_gives_zero_map(fitted):
    out = fitted.explain(_panels(2, (16, 16), seed=3), threshold=float('inf'))
    assert not out['resampled'].any() and out['map'].abs().max() == 0
    low = fitted.explain(_panels(2, (16, 16), seed=3), threshold=-1.0)        # every code flagged
    assert low['resampled'].float().mean() > 0.5


def test_detector_resample_modes(fitted):
    x = _panels(1, (16, 16), seed=4)
    e = fitted.vqvae.codebook.embed
    try:
        fitted.config.resample = 'dissimilar'
        out = fitted.explain(x, threshold=-1.0)                                  # every code flagged
        assert torch.equal(out['new_codes'], torch.cdist(e, e).argmax(1)[out['codes']])
        fitted.config.resample = 'probable'
        out = fitted.explain(x, threshold=-1.0)
        if isinstance(fitted, MNADetector):                                       # all at once: the prior's argmax
            logits = fitted._logits(out['codes'], fitted._coords(None, 1, out['codes'].shape[-2:]))
            assert torch.equal(out['new_codes'], logits.argmax(1))
        assert out['map'].abs().max() > 0
    finally:
        fitted.config.resample = 'probable'


def test_bad_inputs(fitted):
    with pytest.raises(ValueError, match='channel'): fitted.predict(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match='expected patches'): fitted.predict(torch.rand(1, 1, 12, 40))
    with pytest.raises(ValueError, match='tiling stage'): fitted.predict(torch.rand(1, 1, 24, 40))
    with pytest.raises(ValueError, match=r'\[0, 1\]'): fitted.predict(torch.full((1, 1, 16, 16), 2.0))
    with pytest.raises(ValueError, match='patches'): fitted.explain(torch.rand(1, 1, 24, 24))
    with pytest.raises(RuntimeError, match='not fitted'): _tiny_detector('mna').predict(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match='smaller than patch_size'): _tiny_detector('mna').fit(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match='channel'): _tiny_detector('mna').fit(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match='unknown config option'): get_detector('mna', bogus=1)
    with pytest.raises(ValueError, match='resample'): MNAConfig(resample='nearest')
    with pytest.raises(ValueError, match='n_codes'): MNAConfig(prior={'n_codes': 8})
    with pytest.raises(ValueError, match='unknown config option'): get_detector('mna', tile_stride=8)   # a tiling option now


def test_fit_time_budget_and_resume(tmp_path):
    "--max-minutes: training stops on the budget with a checkpoint; the same fit again resumes from it."
    det = _tiny_detector('mna', vqvae_steps=40, prior_steps=2).fit(_panels(), max_minutes=0.02 / 60, ckpt_dir=tmp_path)
    h = det.history['vqvae']
    assert h.stopped_on_budget and 0 < len(h) < 40 and det.fitted
    again = _tiny_detector('mna', vqvae_steps=40, prior_steps=2).fit(_panels(), ckpt_dir=tmp_path)
    assert again.history['vqvae'].resumed_from == len(h) and not again.history['vqvae'].stopped_on_budget
    with pytest.raises(ValueError, match='max_minutes'): _tiny_detector('mna').fit(_panels(), max_minutes=0)
