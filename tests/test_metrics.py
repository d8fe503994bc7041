"Tests for stampdefect.metrics against scikit-learn and a plain MVTec-style PRO reference."
import bisect, os, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
import pytest
import torch
from scipy.ndimage import label
from sklearn.metrics import (roc_auc_score, average_precision_score, precision_recall_curve, f1_score,
                             jaccard_score)
from stampdefect.metrics import (image_auroc, image_aupr, f1_max, pixel_counts, pixel_auroc,
                                 pixel_aupr, pro_auc, pro_auc_reference, pixel_confusion, pixel_iou, pixel_f1,
                                 threshold_from_normal, evaluate, synthetic_maps, bench_metrics, DEFAULT_BINS)

ROOT = Path(__file__).resolve().parents[1]


def mvtec_pro_auc(maps, masks, fpr_limit=0.3):
    "Straightforward MVTec AD definition: per-image 8-connected regions, sort all pixels, cumulate, trapezoid."
    fp_changes, pro_changes, n_ok, n_regions = [], [], 0, 0
    for gt in masks:
        lab, n = label(gt, np.ones((3, 3), int))
        n_regions += n
        fp = (lab == 0).astype(float); n_ok += fp.sum()
        pro = np.zeros(gt.shape)
        for r in range(1, n + 1):
            pro[lab == r] = 1.0 / (lab == r).sum()
        fp_changes.append(fp.ravel()); pro_changes.append(pro.ravel())
    s = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    order = np.argsort(-s, kind='stable')
    s = s[order]
    fprs = np.cumsum(np.concatenate(fp_changes)[order]) / n_ok
    pros = np.cumsum(np.concatenate(pro_changes)[order]) / n_regions
    keep = np.append(np.diff(s) != 0, True)
    x = np.concatenate([[0.0], np.clip(fprs[keep], None, 1), [1.0]])
    y = np.concatenate([[0.0], np.clip(pros[keep], None, 1), [1.0]])
    correction = 0.0
    if fpr_limit not in x:
        i = bisect.bisect(list(x), fpr_limit)
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (fpr_limit - x[i - 1]) / (x[i] - x[i - 1])
        correction = 0.5 * (y_at + y[i - 1]) * (fpr_limit - x[i - 1])
    keep = x <= fpr_limit
    x, y = x[keep], y[keep]
    return (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / fpr_limit


@pytest.fixture(scope='module')
def dataset():
    return synthetic_maps(40, 96, seed=3)


# ---------------------------------------------------------------- image level
@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('decimals', [None, 1, 0])          # continuous, many ties, heavy ties
def test_image_metrics_match_sklearn(seed, decimals):
    rng = np.random.default_rng(seed)
    y = rng.random(257) < 0.35
    s = rng.normal(size=257) + 1.0 * y
    if decimals is not None: s = np.round(s, decimals)
    assert abs(image_auroc(s, y) - roc_auc_score(y, s)) < 1e-12
    assert abs(image_aupr(s, y) - average_precision_score(y, s)) < 1e-12
    p, r, t = precision_recall_curve(y, s)
    f1s = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0)[:-1]
    best, thr = f1_max(s, y)
    assert abs(best - f1s.max()) < 1e-12
    assert abs(f1_score(y, s >= thr) - best) < 1e-12
    assert thr == t[np.flatnonzero(np.isclose(f1s, f1s.max(), rtol=0, atol=1e-12))].max()   # highest best threshold


def test_image_all_equal_scores():
    y = np.array([0, 1, 0, 1, 1])
    s = np.full(5, 0.3)
    assert image_auroc(s, y) == roc_auc_score(y, s) == 0.5
    assert abs(image_aupr(s, y) - average_precision_score(y, s)) < 1e-12      # = prevalence
    assert f1_max(s, y) == (pytest.approx(2 * 0.6 / 1.6), 0.3)


def test_image_inputs_kinds():
    s, y = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    ref = roc_auc_score(y, s)
    assert image_auroc(np.array(s, np.float32), np.array(y, bool)) == pytest.approx(ref)
    assert image_auroc(torch.tensor(s), torch.tensor(y)) == pytest.approx(ref)
    assert image_auroc(torch.tensor(s, dtype=torch.bfloat16), torch.tensor(y)) == pytest.approx(ref)
    assert image_auroc(np.array([1, 5, 3, 9]), y) == 0.75                     # integer scores


def test_image_bad_inputs():
    with pytest.raises(ValueError, match='scores contains 1 non-finite'):
        image_auroc([0.1, np.nan, 0.3], [0, 1, 1])
    with pytest.raises(ValueError, match='labels must be binary'):
        image_auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match='scores has 3 entries but labels has 2'):
        image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match='image AUROC is undefined: labels contain no defect images'):
        image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match='image AP is undefined: labels contain no normal images'):
        image_aupr([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match='must be 1-D'):
        image_auroc(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match='scores is empty'):
        image_auroc([], [])


# ---------------------------------------------------------------- pixel level
def test_pixel_exact_matches_sklearn(dataset):
    _, _, maps, masks = dataset
    c = pixel_counts(maps, masks, bins=None)
    assert abs(c.auroc() - roc_auc_score(masks.ravel(), maps.ravel())) < 1e-9
    assert abs(c.aupr() - average_precision_score(masks.ravel(), maps.ravel())) < 1e-9
    assert c.auroc_tolerance() == 0 and c.pro_auc_tolerance() == 0


def test_pixel_binned_within_stated_tolerance(dataset):
    _, _, maps, masks = dataset
    sk_auroc = roc_auc_score(masks.ravel(), maps.ravel())
    sk_ap = average_precision_score(masks.ravel(), maps.ravel())
    ref_pro = mvtec_pro_auc(maps, masks)
    for bins in (2 ** 8, 2 ** 12, DEFAULT_BINS):
        c = pixel_counts(maps, masks, bins=bins)
        assert abs(c.auroc() - sk_auroc) <= c.auroc_tolerance() + 1e-12
        assert abs(c.pro_auc() - ref_pro) <= c.pro_auc_tolerance() + 1e-12
    assert c.auroc_tolerance() < 1e-5 and c.pro_auc_tolerance() < 1e-5
    assert abs(pixel_auroc(maps, masks) - sk_auroc) < 1e-5
    assert abs(pixel_aupr(maps, masks) - sk_ap) < 1e-4                  # AP: no box bound, tested tolerance


def test_pixel_quantized_scores_are_exact(dataset):
    "8-bit maps: every level gets its own bin, so the binned metrics equal the exact ones (ties grouped)."
    _, _, maps, masks = dataset
    q = np.round((maps - maps.min()) / np.ptp(maps) * 255).astype(np.uint8)
    c = pixel_counts(q, masks)
    assert abs(c.auroc() - roc_auc_score(masks.ravel(), q.ravel())) < 1e-12
    assert abs(c.aupr() - average_precision_score(masks.ravel(), q.ravel())) < 1e-12
    assert abs(c.pro_auc() - mvtec_pro_auc(q, masks)) < 1e-12


def test_pixel_all_equal_scores():
    masks = np.zeros((2, 8, 8), bool); masks[0, 2:4, 2:4] = True
    maps = np.full((2, 8, 8), 0.5, np.float32)
    assert pixel_auroc(maps, masks) == 0.5
    assert abs(pixel_aupr(maps, masks) - masks.mean()) < 1e-12
    assert abs(pro_auc(maps, masks) - mvtec_pro_auc(maps, masks)) < 1e-12


@pytest.mark.parametrize('limit', [0.3, 0.05, 1.0])
def test_pro_exact_matches_reference(dataset, limit):
    _, _, maps, masks = dataset
    ref = mvtec_pro_auc(maps, masks, limit)
    assert abs(pro_auc(maps, masks, fpr_limit=limit, bins=None) - ref) < 1e-10
    assert abs(pro_auc_reference(maps, masks, limit) - ref) < 1e-10            # the benchmark's baseline too


def test_pro_regions_weighted_equally_and_8_connected():
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 0:3, 0:3] = True          # 9 px region
    masks[0, 4, 4] = masks[0, 5, 5] = True   # diagonal: one 2 px region under 8-connectivity
    masks[1, 0, 5] = True              # 1 px region in another image (regions never span images)
    maps = np.zeros((2, 6, 6), np.float32)
    maps[0, 0:3, 0:3] = 0.9            # big region found
    maps[1, 0, 5] = 0.8                # small region found, the diagonal one missed
    fpr, pro = pixel_counts(maps, masks, bins=None).pro_curve()
    np.testing.assert_allclose(pro[1:3], [1 / 3, 2 / 3])     # 3 regions, each counts 1/3 whatever its size
    assert fpr[2] == 0
    assert abs(pro_auc(maps, masks, bins=None) - mvtec_pro_auc(maps, masks)) < 1e-12


def test_lists_of_maps_of_different_sizes(dataset):
    _, _, maps, masks = dataset
    a, b = maps[:10, :80, :70], maps[10:, :, :]
    ma, mb = masks[:10, :80, :70], masks[10:]
    flat_s = np.concatenate([a.ravel(), b.ravel()]); flat_m = np.concatenate([ma.ravel(), mb.ravel()])
    assert abs(pixel_auroc([a, b], [ma, mb], bins=None) - roc_auc_score(flat_m, flat_s)) < 1e-9
    per_image_maps = list(a) + list(b); per_image_masks = list(ma) + list(mb)
    ref = mvtec_pro_auc(per_image_maps, per_image_masks)
    assert abs(pro_auc(per_image_maps, per_image_masks, bins=None) - ref) < 1e-10
    c = pixel_counts(per_image_maps, per_image_masks)
    assert abs(c.pro_auc() - ref) <= c.pro_auc_tolerance() + 1e-12


@pytest.mark.parametrize('kind', ['float16', 'float64', 'torch', 'torch_bf16', 'uint8_mask'])
def test_pixel_input_kinds(dataset, kind):
    _, _, maps, masks = dataset
    m, k = maps[:12], masks[:12]
    if kind == 'float16': m = m.astype(np.float16)
    if kind == 'float64': m = m.astype(np.float64)
    if kind == 'uint8_mask': k = k.astype(np.uint8)
    ref = roc_auc_score(k.ravel(), np.asarray(m, np.float64).ravel())
    if kind == 'torch': m, k = torch.from_numpy(m), torch.from_numpy(k)
    if kind == 'torch_bf16':
        m, k = torch.from_numpy(m).bfloat16(), torch.from_numpy(k)
        ref = roc_auc_score(k.numpy().ravel(), m.float().numpy().ravel())
    c = pixel_counts(m, k)
    assert abs(c.auroc() - ref) <= c.auroc_tolerance() + 1e-12


def test_pixel_bad_inputs(dataset):
    _, _, maps, masks = dataset
    with pytest.raises(ValueError, match=r'masks must be binary .*found values \[255\].*masks > 0'):
        pixel_auroc(maps, masks.astype(np.uint8) * 255)
    bad = maps.copy(); bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match='maps contains 1 non-finite'):
        pixel_auroc(bad, masks)
    bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match='non-finite'):
        pro_auc(bad, masks)
    with pytest.raises(ValueError, match=r'maps has shape \(40, 96, 96\) but masks has shape \(39, 96, 96\)'):
        pixel_auroc(maps, masks[:-1])
    with pytest.raises(ValueError, match=r'maps\[1\] has shape'):
        pixel_auroc([maps[0], maps[1]], [masks[0], masks[1, :5]])
    with pytest.raises(ValueError, match='pixel AUROC is undefined: masks contain no defect pixels'):
        pixel_auroc(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match='PRO is undefined: masks contain no normal pixels'):
        pro_auc(maps, np.ones_like(masks))
    with pytest.raises(ValueError, match=r'\(B, H, W\) or \(H, W\)'):
        pixel_auroc(maps[None], masks[None])
    with pytest.raises(ValueError, match='bins must be'):
        pixel_auroc(maps, masks, bins=1)
    with pytest.raises(ValueError, match='fpr_limit must be in'):
        pro_auc(maps, masks, fpr_limit=0)
    with pytest.raises(TypeError, match='both be arrays or both be lists'):
        pixel_auroc([maps[0]], masks[0])


# ---------------------------------------------------------------- threshold metrics
def test_iou_f1_match_sklearn(dataset):
    _, _, maps, masks = dataset
    for t in (0.2, 0.5, float(np.quantile(maps, 0.97))):
        pred = (maps >= t).ravel()
        assert abs(pixel_iou(maps, masks, t) - jaccard_score(masks.ravel(), pred)) < 1e-12
        assert abs(pixel_f1(maps, masks, t) - f1_score(masks.ravel(), pred)) < 1e-12
        c = pixel_confusion(maps, masks, t)
        assert c['tp'] == int((pred & masks.ravel()).sum()) and c['tn'] == int((~pred & ~masks.ravel()).sum())
        assert sum(c.values()) == maps.size


def test_iou_undefined():
    with pytest.raises(ValueError, match='IoU is undefined'):
        pixel_iou(np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), bool), 0.5)
    with pytest.raises(ValueError, match='threshold must be finite'):
        pixel_iou(np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), bool), np.nan)


def test_threshold_from_normal():
    s = np.random.default_rng(0).gamma(2.0, size=(50, 7))
    assert threshold_from_normal(s) == pytest.approx(np.quantile(s, 0.99))
    assert threshold_from_normal(torch.from_numpy(s), 0.5) == pytest.approx(np.median(s))
    t = threshold_from_normal(s, method='max')
    assert t > s.max() and (s < t).all() and t == np.nextafter(s.max(), np.inf)
    assert threshold_from_normal(s, method='sigma', k=3) == pytest.approx(s.mean() + 3 * s.std(ddof=1))
    for bad, match in [(dict(quantile=0), 'quantile must be'), (dict(quantile=1.5), 'quantile must be'),
                       (dict(method='iqr'), "got 'iqr'")]:
        with pytest.raises(ValueError, match=match):
            threshold_from_normal(s, **bad)
    with pytest.raises(ValueError, match='non-finite'):
        threshold_from_normal([0.1, np.inf])
    with pytest.raises(ValueError, match='empty'):
        threshold_from_normal([])
    with pytest.raises(ValueError, match='at least 2'):
        threshold_from_normal([1.0], method='sigma')


# ---------------------------------------------------------------- evaluate
def test_evaluate_table(dataset):
    scores, labels, maps, masks = dataset
    t = threshold_from_normal(maps[labels == 0], 0.999)
    r = evaluate(scores, labels, maps, masks, threshold=t)
    assert set(r) == {'n_images', 'n_defective', 'image_auroc', 'image_aupr', 'f1_max', 'f1_threshold',
                      'pixel_auroc', 'pixel_aupr', 'pro_auc', 'pixel_auroc_tol', 'pro_auc_tol', 'threshold',
                      'iou', 'pixel_f1'}
    assert r['image_auroc'] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert r['image_aupr'] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert r['pixel_auroc'] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=r['pixel_auroc_tol'] + 1e-12)
    assert r['pro_auc'] == pytest.approx(mvtec_pro_auc(maps, masks), abs=r['pro_auc_tol'] + 1e-12)
    assert r['iou'] == pytest.approx(jaccard_score(masks.ravel(), (maps >= t).ravel()), abs=1e-12)
    assert r['pixel_f1'] == pytest.approx(f1_score(masks.ravel(), (maps >= t).ravel()), abs=1e-12)
    assert all(isinstance(v, (int, float)) for v in r.values())
    img_only = evaluate(scores, labels)
    assert set(img_only) == {'n_images', 'n_defective', 'image_auroc', 'image_aupr', 'f1_max', 'f1_threshold'}


def test_evaluate_bad_inputs(dataset):
    scores, labels, maps, masks = dataset
    with pytest.raises(ValueError, match='pass both maps and masks'):
        evaluate(scores, labels, maps)
    with pytest.raises(ValueError, match='threshold applies to pixel maps'):
        evaluate(scores, labels, threshold=0.5)
    with pytest.raises(ValueError, match='maps hold 39 images but scores has 40'):
        evaluate(scores, labels, maps[1:], masks[1:])
    i = int(np.flatnonzero(labels)[0])
    wrong = labels.copy(); wrong[i] = 0
    with pytest.raises(ValueError, match=f'image {i} is labelled normal'):
        evaluate(scores, wrong, maps, masks)
    bad = scores.copy(); bad[0] = np.nan
    with pytest.raises(ValueError, match='scores contains 1 non-finite'):
        evaluate(bad, labels, maps, masks)


# ---------------------------------------------------------------- GPU kernels
def test_cuda_kernels_under_simulator():
    "The Numba-CUDA binning and confusion kernels, run by Numba's CUDA simulator, agree with the CPU kernels."
    code = textwrap.dedent('''
        import numpy as np
        from stampdefect.metrics import (_launch_bins, _launch_confusion, _bin_pixels, _confusion, _regions,
                                         _region_weights, synthetic_maps)
        _, _, maps, masks = synthetic_maps(3, 12, defect_fraction=1.0, seed=2)
        x, k = maps.reshape(-1), masks.reshape(-1).view(np.uint8)
        lab, row, nreg = _regions(masks.view(np.uint8)); w = _region_weights(lab, nreg, nreg)
        lo, hi, nb = float(x.min()), float(x.max()), 64
        args = (x, k, lab, row, 144, w, lo, nb / (hi - lo), True)
        g = [np.zeros(nb, np.int64), np.zeros(nb, np.int64), np.zeros(nb)]
        _launch_bins(*args, *g)
        c = [np.zeros((1, nb), np.int32), np.zeros((1, nb), np.int32), np.zeros((1, nb))]
        _bin_pixels(*args, *c)
        assert (g[0] == c[0][0]).all() and (g[1] == c[1][0]).all() and np.allclose(g[2], c[2][0], rtol=1e-12)
        assert g[1].sum() == k.sum() and abs(g[2].sum() - 1) < 1e-12
        for t in (lo, 0.3, hi):
            assert (_launch_confusion(x, k, t) == _confusion(x, k, t, 1)).all()
        print('cudasim ok')''')
    env = {**os.environ, 'NUMBA_ENABLE_CUDASIM': '1', 'PYTHONPATH': str(ROOT)}
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and 'cudasim ok' in res.stdout, res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_gpu_torch_matches_cpu(dataset):
    scores, labels, maps, masks = dataset
    cpu = evaluate(scores, labels, maps, masks, threshold=0.5)
    gpu = evaluate(scores, labels, torch.from_numpy(maps).cuda(), torch.from_numpy(masks).cuda(), threshold=0.5)
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], abs=1e-12), key
    half = pixel_counts(torch.from_numpy(maps).cuda().half(), masks)
    ref = roc_auc_score(masks.ravel(), maps.astype(np.float16).ravel())
    assert abs(half.auroc() - ref) <= half.auroc_tolerance() + 1e-12


@pytest.mark.gpu
def test_gpu_cupy_matches_cpu(dataset):
    cupy = pytest.importorskip('cupy')
    _, _, maps, masks = dataset
    c, g = pixel_counts(maps, masks), pixel_counts(cupy.asarray(maps), masks)
    assert (c.neg == g.neg).all() and (c.pos == g.pos).all() and np.allclose(c.pro, g.pro, rtol=1e-12)
    assert pixel_confusion(cupy.asarray(maps), masks, 0.4) == pixel_confusion(maps, masks, 0.4)


# ---------------------------------------------------------------- benchmark
def test_bench_quick_runs():
    cases = bench_metrics(quick=True)
    assert [c['case'] for c in cases] == ['pixel AUROC', 'PRO-AUC']
    for c in cases:
        assert c['abs_diff'] <= c['tolerance_bound'] + 1e-12 and 'met' in c
    assert all(c['seconds'] > 0 for c in cases)
