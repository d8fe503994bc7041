"""The Detector interface: batching, thresholds, and the safe, atomic, versioned model file."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stampdefect.core import (Detector, Prediction, ReferenceDetector, get_detector, iter_batches, atomic_write,
                              FORMAT_NAME, FORMAT_VERSION)


@pytest.fixture
def fitted():
    g = torch.Generator().manual_seed(0)
    x = 0.5 + 0.05 * torch.randn(12, 3, 16, 16, generator=g)
    det = get_detector('reference').fit(x[:8])
    det.calibrate(x[8:], quantile=1.0)
    return det, x


def test_prediction_roundtrip_and_extras():
    p = Prediction(np.ones(2), np.zeros((2, 3, 3)), {'recon': torch.zeros(2, 3, 3, 3)})
    assert isinstance(p.extras['recon'], np.ndarray)
    both = Prediction.concat([p, p])
    assert both.extras['recon'].shape == (4, 3, 3, 3)


def test_threshold_is_max_of_normals_at_quantile_1(fitted):
    det, x = fitted
    assert det.threshold == pytest.approx(det.predict(x[8:]).scores.max())
    assert not det.decide(det.predict(x[8:]).scores).any()


def test_decide_without_threshold_is_an_error():
    det = get_detector('reference').fit(torch.rand(3, 1, 4, 4))
    with pytest.raises(ValueError, match='no threshold'):
        det.decide([1.0])


def test_calibrate_rejects_bad_quantile(fitted):
    det, x = fitted
    with pytest.raises(ValueError, match='quantile'):
        det.calibrate(x, quantile=0)


def test_save_load_identical(fitted, tmp_path):
    det, x = fitted
    det.save(tmp_path / 'm.sdm')
    det2 = Detector.load(tmp_path / 'm.sdm')
    np.testing.assert_array_equal(det.predict(x).maps, det2.predict(x).maps)
    assert det2.threshold == det.threshold
    assert ReferenceDetector.load(tmp_path / 'm.sdm').threshold == det.threshold


def test_interrupted_save_keeps_previous_model(fitted, tmp_path, monkeypatch):
    det, x = fitted
    path = det.save(tmp_path / 'm.sdm')
    before = path.read_bytes()
    import safetensors.torch as st
    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b'half a file')
        raise KeyboardInterrupt
    monkeypatch.setattr(st, 'save_file', boom)
    with pytest.raises(KeyboardInterrupt):
        det.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ['m.sdm']


def test_atomic_write_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        atomic_write(tmp_path / 'no' / 'f.txt', lambda t: t.write_text('x'))


def test_load_refuses_pickles_and_junk(tmp_path, fitted):
    det, _ = fitted
    torch.save({'mean': torch.zeros(1)}, tmp_path / 'pickle.sdm')          # a torch pickle is not accepted
    with pytest.raises(ValueError, match='not a stampdefect model'):
        Detector.load(tmp_path / 'pickle.sdm')
    good = det.save(tmp_path / 'ok.sdm').read_bytes()
    (tmp_path / 'trunc.sdm').write_bytes(good[: len(good) // 2])          # truncated file
    with pytest.raises(ValueError, match='not a stampdefect model'):
        Detector.load(tmp_path / 'trunc.sdm')


def test_load_refuses_unknown_version_method_and_config(tmp_path):
    t = {'mean': torch.zeros(1, 4, 4), 'std': torch.ones(1, 4, 4)}
    base = {'format': FORMAT_NAME, 'format_version': str(FORMAT_VERSION), 'method': 'reference',
            'config': json.dumps({'eps': 0.02}), 'threshold': '1.0'}
    save_file(t, str(tmp_path / 'v2.sdm'), metadata={**base, 'format_version': str(FORMAT_VERSION + 1)})
    with pytest.raises(ValueError, match='format version'):
        Detector.load(tmp_path / 'v2.sdm')
    save_file(t, str(tmp_path / 'm.sdm'), metadata={**base, 'method': 'no-such-method'})
    with pytest.raises(ValueError, match='unknown method'):
        Detector.load(tmp_path / 'm.sdm')
    save_file(t, str(tmp_path / 'c.sdm'), metadata={**base, 'config': json.dumps({'eps': 0.1, 'evil': 1})})
    with pytest.raises(ValueError, match='unknown config option'):
        Detector.load(tmp_path / 'c.sdm')
    save_file({'mean': torch.zeros(1)}, str(tmp_path / 't.sdm'), metadata=base)     # missing tensor
    with pytest.raises(ValueError, match='corrupt or incompatible'):
        Detector.load(tmp_path / 't.sdm')


def test_predict_wrong_shape_and_unfitted(fitted):
    det, _ = fitted
    with pytest.raises(ValueError, match='as in fit'):
        det.predict(torch.rand(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match='not fitted'):
        ReferenceDetector().predict(torch.rand(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match='not fitted'):
        ReferenceDetector().save('x.sdm')


def test_iter_batches_numpy_and_mixed():
    assert [b.shape[0] for b in iter_batches(np.random.rand(5, 1, 4, 4).astype(np.float32), 2)] == [2, 2, 1]
    batches = list(iter_batches([torch.rand(3, 4, 4), torch.rand(2, 3, 4, 4)], 4))
    assert [b.shape[0] for b in batches] == [1, 2]


def test_save_with_extra_metadata(fitted, tmp_path):
    from safetensors import safe_open
    fitted, _ = fitted
    p = fitted.save(tmp_path / 'm.sdm', extra_metadata={'my_app': '{"line": 3}'})
    with safe_open(str(p), framework='pt') as f: assert f.metadata()['my_app'] == '{"line": 3}'
    assert Detector.load(p).threshold == fitted.threshold
    with pytest.raises(ValueError, match='must not replace'): fitted.save(tmp_path / 'n.sdm', extra_metadata={'method': 'x'})
    with pytest.raises(TypeError, match='strings'): fitted.save(tmp_path / 'n.sdm', extra_metadata={'k': 1})
    assert not (tmp_path / 'n.sdm').exists()
