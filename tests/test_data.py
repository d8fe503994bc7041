"Tests for stampdefect.data: loading images, masks and folder datasets, and every bad-input case."
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import torch.nn.functional as F
from stampdefect.data import (BadFilesWarning, FolderDataset, ImageNotFoundError, ImageReadError, MaskError,
                              collate_items, find_mask, iter_item_batches, list_images, load_image, load_mask,
                              magnetic_tile_dir, resize_image, resize_mask)

HW = (24, 32)


def write(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def box_mask(i: int = 0, hw=HW, value: int = 255) -> np.ndarray:
    m = np.zeros(hw, np.uint8)
    m[4:10, 5 + i:12 + i] = value
    return m


def make_mvtec(root: Path, defects=None, n_train=3, n_good=2, gray=False) -> Path:
    "MVTec-AD-layout toy dataset: random 24x32 images, rectangular masks (6x7 pixels)."
    defects = {'crack': 2, 'scratch': 1} if defects is None else defects
    rng = np.random.default_rng(0)
    shape = HW if gray else (*HW, 3)
    img = lambda: rng.integers(0, 256, shape, dtype=np.uint8)
    for i in range(n_train): write(root / 'train/good' / f'{i:03d}.png', img())
    for i in range(n_good): write(root / 'test/good' / f'{i:03d}.png', img())
    for t, n in defects.items():
        for i in range(n):
            write(root / 'test' / t / f'{i:03d}.png', img())
            write(root / 'ground_truth' / t / f'{i:03d}_mask.png', box_mask(i))
    return root


@pytest.fixture
def mvtec(tmp_path):
    return make_mvtec(tmp_path / 'mvtec')


@pytest.fixture
def plain(tmp_path):
    "ok/ (2 gray normals), defective/ (2 RGB jpgs), labels/ (one {0,1} mask by stem, one {0,255} with _mask)."
    p = tmp_path / 'plain'
    for i in range(2): write(p / 'ok' / f'ok{i}.png', np.full(HW, 100 + i, np.uint8))
    for i in range(2): write(p / 'defective' / f'd{i}.jpg', np.full((*HW, 3), 50, np.uint8))
    write(p / 'labels/d0.png', box_mask(value=1))
    write(p / 'labels/d1_mask.png', box_mask())
    return p


# ---------------------------------------------------------------- load_image

def test_load_image_rgb_gray_and_channels(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8); rgb[..., 0] = 255
    write(tmp_path / 'rgb.png', rgb)
    x = load_image(tmp_path / 'rgb.png')
    assert x.shape == (3, 4, 6) and x.dtype == torch.float32
    assert x[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert load_image(tmp_path / 'rgb.png', channels=1)[0, 0, 0].item() == pytest.approx(0.299, abs=1e-3)
    assert load_image(tmp_path / 'rgb.png', channels=None).shape == (3, 4, 6)
    write(tmp_path / 'gray.png', np.full((4, 6), 51, np.uint8))
    assert load_image(tmp_path / 'gray.png', channels=None).shape == (1, 4, 6)
    g = load_image(tmp_path / 'gray.png', channels=3)
    assert g.shape == (3, 4, 6) and torch.allclose(g, torch.full_like(g, 0.2))


def test_load_image_palette_rgba_16bit(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8); rgb[..., 1] = 255
    Image.fromarray(rgb).convert('P').save(tmp_path / 'pal.png')
    assert load_image(tmp_path / 'pal.png', channels=None)[:, 0, 0].tolist() == [0.0, 1.0, 0.0]
    rgba = np.dstack([rgb, np.full((4, 6), 255, np.uint8)]); rgba[0, 0, 3] = 0
    write(tmp_path / 'rgba.png', rgba)
    xa = load_image(tmp_path / 'rgba.png', channels=None)
    assert xa.shape == (3, 4, 6) and xa[:, 0, 0].tolist() == [0.0, 0.0, 0.0] and xa[1, 0, 1] == 1.0
    write(tmp_path / 'g16.png', np.array([[0, 1, 65535]], np.uint16))
    g16 = load_image(tmp_path / 'g16.png', channels=None)
    assert g16.shape == (1, 1, 3)
    assert g16[0, 0].tolist() == pytest.approx([0.0, 1 / 65535, 1.0], abs=1e-7)


@pytest.mark.parametrize('channels', [2, 4, 0, 'rgb', True, 3.0])
def test_load_image_wrong_channels(tmp_path, channels):
    write(tmp_path / 'a.png', np.zeros((4, 6), np.uint8))
    with pytest.raises(ValueError, match='channels must be 1'):
        load_image(tmp_path / 'a.png', channels=channels)


def test_load_image_missing_corrupt_truncated(tmp_path):
    with pytest.raises(ImageNotFoundError, match='nothere.png'):
        load_image(tmp_path / 'nothere.png')
    with pytest.raises(FileNotFoundError):                     # also a FileNotFoundError
        load_image(tmp_path / 'nothere.png')
    (tmp_path / 'garbage.png').write_bytes(b'definitely not a png')
    with pytest.raises(ImageReadError, match='garbage.png'):
        load_image(tmp_path / 'garbage.png')
    big = write(tmp_path / 'big.png', np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / 'cut.png').write_bytes(big.read_bytes()[:300])
    with pytest.raises(ImageReadError, match='cut.png'):
        load_image(tmp_path / 'cut.png')
    with pytest.raises(ImageReadError, match='not a file'):
        load_image(tmp_path)


# ---------------------------------------------------------------- load_mask

def test_load_mask_binary_encodings(tmp_path):
    ref = torch.from_numpy(box_mask() > 0)
    for name, a in [('m255.png', box_mask()), ('m01.png', box_mask(value=1)),
                    ('m16.png', box_mask().astype(np.uint16) * 257), ('mbool.png', box_mask() > 0)]:
        m = load_mask(write(tmp_path / name, a), HW)
        assert m.dtype == torch.bool and torch.equal(m, ref), name
    red = np.zeros((*HW, 3), np.uint8); red[box_mask() > 0] = (255, 0, 0)
    assert torch.equal(load_mask(write(tmp_path / 'red.png', red)), ref)
    assert not load_mask(write(tmp_path / 'zero.png', np.zeros(HW, np.uint8))).any()


def test_load_mask_not_binary(tmp_path):
    aa = box_mask(); aa[3, 5] = 100; aa[10, 6] = 200
    p = write(tmp_path / 'aa.png', aa)
    with pytest.raises(MaskError, match=r'aa\.png is not binary'):
        load_mask(p)
    m = load_mask(p, binarize=True)
    assert m[10, 6] and not m[3, 5] and m.sum() == box_mask().astype(bool).sum() + 1
    labels = write(tmp_path / 'labels.png', np.array([[0, 1, 2, 3]], np.uint8))
    with pytest.raises(MaskError, match='label map'):
        load_mask(labels, binarize=True)


def test_load_mask_size_mismatch_names_both_files(tmp_path):
    p = write(tmp_path / 'm.png', box_mask())
    with pytest.raises(MaskError) as e:
        load_mask(p, (20, 32), image_path=tmp_path / 'photo.png')
    msg = str(e.value)
    assert 'm.png' in msg and 'photo.png' in msg and '24x32' in msg and '20x32' in msg


def test_load_mask_missing_or_corrupt(tmp_path):
    with pytest.raises(ImageNotFoundError, match='mask file not found'):
        load_mask(tmp_path / 'none.png')
    (tmp_path / 'bad.png').write_bytes(b'xx')
    with pytest.raises(ImageReadError, match='bad.png'):
        load_mask(tmp_path / 'bad.png')


# ---------------------------------------------------------------- list_images, find_mask

def test_list_images(tmp_path):
    for name in ['b.PNG', 'a.jpg', 'c.TIFF', 'd.bmp', 'e.jpeg', 'f.tif', 'notes.txt', '._a.jpg']:
        (tmp_path / name).write_bytes(b'')
    (tmp_path / 'dir.png').mkdir()
    assert [p.name for p in list_images(tmp_path)] == ['a.jpg', 'b.PNG', 'c.TIFF', 'd.bmp', 'e.jpeg', 'f.tif']


def test_list_images_missing_empty_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match='image folder not found'):
        list_images(tmp_path / 'missing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='it is empty'):
        list_images(tmp_path / 'empty')
    assert list_images(tmp_path / 'empty', allow_empty=True) == []
    (tmp_path / 'txt').mkdir(); (tmp_path / 'txt/readme.txt').write_text('x')
    with pytest.raises(ValueError, match='readme.txt'):
        list_images(tmp_path / 'txt')
    (tmp_path / 'file.png').write_bytes(b'')
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / 'file.png')


def test_find_mask(tmp_path):
    for name in ['000_mask.png', '001.png', '002_mask.png', '002.bmp']: (tmp_path / name).write_bytes(b'')
    assert find_mask('x/000.jpg', tmp_path).name == '000_mask.png'
    assert find_mask('001.JPG', tmp_path).name == '001.png'
    assert find_mask('003.png', tmp_path) is None
    with pytest.raises(ValueError, match='ambiguous'):
        find_mask('002.png', tmp_path)


# ---------------------------------------------------------------- FolderDataset, MVTec layout

def test_mvtec_train_and_test(mvtec):
    train = FolderDataset(mvtec, 'train')
    assert len(train) == 3 and train.labels.tolist() == [0, 0, 0] and train.defect_types == ['good'] * 3
    test = FolderDataset(mvtec, 'test')
    assert len(test) == 5
    assert test.type_counts == {'good': 2, 'crack': 2, 'scratch': 1}
    assert test.labels.dtype == torch.int64 and test.labels.tolist() == [0, 0, 1, 1, 1]
    assert test.paths[3] == str(mvtec / 'test/crack/001.png')
    assert test.has_masks
    it = test[3]
    assert set(it) == {'image', 'mask', 'label', 'defect_type', 'path', 'mask_path'}
    assert it['image'].shape == (3, *HW) and it['image'].dtype == torch.float32
    assert 0 <= it['image'].min() and it['image'].max() <= 1
    assert it['mask'].shape == (1, *HW) and it['mask'].dtype == torch.float32
    assert torch.equal(it['mask'][0], torch.from_numpy(box_mask(1) > 0).float())
    assert (it['label'], it['defect_type']) == (1, 'crack')
    assert it['mask_path'] == str(mvtec / 'ground_truth/crack/001_mask.png')
    normal = test[0]
    assert normal['mask'].sum() == 0 and normal['label'] == 0 and normal['mask_path'] == ''
    assert test[-1]['defect_type'] == 'scratch'
    with pytest.raises(IndexError):
        test[5]


def test_mvtec_grayscale_resize_native(tmp_path):
    root = make_mvtec(tmp_path / 'g', gray=True)
    native = FolderDataset(root, 'test', channels=None)
    assert native[0]['image'].shape == (1, *HW)
    assert FolderDataset(root, 'test')[0]['image'].shape == (3, *HW)
    small = FolderDataset(root, 'test', channels=1, size=(12, 16))
    it = small[2]
    assert it['image'].shape == (1, 12, 16) and it['mask'].shape == (1, 12, 16)
    assert set(it['mask'].unique().tolist()) == {0.0, 1.0}
    assert it['mask'].sum() == pytest.approx(6 * 7 / 4, abs=4)
    assert FolderDataset(root, 'test', size=8)[1]['image'].shape == (3, 8, 8)
    up = FolderDataset(root, 'test', size=(48, 64))[2]
    assert up['image'].shape == (3, 48, 64) and up['mask'].sum() == 6 * 7 * 4


def test_mvtec_defect_type_subset(mvtec):
    ds = FolderDataset(mvtec, 'test', defect_types=['scratch', 'good'])
    assert ds.type_counts == {'good': 2, 'scratch': 1}
    assert FolderDataset(mvtec, 'test', defect_types='crack').labels.tolist() == [1, 1]
    with pytest.raises(ValueError, match="available"):
        FolderDataset(mvtec, 'test', defect_types=['dent'])
    with pytest.raises(ValueError, match="available"):
        FolderDataset(mvtec, 'test', defect_types=[])


def test_mvtec_missing_folders(tmp_path, mvtec):
    with pytest.raises(FileNotFoundError, match='dataset root not found'):
        FolderDataset(tmp_path / 'nowhere')
    only_train = make_mvtec(tmp_path / 'ot', defects={}, n_good=0)
    with pytest.raises(FileNotFoundError, match='test not found'):
        FolderDataset(only_train, 'test')
    with pytest.raises(ValueError, match='split must be'):
        FolderDataset(mvtec, 'val')
    (mvtec / 'train/crack').mkdir()
    with pytest.raises(ValueError, match='defect-free'):
        FolderDataset(mvtec, 'train')


def test_mvtec_empty_defect_folder(mvtec):
    (mvtec / 'test/dent').mkdir()
    with pytest.raises(ValueError, match='dent'):
        FolderDataset(mvtec, 'test')


def test_mvtec_mask_missing_is_error_naming_image(mvtec):
    (mvtec / 'ground_truth/crack/001_mask.png').unlink()
    with pytest.raises(ValueError, match=r'test/crack/001\.png'):
        FolderDataset(mvtec, 'test')
    assert len(FolderDataset(mvtec, 'train')) == 3               # train does not need masks


def test_missing_masks_error_is_capped(tmp_path):
    root = make_mvtec(tmp_path / 'r', defects={'crack': 25})
    for m in (root / 'ground_truth/crack').iterdir(): m.unlink()
    with pytest.raises(ValueError, match=r'(?s)25 defective image.*and 5 more') as e:
        FolderDataset(root, 'test')
    assert 'test/crack/000.png' in str(e.value)


def test_mvtec_ground_truth_folder_missing(tmp_path):
    root = make_mvtec(tmp_path / 'r', defects={'crack': 1})
    write(root / 'test/hole/000.png', np.zeros((*HW, 3), np.uint8))
    with pytest.raises(ValueError, match='ground_truth/hole does not exist'):
        FolderDataset(root, 'test')


def test_mvtec_corrupt_image_on_load(mvtec):
    (mvtec / 'test/crack/000.png').write_bytes(b'\x89PNG garbage')
    ds = FolderDataset(mvtec, 'test')                            # names are fine: construction passes
    with pytest.raises(ImageReadError, match=r'test/crack/000\.png'):
        ds[2]


def test_mvtec_mask_other_size(mvtec):
    write(mvtec / 'ground_truth/crack/001_mask.png', np.zeros((20, 32), np.uint8))
    ds = FolderDataset(mvtec, 'test')
    with pytest.raises(MaskError) as e:
        ds[3]
    msg = str(e.value)
    assert 'ground_truth/crack/001_mask.png is 20x32' in msg and 'test/crack/001.png is 24x32' in msg


def test_mvtec_mask_not_binary(mvtec):
    aa = box_mask(); aa[3, 5:12] = 90
    write(mvtec / 'ground_truth/scratch/000_mask.png', aa)
    with pytest.raises(MaskError, match=r'scratch/000_mask\.png is not binary'):
        FolderDataset(mvtec, 'test')[4]
    it = FolderDataset(mvtec, 'test', binarize_masks=True)[4]
    assert it['mask'].sum() == 6 * 7


@pytest.mark.parametrize('size', [0, -1, (4,), (4, 0), 2.5, True, '32', (4.0, 4)])
def test_bad_size(mvtec, size):
    with pytest.raises(ValueError, match='size must be'):
        FolderDataset(mvtec, size=size)


@pytest.mark.parametrize('channels', [2, 'gray', False])
def test_dataset_wrong_channels(mvtec, channels):
    with pytest.raises(ValueError, match='channels must be'):
        FolderDataset(mvtec, channels=channels)


def test_skip_bad_warns_once_listing_all(mvtec):
    (mvtec / 'test/crack/000.png').write_bytes(b'garbage')                           # corrupt image
    write(mvtec / 'ground_truth/crack/001_mask.png', np.zeros((20, 32), np.uint8))   # wrong size
    write(mvtec / 'ground_truth/scratch/000_mask.png', np.full(HW, 128, np.uint8))   # not binary
    (mvtec / 'test/good/001.png').write_bytes(b'')                                   # empty file
    with pytest.warns(BadFilesWarning) as record:
        ds = FolderDataset(mvtec, 'test', skip_bad=True)
    assert len(record) == 1
    msg = str(record[0].message)
    for name in ['test/crack/000.png', 'test/crack/001.png', 'test/scratch/000.png', 'test/good/001.png']:
        assert name in msg, name
    assert 'dropped 4 of 5' in msg
    assert ds.paths == [str(mvtec / 'test/good/000.png')]
    ds[0]


def test_skip_bad_lists_missing_masks_and_clean_data_warns_nothing(tmp_path):
    clean = make_mvtec(tmp_path / 'clean')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert len(FolderDataset(clean, 'test', skip_bad=True)) == 5
    root = make_mvtec(tmp_path / 'r')
    (root / 'ground_truth/crack/000_mask.png').unlink()
    with pytest.warns(BadFilesWarning, match=r'test/crack/000\.png'):
        ds = FolderDataset(root, 'test', skip_bad=True)
    assert len(ds) == 4


def test_skip_bad_nothing_left(tmp_path):
    root = make_mvtec(tmp_path / 'r', defects={}, n_train=1)
    (root / 'train/good/000.png').write_bytes(b'junk')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ValueError, match='dropped every image'):
            FolderDataset(root, skip_bad=True)


# ---------------------------------------------------------------- FolderDataset.from_folders

def test_plain_layout(plain):
    ds = FolderDataset.from_folders(plain / 'ok', plain / 'defective', plain / 'labels', channels=1)
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.defect_types == ['good', 'good', 'defective', 'defective']
    assert [ds[i]['mask'].sum().item() for i in range(4)] == [0, 0, 42, 42]
    assert ds[2]['mask_path'].endswith('labels/d0.png') and ds[3]['mask_path'].endswith('labels/d1_mask.png')
    assert ds[0]['image'].shape == (1, *HW)
    assert ds[1]['image'].mean().item() == pytest.approx(101 / 255, abs=1e-6)
    rgb = FolderDataset.from_folders(plain / 'ok', plain / 'defective', plain / 'labels', size=16, defect_type='dent')
    assert rgb[0]['image'].shape == (3, 16, 16) and rgb.type_counts == {'good': 2, 'dent': 2}
    assert len(FolderDataset.from_folders(plain / 'ok')) == 2


def test_plain_without_masks_has_unknown_masks(plain):
    ds = FolderDataset.from_folders(plain / 'ok', plain / 'defective')
    assert not ds.has_masks
    assert torch.isnan(ds[2]['mask']).all() and ds[0]['mask'].sum() == 0


def test_plain_bad_inputs(tmp_path, plain):
    with pytest.raises(FileNotFoundError, match='image folder not found'):
        FolderDataset.from_folders(tmp_path / 'nope')
    with pytest.raises(FileNotFoundError, match='nope'):
        FolderDataset.from_folders(plain / 'ok', tmp_path / 'nope')
    with pytest.raises(FileNotFoundError, match='mask folder not found'):
        FolderDataset.from_folders(plain / 'ok', plain / 'defective', tmp_path / 'nope')
    with pytest.raises(ValueError, match='without abnormal_dir'):
        FolderDataset.from_folders(plain / 'ok', mask_dir=plain / 'labels')
    with pytest.raises(ValueError, match='needs normal_dir'):
        FolderDataset.from_folders()
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='it is empty'):
        FolderDataset.from_folders(tmp_path / 'empty')
    (plain / 'labels/d1_mask.png').unlink()                      # mask missing
    with pytest.raises(ValueError, match=r'defective/d1\.jpg'):
        FolderDataset.from_folders(plain / 'ok', plain / 'defective', plain / 'labels')


def test_plain_mask_other_size(plain):
    write(plain / 'labels/d0.png', np.zeros((10, 10), np.uint8))
    ds = FolderDataset.from_folders(plain / 'ok', plain / 'defective', plain / 'labels')
    with pytest.raises(MaskError, match=r'labels/d0\.png is 10x10.*defective/d0\.jpg is 24x32'):
        ds[2]


# ---------------------------------------------------------------- resizing

@pytest.mark.parametrize('shape,hw', [((48, 20), (16, 16)), ((17, 23), (40, 31)), ((30, 40), (7, 9))])
def test_resize_matches_torch(shape, hw):
    rng = np.random.default_rng(0)
    a = rng.random((*shape, 3), dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(a).permute(2, 0, 1)[None], size=hw, mode='bilinear', antialias=True,
                        align_corners=False)[0].permute(1, 2, 0).numpy()
    out = resize_image(a, hw)
    assert out.shape == (*hw, 3) and np.abs(out - ref).max() < 1e-5
    m = (rng.random(shape) > 0.5).astype(np.float32)
    ref_m = F.interpolate(torch.from_numpy(m)[None, None], size=hw, mode='nearest-exact')[0, 0].numpy()
    assert np.array_equal(resize_mask(m, hw), ref_m)


# ---------------------------------------------------------------- batches

def test_iter_batches(mvtec):
    ds = FolderDataset(mvtec, 'test')
    batches = list(iter_item_batches(ds, 2))
    assert [b['image'].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]['image'].shape == (2, 3, *HW) and batches[0]['mask'].shape == (2, 1, *HW)
    assert torch.cat([b['label'] for b in batches]).tolist() == ds.labels.tolist()
    assert sum((b['path'] for b in batches), []) == ds.paths
    assert [b['image'].shape[0] for b in iter_item_batches(torch.zeros(5, 1, 4, 4), 3)] == [3, 2]


def test_iter_batches_workers(mvtec):
    ds = FolderDataset(mvtec, 'test')
    b = list(iter_item_batches(ds, 4, num_workers=1))
    assert [x['label'].tolist() for x in b] == [[0, 0, 1, 1], [1]]
    assert torch.equal(b[0]['image'], next(iter_item_batches(ds, 4))['image'])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_items)
    assert [x['image'].shape[0] for x in loader] == [3, 2]


def test_iter_batches_size_mismatch(tmp_path):
    write(tmp_path / 'imgs/a.png', np.zeros((4, 6, 3), np.uint8))
    write(tmp_path / 'imgs/b.png', np.zeros((5, 6, 3), np.uint8))
    ds = FolderDataset.from_folders(tmp_path / 'imgs')
    with pytest.raises(ValueError, match=r'b\.png is 3x5x6.*size='):
        list(iter_item_batches(ds, 2))
    assert next(iter_item_batches(FolderDataset.from_folders(tmp_path / 'imgs', size=(5, 6)), 2))['image'].shape == (2, 3, 5, 6)


@pytest.mark.parametrize('kwargs', [dict(batch_size=0), dict(batch_size=2.0), dict(batch_size=2, num_workers=-1)])
def test_iter_batches_bad_args(mvtec, kwargs):
    with pytest.raises(ValueError):
        iter_item_batches(FolderDataset(mvtec), **kwargs)
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'):
        iter_item_batches(torch.zeros(3, 4, 4), 2)
    with pytest.raises(ValueError, match='no items'):
        collate_items([])


# ---------------------------------------------------------------- real data

def test_magnetic_tile_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv('STAMPDEFECT_MAGNETIC_TILE', str(tmp_path / 'nope'))
    with pytest.raises(FileNotFoundError, match='STAMPDEFECT_MAGNETIC_TILE'):
        magnetic_tile_dir()
    root = make_mvtec(tmp_path / 'mt')
    monkeypatch.setenv('STAMPDEFECT_MAGNETIC_TILE', str(root))
    assert magnetic_tile_dir() == root


@pytest.fixture
def magnetic_tile(monkeypatch):
    monkeypatch.delenv('STAMPDEFECT_MAGNETIC_TILE', raising=False)
    root = magnetic_tile_dir()
    if root is None: pytest.skip('../shared/datasets/magnetic_tile is not on this machine')
    return root


def test_magnetic_tile(magnetic_tile):
    train = FolderDataset(magnetic_tile, 'train', size=(64, 64))
    assert len(train) == 339 and train.labels.sum() == 0
    test = FolderDataset(magnetic_tile, 'test', size=(64, 64), binarize_masks=True)
    assert test.type_counts == {'good': 155, 'blowhole': 60, 'break': 41, 'crack': 30, 'fray': 13, 'uneven': 50}
    assert test.has_masks
    with pytest.raises(MaskError, match='not binary'):                   # the real masks are anti-aliased
        FolderDataset(magnetic_tile, 'test', defect_types=['crack'])[0]
    crack = FolderDataset(magnetic_tile, 'test', defect_types=['crack'], size=(64, 64), binarize_masks=True,
                          channels=1)
    b = next(iter_item_batches(crack, 8))
    assert b['image'].shape == (8, 1, 64, 64) and b['label'].tolist() == [1] * 8
    assert set(b['mask'].unique().tolist()) == {0.0, 1.0}
    native = FolderDataset(magnetic_tile, 'test', defect_types=['crack'], binarize_masks=True, channels=None)
    it = native[0]
    assert it['image'].shape[0] == 1 and it['image'].shape[1:] == it['mask'].shape[1:]
    assert it['mask'].sum() > 0
