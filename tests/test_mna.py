"""MNA prior and the latent-prior detectors: the no-leak property, U2-Net shapes, positional encoding, NLL,
resampling, crack maps, the AR prior's causality, save/load, bad inputs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stampdefect.tiled import Tiled, TileConfig
from stampdefect.core import Detector, get_detector
from stampdefect.models.mna import (ARPrior, ARPriorConfig, MNA, MNAConfig, MNADetector, MNAPrior, MNAPriorConfig, RSU,
                                    code_nll, crack_map, latent_coords, mna_shifts, replacement_codes)

TINY = dict(n_codes=16, code_dim=8, u2net='small', width=0.25, side_channels=8, head_channels=16)


def _prior(**kw):
    torch.manual_seed(0)
    return MNAPrior(MNAPriorConfig(**{**TINY, 'blocks': ('5', '4', '4F'), **kw})).eval()


def _perturb(z, cells, seed=1):
    z2 = z.clone()
    g = torch.Generator().manual_seed(seed)
    for i, j in cells: z2[:, :, i, j] += 10 * torch.randn(z.shape[0], z.shape[1], generator=g)
    return z2


@pytest.mark.parametrize('radius, hw, p', [(1, (10, 10), (4, 6)), (1, (9, 11), (0, 10)), (2, (10, 10), (6, 3))])
def test_no_leak_perturbation(radius, hw, p):
    "Changing z_q at p and anywhere in its r-neighbourhood leaves the logits at p unchanged; changing far away does not."
    prior = _prior(mask_radius=radius)
    h, w = hw
    z = torch.randn(2, 8, h, w)
    with torch.no_grad():
        base = prior(z)
        hood = [(i, j) for i in range(max(p[0] - radius, 0), min(p[0] + radius + 1, h))
                for j in range(max(p[1] - radius, 0), min(p[1] + radius + 1, w))]
        near = prior(_perturb(z, hood))
        torch.testing.assert_close(near[:, :, p[0], p[1]], base[:, :, p[0], p[1]], rtol=0, atol=1e-6)
        assert (near - base).abs().amax() > 1e-4                      # the perturbation does reach other positions
        for far in [(p[0], (p[1] + radius + 1) % w if p[1] + radius + 1 < w else p[1] - radius - 1),
                    ((p[0] + radius + 1) if p[0] + radius + 1 < h else p[0] - radius - 1, p[1]), (h - 1 - p[0] // 2, 0)]:
            if max(abs(far[0] - p[0]), abs(far[1] - p[1])) <= radius: continue
            moved = prior(_perturb(z, [far]))
            assert (moved[:, :, p[0], p[1]] - base[:, :, p[0], p[1]]).abs().amax() > 1e-5, far


def test_no_leak_gradient_exact_hole():
    prior = _prior()
    z = torch.randn(1, 8, 11, 14, requires_grad=True)
    out = prior(z)
    for p in [(0, 0), (5, 7), (10, 13)]:
        g, = torch.autograd.grad(out[0, :, p[0], p[1]].sum(), z, retain_graph=True)
        dep = g.abs().sum(1)[0] > 0
        hole = torch.zeros_like(dep)
        hole[max(p[0] - 1, 0):p[0] + 2, max(p[1] - 1, 0):p[1] + 2] = True
        assert not dep[hole].any()                 # blind to the 3x3 square
        assert dep[~hole].all()                    # sees every other cell


def test_unmasked_prior_leaks():
    "The test above can fail: the plain U2-Net (no MNA) reads the code at p."
    prior = _prior(masked=False)
    z = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        assert (prior(_perturb(z, [(4, 4)]))[0, :, 4, 4] - prior(z)[0, :, 4, 4]).abs().amax() > 1e-4


@pytest.mark.parametrize('height, dilated', [(7, False), (6, False), (4, False), (4, True), (2, False)])
@pytest.mark.parametrize('causal', [False, True])
def test_rsu_shapes(height, dilated, causal):
    blk = RSU(height, 5, 4, 6, dilated, causal)
    for hw in [(16, 16), (13, 9), (3, 5)]:
        assert blk(torch.randn(2, 5, *hw)).shape == (2, 6, *hw)


def test_mna_module_shift():
    mna = MNA(3, shifts=(2, 4)).eval()
    x = torch.randn(1, 3, 10, 6)
    x2 = x.clone(); x2[..., 5, :] += 1
    changed = ((mna(x2) - mna(x)).abs().amax(dim=(0, 1, 3)) > 1e-6).nonzero().flatten()
    assert changed.min() == 7 and mna(x).shape == x.shape
    assert mna_shifts((1, 3), 1) == (2, 4) and mna_shifts((1, 3), 2) == (1, 2) and mna_shifts((1, 3), 8) == (1,)


@pytest.mark.parametrize('hw', [32, 64])
def test_u2netp_forward_shapes(hw):
    "The small variant at U2NETP's real widths (mid 16, out 64), all six stages, on the paper's latent sizes."
    torch.manual_seed(0)
    prior = MNAPrior(MNAPriorConfig(n_codes=32, code_dim=16, u2net='small', head_channels=32)).eval()
    coords = latent_coords(np.array([[0, 0]]), (4 * hw, 4 * hw), (540, 960), (hw, hw))
    with torch.no_grad():
        out = prior(torch.randn(1, 16, hw, hw), coords)
    assert out.shape == (1, 32, hw, hw) and torch.isfinite(out).all()


def test_full_variant_widths():
    prior = MNAPrior(MNAPriorConfig(n_codes=8, code_dim=4, blocks=('4', '4F'), width=0.125)).eval()
    assert prior(torch.randn(1, 4, 8, 8)).shape == (1, 8, 8, 8)
    assert prior.body.encoders[1].conv_in.conv.conv.out_channels == 128 // 8      # U2NET's stage-2 out = 128


def test_positional_encoding_changes_outputs():
    prior = _prior()
    z = torch.randn(2, 8, 8, 8)
    a = latent_coords(np.array([[0, 0], [0, 0]]), (32, 32), (540, 960), (8, 8))
    b = latent_coords(np.array([[400, 700], [400, 700]]), (32, 32), (540, 960), (8, 8))
    with torch.no_grad():
        assert (prior(z, a) - prior(z, b)).abs().amax() > 1e-4
        nopos = _prior(positional_encoding=False)
        torch.testing.assert_close(nopos(z, a), nopos(z, b))
    assert a.shape == (2, 2, 8, 8) and float(b.max()) <= 1.0


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


def test_ar_prior_causal():
    "Logits at raster position p depend on codes before p and on no code at or after p."
    torch.manual_seed(0)
    for att in (False, True):
        prior = ARPrior(ARPriorConfig(n_codes=6, channels=8, n_blocks=2, attention=att)).eval()
        h, w, p = 5, 6, 14
        codes = torch.randint(6, (1, h, w), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            base = prior(codes)[0, :, p // w, p % w]
            dep = []
            for q in range(h * w):
                c2 = codes.clone(); c2.view(-1)[q] = (c2.view(-1)[q] + 1) % 6
                if (prior(c2)[0, :, p // w, p % w] - base).abs().max() > 1e-6: dep.append(q)
        assert dep == list(range(p))


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
    with pytest.raises(ValueError, match="'full' or 'small'"): MNAPriorConfig(u2net='huge')
    with pytest.raises(ValueError, match='RSU height'): MNAPriorConfig(blocks=('1',))
    with pytest.raises(ValueError, match='odd'): ARPriorConfig(kernel_size=4)
    prior = _prior()
    with pytest.raises(ValueError, match='z_q must be'): prior(torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match='coords must be'): prior(torch.randn(1, 8, 8, 8), torch.zeros(1, 2, 4, 4))
    with pytest.raises(TypeError, match='int64'): ARPrior(ARPriorConfig(n_codes=4, channels=4)).forward(torch.zeros(1, 3, 3))


def test_fit_time_budget_and_resume(tmp_path):
    "--max-minutes: training stops on the budget with a checkpoint; the same fit again resumes from it."
    det = _tiny_detector('mna', vqvae_steps=40, prior_steps=2).fit(_panels(), max_minutes=0.02 / 60, ckpt_dir=tmp_path)
    h = det.history['vqvae']
    assert h.stopped_on_budget and 0 < len(h) < 40 and det.fitted
    again = _tiny_detector('mna', vqvae_steps=40, prior_steps=2).fit(_panels(), ckpt_dir=tmp_path)
    assert again.history['vqvae'].resumed_from == len(h) and not again.history['vqvae'].stopped_on_budget
    with pytest.raises(ValueError, match='max_minutes'): _tiny_detector('mna').fit(_panels(), max_minutes=0)
