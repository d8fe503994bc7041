"""stampdefect.evaluation: the test set checked before scoring, the batched path equal to the photo-by-photo one,
errors naming the file, results files, and the `bench evaluate` case."""
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from stampdefect.core import Detector, Prediction, Capabilities, ReferenceDetector
from stampdefect.data import FolderDataset, MaskError
from stampdefect.evaluation import (check_test_set, evaluate_detector, format_table, write_results_json, jsonable,
                                    split_for_calibration, bench_evaluate, TABLE_KEYS)


def _noise(rng, size=24):
    return (128 + rng.normal(0, 6, (size, size, 3))).clip(0, 255).astype(np.uint8)


def make_set(root, n_good=3, n_bad=3, size=24, seed=0):
    "MVTec-layout folder: n_good normal train and test images, n_bad scratched test images with binary masks."
    rng = np.random.default_rng(seed)
    for d in ('train/good', 'test/good', 'test/scratch', 'ground_truth/scratch'): (root / d).mkdir(parents=True, exist_ok=True)
    for k in range(n_good):
        Image.fromarray(_noise(rng, size)).save(root / 'train' / 'good' / f'{k:03d}.png')
        Image.fromarray(_noise(rng, size)).save(root / 'test' / 'good' / f'{k:03d}.png')
    for k in range(n_bad):
        a, m = _noise(rng, size), np.zeros((size, size), np.uint8)
        a[4 + 2 * k:6 + 2 * k, 3:size - 3] = 15; m[4 + 2 * k:6 + 2 * k, 3:size - 3] = 255
        Image.fromarray(a).save(root / 'test' / 'scratch' / f'{k:03d}.png')
        Image.fromarray(m).save(root / 'ground_truth' / 'scratch' / f'{k:03d}_mask.png')
    return root


def fitted_reference(root):
    train = torch.stack([it['image'] for it in FolderDataset(root, split='train')])
    det = ReferenceDetector().fit(train[:-1])
    det.calibrate(train[-1:], quantile=1.0)
    return det


class Counting(ReferenceDetector):
    "The reference detector, counting its predict calls."
    calls = 0
    def predict(self, images):
        type(self).calls += 1
        return super().predict(images)


@pytest.fixture
def tiny(tmp_path):
    return make_set(tmp_path / 'set')


def test_soft_mask_is_refused_before_any_prediction(tiny):
    m = np.asarray(Image.open(tiny / 'ground_truth' / 'scratch' / '001_mask.png')).copy()
    m[0, :4] = 90                                                   # an anti-aliased edge
    Image.fromarray(m).save(tiny / 'ground_truth' / 'scratch' / '001_mask.png')
    base = fitted_reference(tiny)
    det = Counting(base.config); det.mean, det.std, det.fitted, det.threshold = base.mean, base.std, True, base.threshold
    Counting.calls = 0
    with pytest.raises(MaskError) as e:
        evaluate_detector(det, tiny, progress=False, binarize_hint='--binarize-masks')
    first = str(e.value).splitlines()[0]
    assert 'pass --binarize-masks' in first and '001_mask.png' in first and 'binarize=True' not in first
    assert Counting.calls == 0                                      # checked before the first prediction
    res = evaluate_detector(det, tiny, progress=False, binarize_masks=True)
    assert res['n_images'] == 6 and Counting.calls > 0


def test_check_test_set_names_every_kind_of_problem(tiny):
    ds = FolderDataset(tiny, split='test')
    assert check_test_set(ds) == 3
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tiny / 'ground_truth' / 'scratch' / '002_mask.png')
    with pytest.raises(MaskError, match=r'002_mask.png is 10x12'):
        check_test_set(FolderDataset(tiny, split='test'))
    with pytest.raises(MaskError, match='002_mask.png is 10x12'):      # not curable by binarizing
        check_test_set(FolderDataset(tiny, split='test', binarize_masks=True))
    make_set(tiny)                                                  # repaired
    (tiny / 'test' / 'good' / '001.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')
    with pytest.raises(MaskError, match=r'good/001.png'):
        check_test_set(FolderDataset(tiny, split='test'))


def test_batched_path_equals_photo_by_photo(tiny):
    det = fitted_reference(tiny)
    batched = evaluate_detector(det, tiny, batch_size=4, progress=False)
    reports = []
    single = evaluate_detector(det, tiny, progress=False, on_report=lambda it, rep: reports.append((it['path'], rep.score)))
    assert len(reports) == 6
    for k in TABLE_KEYS:
        assert batched[k] == single[k], k
        assert batched['per_defect_type']['scratch'][k] == single['per_defect_type']['scratch'][k], k
    assert batched['image_auroc'] == 1.0 and batched['pixel_auroc'] > 0.99
    assert set(batched['seconds']) == {'read', 'detect', 'metrics'} and batched['images_per_second'] > 0
    assert batched['not_aligned'] == [] and batched['aligned'] is False


@dataclass
class _NoOptions: pass

class AnySize(Detector):
    "Takes images of any size (map = distance of each pixel from mid-grey); refuses dark images."
    name, Config = 'any_size_test', _NoOptions
    @property
    def capabilities(self): return Capabilities()
    def predict(self, images):
        if (images.flatten(1).mean(1) < 0.2).any(): raise ValueError("too dark to inspect")
        maps = (images - 0.5).abs().mean(1)
        return Prediction(maps.flatten(1).max(1).values, maps)


def test_native_sizes_must_agree_and_errors_name_the_image(tmp_path):
    root = make_set(tmp_path / 'set', size=24)
    det = AnySize(); det.fitted, det.threshold = True, 0.4
    assert evaluate_detector(det, root, batch_size=4, progress=False)['n_images'] == 6
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(root / 'test' / 'good' / '010.png')     # dark: refused
    with pytest.raises(ValueError, match=r'good/010.png: too dark to inspect'):
        evaluate_detector(det, root, batch_size=4, progress=False)
    # compared at their own size, the test images must share one: refused up front, naming the odd one
    Image.fromarray(_noise(np.random.default_rng(5), 32)).save(root / 'test' / 'good' / '010.png')
    with pytest.raises(ValueError, match=r'good/010.png is 32x32'):
        evaluate_detector(det, root, progress=False)


def test_bad_arguments(tiny):
    with pytest.raises(RuntimeError, match='not fitted'): evaluate_detector(ReferenceDetector(), tiny)
    with pytest.raises(TypeError, match='fitted Detector'): evaluate_detector(object(), tiny)
    with pytest.raises(ValueError, match='batch_size'): evaluate_detector(fitted_reference(tiny), tiny, batch_size=0)


def test_results_json_and_table(tmp_path):
    res = {'image_auroc': np.float32(0.5), 'n': np.int64(2), 'flag': np.bool_(True), 'arr': np.arange(3), 't': (1, 2),
           'per_defect_type': {'crack': {'image_auroc': 0.25, 'iou': None}}}
    p = write_results_json(res, tmp_path / 'r.json')
    back = json.loads(p.read_text())
    assert back == {'image_auroc': 0.5, 'n': 2, 'flag': True, 'arr': [0, 1, 2], 't': [1, 2],
                    'per_defect_type': {'crack': {'image_auroc': 0.25, 'iou': None}}}
    assert sorted(f.name for f in tmp_path.iterdir()) == ['r.json']
    assert jsonable(res)['arr'] == [0, 1, 2]
    lines = format_table(res).splitlines()
    assert lines[0].split() == ['defect'] + TABLE_KEYS and lines[2].split()[:2] == ['all', '0.5000']
    assert lines[3].split()[0] == 'crack' and lines[3].split()[7] == '-'            # iou unknown: a dash


def test_split_for_calibration():
    fit, cal = split_for_calibration(20, 0.25, seed=3)
    assert len(cal) == 5 and len(fit) == 15 and not set(fit) & set(cal)
    assert (split_for_calibration(20, 0.25, seed=3)[1] == cal).all()
    with pytest.raises(ValueError, match='at least 2'): split_for_calibration(1, 0.5)


def test_bench_evaluate_quick_measures_both():
    from stampdefect.bench import BENCHES
    assert BENCHES['evaluate'] is bench_evaluate
    case, = bench_evaluate(quick=True, repeats=1)
    assert case['case'] == 'evaluate/reference 64x64' and case['sizes'] == {'images': 16, 'size': 64, 'batch_size': 8}
    assert case['baselines']['predict_all']['seconds'] > 0 and case['seconds'] > 0
    assert case['ratio_to_predict_all'] == pytest.approx(case['seconds'] / case['baselines']['predict_all']['seconds'], rel=1e-3)
    assert 0 < case['scoring_ratio'] <= case['ratio_to_predict_all'] * 1.01
    assert case['image_auroc'] == 1.0
