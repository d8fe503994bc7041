"""The reusable blocks of the latent-prior detectors: the causal U2-Net (stampdefect.blocks.u2net), the MNA prior's
no-leak property, its positional encoding and bad inputs (stampdefect.blocks.mna), the PixelCNN prior's causality
(stampdefect.blocks.pixelcnn)."""
import numpy as np
import pytest
import torch

from stampdefect.blocks.u2net import RSU, U2NetBody, rows_changed, shift_down
from stampdefect.blocks.mna import MNA, MNAPrior, MNAPriorConfig, latent_coords, mna_shifts
from stampdefect.blocks.pixelcnn import ARPrior, ARPriorConfig

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


@pytest.mark.parametrize('widths', ['full', 'small'])
def test_u2net_body_looks_up_and_skips_hide(widths):
    "The causal body looks up only; skip modules that hide ceil(3 / 2^s) coarse rows at stage s hide 3 latent rows."
    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 9)
    body = U2NetBody(3, ('5', '4', '4F'), widths, 0.125, side_channels=8, causal=True).eval()
    assert body(x).shape == (1, 8, 12, 9) and rows_changed(body, x, 6)[0] == 6

    class Hide(torch.nn.Module):
        def __init__(self, m): super().__init__(); self.m = m
        def forward(self, t): return shift_down(t, self.m)
    calls = []
    hidden = U2NetBody(3, ('5', '4', '4F'), widths, 0.125, 8, causal=True,
                       skip=lambda s, c: calls.append((s, c)) or Hide(-(-3 // 2 ** s))).eval()
    assert rows_changed(hidden, x, 6)[0] == 9 and [s for s, _ in calls] == [0, 1, 2]
    plain = U2NetBody(3, ('5', '4', '4F'), widths, 0.125, 8, causal=False).eval()
    assert rows_changed(plain, x, 6)[0] < 6                      # the plain U2-Net reads the rows below too
    with pytest.raises(ValueError, match='widths must be one of'): U2NetBody(3, widths='huge')
    with pytest.raises(ValueError, match='1 to 6 stages'): U2NetBody(3, blocks=())


def test_bad_inputs():
    with pytest.raises(ValueError, match="'full' or 'small'"): MNAPriorConfig(u2net='huge')
    with pytest.raises(ValueError, match='RSU height'): MNAPriorConfig(blocks=('1',))
    with pytest.raises(ValueError, match='odd'): ARPriorConfig(kernel_size=4)
    prior = _prior()
    with pytest.raises(ValueError, match='z_q must be'): prior(torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match='coords must be'): prior(torch.randn(1, 8, 8, 8), torch.zeros(1, 2, 4, 4))
    with pytest.raises(TypeError, match='int64'): ARPrior(ARPriorConfig(n_codes=4, channels=4)).forward(torch.zeros(1, 3, 3))
