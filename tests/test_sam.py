"""Tests of stampdefect.sam: a tiny random SAM through the real loading and masking code, and refused checkpoints."""
import numpy as np
import pytest
import torch

from stampdefect.alignment import Aligner
from stampdefect.sam import TINY_SAM, build_sam, load_sam, sam_config_from_state_dict, sam_mask

pytestmark = pytest.mark.usefixtures('one_thread')   # tiny tensors: one thread (see conftest.py)


@pytest.fixture(scope='module')
def tiny_sam_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('sam') / 'tiny_sam.pth'
    torch.save(build_sam(TINY_SAM).state_dict(), path)
    return path


def test_tiny_random_sam_path_runs(tiny_sam_file):
    sd = torch.load(tiny_sam_file, weights_only=True)
    assert sam_config_from_state_dict(sd) == TINY_SAM
    img = torch.rand(3, 90, 160)
    for kw in [dict(mode='box'), dict(mode='box', box=[10, 10, 150, 80]),
               dict(mode='auto', amg_kwargs=dict(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0))]:
        m = sam_mask(img, tiny_sam_file, **kw)
        assert m.shape == (90, 160) and m.dtype == np.bool_
    sam = load_sam(tiny_sam_file)                                     # an already loaded model works too
    assert sam_mask(img, sam).shape == (90, 160)
    al = Aligner(mask_method='sam', sam=sam)                          # the aligner's SAM path: mask at working size
    m = al.mask_of(img)
    assert m.shape == (90, 160) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1
    with pytest.raises(ValueError, match="mode must be 'box' or 'auto'"): sam_mask(img, sam, mode='points')


def test_sam_checkpoint_errors(tmp_path, tiny_sam_file):
    missing = tmp_path / 'sam_vit_h_4b8939.pth'
    with pytest.raises(FileNotFoundError) as e: load_sam(missing)
    msg = str(e.value)
    assert str(missing) in msg and 'Model Checkpoints' in msg and 'sam_vit_b_01ec64.pth' in msg and 'segment-anything' in msg
    with pytest.raises(FileNotFoundError, match='Model Checkpoints'): sam_mask(torch.rand(3, 32, 32), missing)
    other = tmp_path / 'resnet.pth'; torch.save({'conv1.weight': torch.zeros(2, 3, 3, 3)}, other)
    with pytest.raises(ValueError, match='does not look like a Segment Anything checkpoint') as e: load_sam(other)
    assert str(other) in str(e.value) and 'Model Checkpoints' in str(e.value)
    junk = tmp_path / 'junk.pth'; junk.write_bytes(b'not a checkpoint at all')
    with pytest.raises(ValueError, match='not a readable PyTorch weights file') as e: load_sam(junk)
    assert 'Model Checkpoints' in str(e.value)
    notdict = tmp_path / 'list.pth'; torch.save([torch.zeros(1)], notdict)
    with pytest.raises(ValueError, match='state dict of tensors'): load_sam(notdict)
    with pytest.raises(ValueError, match='does not fit'): load_sam(tiny_sam_file, 'vit_b')
    with pytest.raises(ValueError, match='model_type must be'): load_sam(tiny_sam_file, 'vit_x')
