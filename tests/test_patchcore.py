"""Tests of stampdefect.models.patchcore: fit/predict, scores, eq. 7, persistence, tiling, position-aware banks,
bad input, and a Magnetic Tile smoke test (skipped when the dataset is absent)."""

import numpy as np
import pytest
import torch

from stampdefect.core import Detector, get_detector
from stampdefect.tiled import Tiled, TileConfig
from stampdefect.tiling import tile
from stampdefect.models.patchcore import (PatchCore, PatchCoreConfig, RowBuffer, anomalib_style_config, bench_patchcore,
                                          reweighted_score, texture_images)
from stampdefect.kernels import torch_chunked_knn

SIZE = 64


@pytest.fixture(scope='module')
def data():
    train, _ = texture_images(10, SIZE, seed=0)
    good, _ = texture_images(4, SIZE, seed=1)
    bad, masks = texture_images(4, SIZE, seed=2, defect=True)
    return train, good, bad, masks


@pytest.fixture(scope='module')
def fitted(data):
    return PatchCore(PatchCoreConfig(image_size=None, coreset_ratio=0.1)).fit(data[0])


def test_fit_predict_shapes(data, fitted):
    train, good, bad, _ = data
    p = fitted.predict(bad)
    assert p.scores.shape == (4,) and p.scores.dtype == np.float32
    assert p.maps.shape == (4, SIZE, SIZE) and p.maps.dtype == np.float32
    assert fitted.bank.shape == (round(0.1 * 10 * (SIZE // 8) ** 2), 152)
    assert fitted.fit_stats['features_kept'] == 10 * round(0.25 * (SIZE // 8) ** 2)
    one = fitted.predict(bad[0])                                   # a single (C, H, W) image
    assert one.maps.shape == (1, SIZE, SIZE)
    odd = fitted.predict(torch.rand(1, 3, 40, 72))                 # any size: maps come back at the input size
    assert odd.maps.shape == (1, 40, 72)


def test_image_size_resizes_and_maps_return_at_input_size(data):
    det = PatchCore(PatchCoreConfig(image_size=32)).fit(data[0])
    p = det.predict(data[2])
    assert p.maps.shape == (4, SIZE, SIZE)
    assert det.fit_stats['patches_seen'] == 10 * 16                 # features were computed at 32 x 32


def test_defects_score_higher_and_are_localised(data, fitted):
    _, good, bad, masks = data
    pg, pb = fitted.predict(good), fitted.predict(bad)
    assert pb.scores.min() > pg.scores.max()
    for m, amap in zip(masks.numpy(), pb.maps):                       # the map peaks within ~a patch of the scratch
        r, c = np.unravel_index(amap.argmax(), amap.shape)
        rows, cols = np.nonzero(m)
        assert rows.min() - 10 <= r <= rows.max() + 10 and cols.min() - 10 <= c <= cols.max() + 10


def test_save_load_identical(tmp_path, data, fitted):
    for det in [fitted, PatchCore(PatchCoreConfig(image_size=None, feature_dim=32, bank_dtype='float16')).fit(data[0])]:
        path = det.save(tmp_path / 'pc.sdm')
        back = Detector.load(path)
        assert type(back).__name__ == 'PatchCore' and back.config == det.config
        p1, p2 = det.predict(data[2]), back.predict(data[2])
        assert np.array_equal(p1.scores, p2.scores) and np.array_equal(p1.maps, p2.maps)


def test_load_refuses_inconsistent_state(tmp_path, fitted):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    path = fitted.save(tmp_path / 'pc.sdm')
    with safe_open(str(path), framework='pt') as f: meta = f.metadata()
    t = load_file(str(path))
    save_file({'bank': t['bank'][:, :10].contiguous()}, str(tmp_path / 'bad.sdm'),
              metadata={**meta, 'config': meta['config'].replace('"feature_dim": null', '"feature_dim": 12').replace('"random"', '"avgpool"')})
    with pytest.raises(ValueError, match='columns'):
        Detector.load(tmp_path / 'bad.sdm')


def test_reweighting_vs_plain_max(data, fitted):
    det_max = PatchCore(PatchCoreConfig(image_size=None, coreset_ratio=0.1, image_score='max')).fit(data[0])
    assert torch.equal(det_max.bank, fitted.bank)
    pr, pm = fitted.predict(data[2]), det_max.predict(data[2])
    assert np.array_equal(pr.maps, pm.maps)
    e = det_max.embed(data[2])
    patch, s = det_max._score(e.view(4, -1, e.shape[-1]), det_max.bank)
    assert torch.allclose(torch.as_tensor(pm.scores), patch.amax(1))
    w = pr.scores / pm.scores
    assert np.all(w > 0) and np.all(w <= 1 + 1e-6)


def test_reweighted_score_formula():
    g = torch.Generator().manual_seed(0)
    bank = torch.cat([0.01 * torch.randn(50, 2, generator=g), torch.tensor([[10., 0.]])])
    feats = torch.tensor([[[10.5, 0.]], [[0.5, 0.]]])
    d, i = torch_chunked_knn(feats.view(-1, 2), bank, squared=False)
    s = reweighted_score(feats, d.view(2, 1), i.view(2, 1), bank, 9, lambda q, b, k: torch_chunked_knn(q, b, k, squared=False))
    w = s / d.view(-1)
    assert abs(float(w[0]) - 1) < 1e-3                               # isolated bank row: full distance
    assert abs(float(w[1]) - 8 / 9) < 0.02                           # dense cluster: about 1 - 1/9
    dists = torch.linalg.vector_norm(feats[1, 0] - bank[torch.cdist(bank[i[1]], bank).topk(9, largest=False).indices[0]], dim=1)
    assert torch.allclose(s[1], (1 - torch.softmax(dists, 0)[0]) * d[1, 0], atol=1e-5)


def test_torch_chunked_nn_matches_cdist():
    g = torch.Generator().manual_seed(1)
    q, b = torch.randn(2100, 24, generator=g), torch.randn(300, 24, generator=g)
    d, i = torch_chunked_knn(q, b, k=4, squared=False)
    ref = torch.cdist(q, b).topk(4, largest=False)
    assert torch.allclose(d, ref.values, atol=1e-4) and torch.equal(i, ref.indices)
    with pytest.raises(ValueError, match='k must be'):
        torch_chunked_knn(q, b, k=301)


def test_fp16_bank(data, fitted):
    det16 = PatchCore(PatchCoreConfig(image_size=None, coreset_ratio=0.1, bank_dtype='float16')).fit(data[0])
    assert det16.bank.dtype == torch.float16
    assert det16.fit_stats['bank_mb'] < 0.55 * fitted.fit_stats['bank_mb'] + 0.01
    s16, s32 = det16.predict(data[2]).scores, fitted.predict(data[2]).scores
    assert np.allclose(s16, s32, rtol=2e-3)
    det16t = PatchCore(PatchCoreConfig(image_size=None, coreset_ratio=0.1, bank_dtype='float16', search='torch')).fit(data[0])
    assert np.allclose(det16t.predict(data[2]).scores, s16, rtol=1e-3)


def test_subsampling_is_seeded(data, fitted):
    again = PatchCore(PatchCoreConfig(image_size=None, coreset_ratio=0.1)).fit(data[0])
    other = PatchCore(PatchCoreConfig(image_size=None, coreset_ratio=0.1, seed=1)).fit(data[0])
    assert torch.equal(again.bank, fitted.bank)
    assert not torch.equal(other.bank, fitted.bank)
    full = PatchCore(PatchCoreConfig(image_size=None, coreset_ratio=0.1, subsample=1.0)).fit(data[0])
    assert full.fit_stats['features_kept'] == full.fit_stats['patches_seen'] == 10 * (SIZE // 8) ** 2
    assert full.bank.shape[0] == fitted.bank.shape[0]               # the ratio counts patches seen, not kept



def test_batch_size_changes_only_rounding(data, fitted):
    """fit streams one image per feature pass by default; other batch sizes see the same images and the same seeded
    subsample, so the bank and the scores agree up to the backbone's float rounding, which depends on the batch."""
    for bs in (3, 10):
        det = PatchCore(PatchCoreConfig(image_size=None, coreset_ratio=0.1)).fit(data[0], batch_size=bs)
        assert det.fit_stats['features_kept'] == fitted.fit_stats['features_kept']
        assert det.bank.shape == fitted.bank.shape
        np.testing.assert_allclose(det.predict(data[2]).scores, fitted.predict(data[2]).scores, rtol=1e-4)

def test_streams_generators_and_grows_buffer(data):
    gen = (x for x in data[0].split(3))                                # unknown length: the buffer grows
    det = PatchCore(PatchCoreConfig(image_size=None)).fit(gen)
    assert det.fit_stats['images'] == 10
    rb = RowBuffer(2, 3)
    for k in range(4): rb.append(torch.full((3, 3), float(k)))
    assert rb.rows().shape == (12, 3) and rb.rows()[-1, 0] == 3


def test_projection_options(data):
    for proj in ('random', 'avgpool'):
        det = PatchCore(PatchCoreConfig(image_size=None, feature_dim=48, projection=proj)).fit(data[0])
        assert det.bank.shape[1] == 48 and (det.projection is not None) == (proj == 'random')
        assert det.predict(data[2]).scores.min() > det.predict(data[1]).scores.max()


def _panels(n, seed, swap=False):
    "Panels (n, 3, 64, 256): horizontal streaks on the left half, vertical on the right (swapped if `swap`)."
    a, _ = texture_images(n, 64, seed=seed)
    b = texture_images(n, 64, seed=seed + 50)[0].transpose(-1, -2)
    left, right = (b, a) if swap else (a, b)
    return torch.cat([left, left.roll(7, -1), right, right.roll(7, -1)], -1)


def test_tiled_mode_shapes_and_score(data):
    det = Tiled(PatchCore(PatchCoreConfig(image_size=None, coreset_ratio=0.05)), TileConfig(64, 48)).fit(_panels(2, 0))
    panel = _panels(1, 9)
    p = det.predict(panel)
    assert p.maps.shape == (1, 64, 256) and p.scores.shape == (1,)
    # the panel's score is the largest tile score: score the tiles as images against the same bank
    plain = PatchCore(PatchCoreConfig(image_size=None, coreset_ratio=0.05))
    plain.bank, plain.fitted = det.detector.bank, True
    tiles, _ = tile(panel[0], 64, 48)
    assert np.isclose(p.scores[0], plain.predict(tiles).scores.max(), rtol=1e-5)
    with pytest.raises(ValueError, match='smaller than the 64-px tile'):
        det.predict(torch.rand(1, 3, 32, 256))


def test_position_aware_banks(tmp_path):
    train, normal, swapped = _panels(3, 0), _panels(2, 10), _panels(2, 20, swap=True)
    cfg = dict(image_size=None, coreset_ratio=0.05)
    glob = Tiled(PatchCore(PatchCoreConfig(**cfg)), TileConfig(64)).fit(train)
    pos = Tiled(PatchCore(PatchCoreConfig(**cfg, position_aware=True)), TileConfig(64)).fit(train)
    pc = pos.detector
    assert len(pc.pos_origins) == 4 and pc.pos_offsets.tolist()[0] == 0 and int(pc.pos_offsets[-1]) == len(pc.pos_bank)
    # both textures are normal *somewhere*: only the position-aware banks see them in the wrong place
    g_gap = glob.predict(swapped).scores.min() / glob.predict(normal).scores.max()
    p_gap = pos.predict(swapped).scores.min() / pos.predict(normal).scores.max()
    assert p_gap > 1.2 and p_gap > g_gap
    back = Detector.load(pos.save(tmp_path / 'pos.sdm'))
    assert np.array_equal(back.predict(swapped).maps, pos.predict(swapped).maps)
    with pytest.raises(ValueError, match='position-aware banks were fitted'):
        pos.predict(swapped[..., :192])
    with pytest.raises(ValueError, match='panels of one size'):
        Tiled(PatchCore(PatchCoreConfig(**cfg, position_aware=True)), TileConfig(64)).fit([train[0], train[1, :, :, :192]])
    with pytest.raises(ValueError, match='need the tile positions'):          # outside the tiling stage
        PatchCore(PatchCoreConfig(**cfg, position_aware=True)).fit(train)
    with pytest.raises(ValueError, match="need each tile's position"):
        pc.predict(train[:1, :, :, :64])


def test_bad_inputs(data, fitted):
    with pytest.raises(RuntimeError, match='not fitted'):
        PatchCore().predict(data[2])
    with pytest.raises(ValueError, match=r'expected 3 channel\(s\)'):
        fitted.predict(data[2][:, :1])
    with pytest.raises(ValueError, match='NaN'):
        fitted.predict(torch.full((1, 3, 32, 32), float('nan')))
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        fitted.predict(data[2] * 3)
    with pytest.raises(ValueError, match='no images'):
        PatchCore(PatchCoreConfig(image_size=None)).fit([])
    for bad in [dict(feature_dim=0), dict(coreset_ratio=0), dict(subsample=2), dict(search='faiss'),
                dict(position_radius=-1), dict(channels=2)]:
        with pytest.raises(ValueError):
            get_detector('patchcore', **bad)
    with pytest.raises(ValueError, match='cannot add dimensions'):
        PatchCore(PatchCoreConfig(image_size=None, feature_dim=300, projection='avgpool')).fit(data[0])
    with pytest.raises(FileNotFoundError, match='does not exist'):
        PatchCore(PatchCoreConfig(image_size=None, weights='/nonexistent/w.pth')).fit(data[0])


def test_failed_fit_keeps_the_model(data, fitted):
    det = PatchCore(PatchCoreConfig(image_size=None)).fit(data[0])
    before = det.predict(data[2]).scores
    with pytest.raises(ValueError):
        det.fit([data[0][0], torch.full((3, SIZE, SIZE), float('nan'))])
    assert det.fitted and np.array_equal(det.predict(data[2]).scores, before)


def test_anomalib_style_config():
    c = anomalib_style_config()
    assert (c.feature_dim, c.coreset_ratio, c.subsample, c.search) == (None, 0.1, 1.0, 'torch')
    assert anomalib_style_config(image_size=128).image_size == 128


def test_bench_quick():
    cases = bench_patchcore(quick=True)
    assert [c['case'] for c in cases] == ['patchcore_fit', 'patchcore_inspect']
    assert all('speedup_vs_anomalib_style' in c for c in cases)
    assert cases[1]['images_per_second'] > 0


def test_magnetic_tile_smoke():
    from stampdefect.data import FolderDataset, magnetic_tile_dir
    from stampdefect.metrics import evaluate
    root = magnetic_tile_dir()
    if root is None: pytest.skip('magnetic_tile dataset not present')
    train = FolderDataset(root, 'train', size=128)
    test = FolderDataset(root, 'test', size=128, defect_types=['good', 'break', 'fray'], binarize_masks=True)
    det = PatchCore(PatchCoreConfig(image_size=128)).fit(torch.utils.data.Subset(train, range(16)))
    types = test.defect_types
    idx = [i for i, t in enumerate(types) if t == 'good'][:6] + [i for i, t in enumerate(types) if t != 'good'][:6]
    items = [test[i] for i in idx]
    p = det.predict(torch.stack([it['image'] for it in items]))
    res = evaluate(p.scores, np.array([it['label'] for it in items]), p.maps, np.stack([it['mask'][0].numpy() > 0.5 for it in items]))
    assert res['image_auroc'] > 0.6 and res['pixel_auroc'] > 0.6, res
