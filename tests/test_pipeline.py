"""The inspection pipeline: report contents, regions, alignment failures, mapping back to the photo, sizes, bench."""
import dataclasses, io, json, os

import numpy as np
import pytest
import torch

from stampdefect.core import Detector, Prediction, ReferenceDetector
from stampdefect.alignment import Aligner, AlignerConfig, AlignResult
from stampdefect.stn import STNConfig
from stampdefect.synthetic import SAMPLE_CONFIG, render_panel
from stampdefect.pipeline import (find_regions, inspect_panel, check_sizes, save_pipeline, load_pipeline, aligner_path,
                                  panel_stages, torch_threads, PanelReport)
from stampdefect.core import stage

CFG = dataclasses.replace(SAMPLE_CONFIG, size=(270, 480))


def photo(seed, defective=False, **pose):
    out = render_panel(CFG, seed, defective=defective, pose=pose or None)
    return torch.from_numpy(out['image']).permute(2, 0, 1).float() / 255, out['mask'] > 0


@pytest.fixture(scope='module')
def fitted():
    "An aligner and a reference detector fitted on 4 aligned synthetic panels (small and fast)."
    train = [photo(100 + i)[0] for i in range(4)]
    with torch_threads(1): al = Aligner(AlignerConfig(stn=STNConfig(steps=20))).fit(train)
    aligned = []
    for x in train:
        r = al.align(x)
        assert r.ok, r.reason
        aligned.append(r.image)
    det = ReferenceDetector().fit(torch.stack(aligned[:3]))
    det.calibrate(aligned[3:], quantile=1.0)
    return al, det, aligned


class Square(Detector):
    "Test detector: a map that is 0 except a bright square at a fixed place of its input; score = 1."
    name = 'test-square'
    def __init__(self, config=None): super().__init__(object()); self.fitted = True; self.threshold = 0.5
    def predict(self, images):
        maps = torch.zeros(images.shape[0], *images.shape[-2:])
        maps[:, 100:120, 200:220] = 3.0
        return Prediction(torch.ones(images.shape[0]), maps)


def test_find_regions_8_connected_hand_made_map():
    m = np.zeros((10, 12), np.float32)
    for k in range(4): m[1 + k, 1 + k] = 2.0 + k          # touching only at corners: one region with 8-connectivity
    m[6:8, 7:10] = 1.5
    m[0, 11] = 1.2
    regs = find_regions(m, 1.0)
    assert [r.area for r in regs] == [4, 6, 1]
    assert regs[0].bbox == (1, 1, 5, 5) and regs[0].peak == 5.0 and regs[0].peak_xy == (4, 4)
    assert regs[1].bbox == (7, 6, 10, 8) and regs[1].peak == 1.5
    assert regs[2].bbox == (11, 0, 12, 1)
    assert [r.area for r in find_regions(m, 1.0, min_area=2)] == [4, 6]
    assert find_regions(m, 9.0) == []
    with pytest.raises(ValueError, match='min_area'): find_regions(m, 1.0, min_area=0)


def test_report_contents(fitted):
    al, det, _ = fitted
    x, mask = photo(300, defective=True)
    rep = inspect_panel(x, det, al, pixel_threshold=det.threshold)
    assert isinstance(rep, PanelReport)
    assert rep.aligned and rep.align_ok is True and rep.align_reason == ''
    assert rep.amap.shape == x.shape[1:] and rep.amap.dtype == np.float32
    assert rep.overlay.shape == (*x.shape[1:], 3) and rep.overlay.dtype == np.uint8
    assert rep.decision == ('defect' if rep.score > det.threshold else 'good')
    assert rep.defect is (rep.decision == 'defect')
    want = find_regions(rep.amap, det.threshold)
    assert [(r.area, r.bbox, r.peak) for r in rep.regions] == [(r.area, r.bbox, r.peak) for r in want]
    assert rep.matrix.shape == (3, 3)
    s = json.loads(json.dumps(rep.summary()))
    assert s['decision'] == rep.decision and len(s['regions']) == len(rep.regions) and set(s['seconds']) >= {'align', 'detect', 'report'}


def test_map_goes_back_to_photo_coordinates(fitted):
    al, _, _ = fitted
    x, _ = photo(301, tx=12.0, ty=-7.0, angle_deg=2.5, scale=1.02)
    res = al.align(x)
    assert res.ok, res.reason
    rep = inspect_panel(x, Square(), al)
    ys, xs = np.nonzero(rep.amap > 1.5)
    cx, cy = (res.matrix @ [209.5, 109.5, 1.0])[:2]       # centre of the square in the aligned frame -> photo px
    assert abs(xs.mean() - cx) < 1.0 and abs(ys.mean() - cy) < 1.0
    # the photo was moved by ~12 px: without mapping back the square would sit at (209.5, 109.5)
    assert np.hypot(cx - 209.5, cy - 109.5) > 5
    plain = inspect_panel(x, Square(), None)
    assert plain.amap[110, 210] == 3.0 and not plain.aligned and plain.align_ok is None


class _FailingAligner:
    "Stands in for an Aligner whose transform diverged."
    def align(self, image):
        hw = tuple(image.shape[1:]); eye = np.eye(3)
        return AlignResult(None, eye, eye, eye[:2], 0.9, 0.1, False, 'alignment diverged: shift of 40% of the frame (limit 25%)', hw, hw)


def test_alignment_failure_is_reported_not_passed(fitted):
    al, det, _ = fitted
    blank = torch.full((3, 270, 480), 0.4)
    rep = inspect_panel(blank, det, al)
    assert rep.decision == 'not aligned' and rep.score is None and rep.defect is None and rep.amap is None
    assert 'no product' in rep.align_reason and rep.align_ok is False
    assert rep.overlay.shape == (270, 480, 3)
    x, _ = photo(302)
    rep = inspect_panel(x, det, _FailingAligner())
    assert rep.decision == 'not aligned' and 'diverged' in rep.align_reason
    rep = inspect_panel(x, det, _FailingAligner(), on_align_failure='inspect_unaligned')
    assert rep.decision in ('good', 'defect') and rep.score is not None and not rep.aligned and rep.align_ok is False
    assert 'diverged' in rep.align_reason
    with pytest.raises(ValueError, match='on_align_failure'): inspect_panel(x, det, al, on_align_failure='pass')


def test_different_sizes(fitted):
    assert check_sizes({'a.png': (270, 480), 'b.png': (270, 480)}) == (270, 480)
    with pytest.raises(ValueError, match=r'b\.png is 240x135') as e:
        check_sizes({'a.png': (270, 480), 'b.png': (135, 240), 'c.png': (270, 480), 'd.png': (100, 100)})
    assert 'd.png is 100x100' in str(e.value) and 'c.png' not in str(e.value)
    # a photo of another size is aligned into the template frame; the map comes back at the photo's size
    al, det, _ = fitted
    x, _ = photo(303)
    small = torch.nn.functional.interpolate(x[None], size=(216, 384), mode='bilinear', antialias=True)[0]
    rep = inspect_panel(small, det, al)
    assert rep.aligned and rep.amap.shape == (216, 384)
    # without an aligner a detector that cannot take the size refuses, naming the photo
    with pytest.raises(ValueError, match='odd.png'): inspect_panel(small, det, None, name='odd.png')


def test_save_load_pipeline(fitted, tmp_path):
    al, det, _ = fitted
    p = save_pipeline(tmp_path / 'm.sdm', det, al, {'train_hw': [270, 480]})
    assert aligner_path(p).is_file()
    m, a, info = load_pipeline(p)
    assert isinstance(a, Aligner) and info['train_hw'] == [270, 480] and m.threshold == det.threshold
    assert m.pixel_threshold == det.pixel_threshold and m.calibration == det.calibration
    x, _ = photo(304)
    assert inspect_panel(x, m, a).score == pytest.approx(inspect_panel(x, det, al).score, rel=1e-5)
    assert isinstance(Detector.load(p), ReferenceDetector)          # still an ordinary model file
    other = Aligner(AlignerConfig(stn=STNConfig(steps=1)))
    with torch_threads(1): other.fit([photo(110 + i)[0] for i in range(2)])
    other.save(aligner_path(p))
    with pytest.raises(ValueError, match='not the aligner'): load_pipeline(p)
    os.unlink(aligner_path(p))
    with pytest.raises(FileNotFoundError, match='aligner file'): load_pipeline(p)
    assert load_pipeline(det.save(tmp_path / 'plain.sdm'))[1:] == (None, {})


def test_panel_stages_come_from_the_code_not_from_patches(fitted):
    "The stages are marked by the code that runs them; nothing on the detector is replaced."
    al, det, _ = fitted
    class Marked(ReferenceDetector):
        def predict(self, images):
            with stage('features'): return super().predict(images)
    m = Marked(det.config); m.mean, m.std, m.fitted, m.threshold = det.mean, det.std, True, det.threshold
    before = dict(vars(m))
    rep, secs = panel_stages(m, photo(305)[0], al)
    assert dict(vars(m)).keys() == before.keys() and secs['features'] > 0 and secs['align'] > 0 and secs['report'] > 0
    assert abs(sum(v for k, v in secs.items() if k != 'total') - secs['total']) < 1e-3 + 0.01 * secs['total']


def test_old_model_files_keep_their_pixel_threshold(fitted, tmp_path):
    "Before the pixel threshold moved into the model file it was pipeline metadata; such files still load it."
    al, det, _ = fitted
    old = type(det)(det.config); old.mean, old.std, old.fitted, old.threshold = det.mean, det.std, True, det.threshold
    p = save_pipeline(tmp_path / 'old.sdm', old, al, {'pixel_threshold': 1.5})
    assert load_pipeline(p)[0].pixel_threshold == 1.5


def test_bench_panel_quick_prints_one_json_object():
    from stampdefect.bench import run_bench
    buf = io.StringIO()
    run_bench('panel', quick=True, as_json=True, file=buf)
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 1
    case = json.loads(lines[0])
    assert set(case['stages']) >= {'align', 'tile', 'features', 'search', 'stitch', 'report'}
    assert case['total_s'] > 0 and all(v >= 0 for v in case['stages'].values())
    assert case['stages']['features'] > 0 and case['stages']['align'] > 0 and case['stages']['search'] > 0
    assert abs(sum(case['stages'].values()) - case['total_s']) <= 0.05 * case['total_s'] + 0.01
    assert case['sizes']['H'] == 270 and case['sizes']['W'] == 480


def test_alignment_bench_is_reachable_from_the_cli_registry():
    from stampdefect.bench import BENCH_MODULES
    assert BENCH_MODULES['alignment'] == 'stampdefect.alignment' and BENCH_MODULES['panel'] == 'stampdefect.pipeline'
