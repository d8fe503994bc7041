"""VQ-VAE: shapes, the EMA codebook update, dead-code restarts, straight-through gradients, the loss, save/load."""
import pytest
import torch

from stampdefect.blocks.vqvae import (EMACodebook, PerceptualLoss, VQVAE, VQVAEConfig, code_usage, fit_vqvae, load_vqvae,
                                      perplexity, save_vqvae)
from stampdefect.training import load_checkpoint

SLIM = dict(hidden_channels=16, residual_channels=8, n_residual_blocks=1, codebook_size=32, code_dim=8, perceptual_weight=0)


def texture(n=2, size=96, seed=0):
    "Smooth random grayscale images in [0, 1] (a few sinusoids), (n, 1, size, size)."
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing='ij')
    out = []
    for _ in range(n):
        f = torch.rand(4, 2, generator=g) * 12
        p = torch.rand(4, generator=g) * 6.28
        img = sum(torch.sin(f[k, 0] * 6.28 * yy + f[k, 1] * 6.28 * xx + p[k]) for k in range(4))
        out.append(((img - img.min()) / (img.max() - img.min()))[None])
    return torch.stack(out)


@pytest.mark.parametrize('downsample, grid', [(4, 64), (8, 32)])
def test_shapes_for_256_patches(downsample, grid):
    m = VQVAE(VQVAEConfig(downsample=downsample, **SLIM)).eval()
    x = torch.rand(2, 3, 256, 256)
    out = m(x)
    assert out['x_hat'].shape == x.shape and out['z_e'].shape == (2, 8, grid, grid) and out['z_q'].shape == (2, 8, grid, grid)
    assert out['codes'].shape == (2, grid, grid) and out['codes'].dtype == torch.int64
    z_e, codes = m.encode(x)
    assert torch.equal(codes, out['codes'])
    assert torch.allclose(m.decode_codes(codes), out['x_hat'], atol=1e-5)
    assert m.latent_shape(256, 256) == (grid, grid)


def _codebook(embed, decay, eps, dead_code_after=0):
    cb = EMACodebook(len(embed), len(embed[0]), decay=decay, eps=eps, dead_code_after=dead_code_after).train()
    cb.embed.copy_(torch.tensor(embed)); cb.embed_sum.copy_(cb.embed); cb.cluster_size.fill_(1.0); cb.initialised.fill_(True)
    return cb


def test_ema_update_matches_hand_computation():
    # codes (0, 0) and (4, 4); decay 0.9, eps 0.5; batch (1, 0), (0, 1), (5, 3): assignments 0, 0, 1
    cb = _codebook([[0., 0.], [4., 4.]], decay=0.9, eps=0.5)
    z = torch.tensor([[1., 0.], [0., 1.], [5., 3.]]).T.reshape(1, 2, 1, 3)
    out = cb(z)
    assert out['codes'].flatten().tolist() == [0, 0, 1]
    # commitment with the codes before the update: (1 + 1 + (1 + 1)) / (3 * 2)
    assert out['commit_loss'].item() == pytest.approx(4 / 6)
    N0, N1 = 0.9 * 1 + 0.1 * 2, 0.9 * 1 + 0.1 * 1                 # 1.1, 1.0
    m0 = [0.9 * 0 + 0.1 * 1, 0.9 * 0 + 0.1 * 1]                     # (0.1, 0.1)
    m1 = [0.9 * 4 + 0.1 * 5, 0.9 * 4 + 0.1 * 3]                     # (4.1, 3.9)
    n = N0 + N1
    S0, S1 = (N0 + 0.5) / (n + 2 * 0.5) * n, (N1 + 0.5) / (n + 2 * 0.5) * n
    assert cb.cluster_size.tolist() == pytest.approx([N0, N1])
    assert cb.embed.tolist() == [pytest.approx([m0[0] / S0, m0[1] / S0]), pytest.approx([m1[0] / S1, m1[1] / S1])]
    # eval mode leaves the codebook alone
    before = cb.embed.clone()
    cb.eval()(z)
    assert torch.equal(cb.embed, before)


def test_dead_code_restart():
    cb = _codebook([[0.], [1.], [50.]], decay=0.99, eps=1e-5, dead_code_after=3)
    batches = [torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert [cb(b)['dead_codes'].item() for b in batches] == [0, 0, 1]
    assert cb.embed[2].item() in batches[2].flatten().tolist()     # moved onto an encoder output of the current batch
    assert cb.unused_steps[2].item() == 0 and cb.cluster_size[2].item() == 1.0
    never = _codebook([[0.], [1.], [50.]], decay=0.99, eps=1e-5, dead_code_after=0)
    for b in batches: never(b)
    assert never.embed[2].item() == pytest.approx(50.0, rel=0.05)    # without restarts it stays dead (decays slowly)


def test_codebook_initialised_from_first_batch():
    cb = EMACodebook(8, 2).train()
    z = torch.randn(1, 2, 4, 4) * 0.01 + 3
    cb(z)
    assert bool(cb.initialised)
    assert (cb.embed - 3).abs().max() < 0.2          # all codes moved to where the data is


def test_perplexity():
    assert perplexity(torch.full((512,), 7)).item() == pytest.approx(512, rel=1e-4)
    assert perplexity(torch.tensor([10, 0, 0, 0])).item() == pytest.approx(1.0)
    # uniform usage through the codebook itself: each of K codes receives the same number of vectors
    cb = _codebook([[float(k)] for k in range(16)], decay=0.99, eps=1e-5)
    z = torch.arange(16.).repeat(3).view(1, 1, 6, 8)
    assert cb(z)['perplexity'].item() == pytest.approx(16, rel=1e-4)


def test_straight_through_gradient_reaches_encoder():
    m = VQVAE(VQVAEConfig(in_channels=1, commitment_weight=0, **{k: v for k, v in SLIM.items()})).train()
    x = texture(2, 32)
    out = m.losses(x)
    assert set(out) == {'loss', 'rec', 'commit', 'perplexity', 'used_codes', 'dead_codes'}
    out['loss'].backward()                       # reconstruction only: the encoder's gradient must come through z_q
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder.parameters())
    assert not m.codebook.embed.requires_grad


def test_perceptual_loss():
    perc = PerceptualLoss.from_backbone(('stem', 'stage1'))
    x = texture(2, 64)
    y = x.flip(-1).clone().requires_grad_(True)
    assert perc(x, x).item() == pytest.approx(0.0, abs=1e-6)
    d = perc(x, y)
    assert d.item() > 0.01
    d.backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in perc.parameters())
    with pytest.raises(ValueError, match='same shape'):
        perc(x, x[:1])
    m = VQVAE(VQVAEConfig(in_channels=1, **{**SLIM, 'perceptual_weight': 1.0}))
    with pytest.raises(ValueError, match='perceptual'):
        m.losses(x)
    assert 'perceptual' in m.losses(x, perc)


def test_loss_decreases_and_codebook_usage_is_logged(tmp_path):
    torch.manual_seed(0)
    m = VQVAE(VQVAEConfig(in_channels=1, **{**SLIM, 'perceptual_weight': 0.5}))
    h = fit_vqvae(m, list(texture(3, 96)), 40, batch_size=4, crop_size=32, lr=2e-3, device='cpu', progress=False,
                  perceptual=PerceptualLoss.from_backbone(('stem', 'stage0')), ckpt_path=tmp_path / 'v.ckpt', ckpt_every=20)
    assert h['loss'][-5:].mean() < 0.7 * h['loss'][:5].mean()
    assert {'perplexity', 'used_codes', 'dead_codes'} <= set(h.keys())
    assert (h['perplexity'] >= 1).all() and (h['used_codes'] <= 32).all()
    ck = torch.load(tmp_path / 'v.ckpt', weights_only=True)
    assert ck['step'] == 40 and 'codebook.embed' in ck['modules']['model']
    counts = code_usage(m, texture(2, 32))
    assert counts.shape == (32,) and counts.sum() == 2 * 8 * 8


def test_resume_is_exact(tmp_path):
    data = list(texture(2, 64))
    def make():
        torch.manual_seed(0)
        return VQVAE(VQVAEConfig(in_channels=1, **{**SLIM, 'dead_code_after': 2}))
    a = make(); fit_vqvae(a, data, 6, batch_size=2, crop_size=32, device='cpu', progress=False)
    b = make(); fit_vqvae(b, data, 3, batch_size=2, crop_size=32, device='cpu', progress=False, ckpt_path=tmp_path / 'c')
    c = make(); h = fit_vqvae(c, data, 6, batch_size=2, crop_size=32, device='cpu', progress=False, ckpt_path=tmp_path / 'c')
    assert h.resumed_from == 3
    sa, sc = a.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)        # weights and codebook buffers


def test_save_load_weights_only(tmp_path):
    torch.manual_seed(0)
    m = VQVAE(VQVAEConfig(in_channels=1, **SLIM))
    fit_vqvae(m, texture(2, 64), 3, batch_size=2, crop_size=32, device='cpu', progress=False)
    m.eval()
    x = texture(1, 32, seed=5)
    torch.save(m.state_dict(), tmp_path / 'w.pt')
    m2 = VQVAE(VQVAEConfig(in_channels=1, **SLIM)).eval()
    m2.load_state_dict(torch.load(tmp_path / 'w.pt', weights_only=True))
    assert torch.equal(m.encode(x)[1], m2.encode(x)[1]) and torch.equal(m(x)['x_hat'], m2(x)['x_hat'])
    f = save_vqvae(m, tmp_path / 'm.vqvae')
    m3 = load_vqvae(f)
    assert m3.config == m.config and not m3.training
    assert torch.equal(m3(x)['x_hat'], m(x)['x_hat'])
    (tmp_path / 'junk').write_bytes(b'junk')
    with pytest.raises(ValueError, match='junk'): load_vqvae(tmp_path / 'junk')
    with pytest.raises(FileNotFoundError): load_vqvae(tmp_path / 'missing')


def test_bad_input():
    m = VQVAE(VQVAEConfig(**SLIM))
    with pytest.raises(ValueError, match='in_channels=3'): m(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match='multiple of downsample=4'): m(torch.rand(1, 3, 30, 32))
    with pytest.raises(TypeError, match='float'): m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match='VQVAEConfig'): VQVAE({'downsample': 4})
    with pytest.raises(ValueError, match=r'\[0, 32\)'): m.decode_codes(torch.full((1, 2, 2), 40))
    with pytest.raises(TypeError, match='integer'): m.decode_codes(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match='power of 2'): VQVAEConfig(downsample=3)
    with pytest.raises(ValueError, match='hidden_channels'): VQVAEConfig(hidden_channels=7)
    with pytest.raises(ValueError, match='in_channels=3'): fit_vqvae(m, torch.rand(2, 1, 64, 64), 1, crop_size=32, progress=False)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): fit_vqvae(m, torch.rand(2, 3, 64, 64) * 3, 1, crop_size=32, progress=False)
    with pytest.raises(ValueError, match='smaller than the crop size'): fit_vqvae(m, torch.rand(2, 3, 16, 16), 1, crop_size=32, progress=False)
    with pytest.raises(ValueError, match='crop_size=30'): fit_vqvae(m, torch.rand(2, 3, 64, 64), 1, crop_size=30, progress=False)
    with pytest.raises(TypeError, match='data must be'): fit_vqvae(m, 'panels/', 1, progress=False)


@pytest.mark.gpu
def test_fit_on_cuda_with_amp(tmp_path):
    if not torch.cuda.is_available(): pytest.skip('no CUDA device')
    torch.manual_seed(0)
    m = VQVAE(VQVAEConfig(in_channels=1, **{**SLIM, 'perceptual_weight': 0.1}))
    h = fit_vqvae(m, texture(3, 96), 30, batch_size=4, crop_size=32, lr=2e-3, device='cuda', progress=False,
                  ckpt_path=tmp_path / 'v.ckpt')
    assert next(m.parameters()).is_cuda and m.codebook.embed.dtype == torch.float32
    assert h['loss'][-5:].mean() < h['loss'][:5].mean()
    assert load_checkpoint(tmp_path / 'v.ckpt')['scaler'] is not None       # AMP was on
    codes = m.eval().encode(texture(1, 32).cuda())[1]
    assert codes.dtype == torch.int64 and codes.shape == (1, 8, 8)
