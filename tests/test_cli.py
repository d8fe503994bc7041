"""The `stampdefect` command: round trip and bad input (one-line errors, exit code 2, no traceback)."""
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stampdefect.cli import main


def _img(path, rng, scratch=False, mode='RGB', size=24):
    a = (128 + rng.normal(0, 4, (size, size, 3))).clip(0, 255).astype(np.uint8)
    if scratch: a[8:10, 3:21] = 15
    im = Image.fromarray(a)
    if mode != 'RGB': im = im.convert(mode)
    im.save(path)


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / 'good').mkdir(); (tmp_path / 'new').mkdir(); (tmp_path / 'empty').mkdir()
    for k in range(6): _img(tmp_path / 'good' / f'{k}.png', rng)
    _img(tmp_path / 'new' / 'a_ok.png', rng)
    _img(tmp_path / 'new' / 'b_scratch.png', rng, scratch=True)
    return tmp_path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def fit(capsys, d, out='m.sdm', *extra):
    return run(capsys, 'fit', '--method', 'reference', '--data', d / 'good', '--out', d / out, '--quantile', '1', *extra)


def test_fit_inspect_roundtrip(folders, capsys):
    code, out, err = fit(capsys, folders)
    assert code == 0 and 'threshold' in out
    code, out, err = run(capsys, 'inspect', folders / 'm.sdm', folders / 'new', '--out', folders / 'res', '--quiet')
    assert code == 1                                  # a defect found
    rows = json.loads((folders / 'res' / 'results.json').read_text())['results']
    assert [r['defect'] for r in rows] == [False, True]
    assert all((folders / 'res' / r['overlay']).is_file() for r in rows)
    assert (folders / 'res' / 'results.csv').read_text().count('\n') == 3


@pytest.mark.parametrize('method', ['mna', 'vqvae_ar'])
def test_fit_inspect_trained_methods(folders, capsys, method, tmp_path):
    "The CLI fits methods whose fit takes other options than PatchCore's (no batch_size), with a tiny config."
    (tmp_path / 'big').mkdir()
    rng = np.random.default_rng(1)
    for k in range(4): _img(tmp_path / 'big' / f'{k}.png', rng, size=32)
    tiny = {'patch_size': 16, 'vqvae_steps': 2, 'prior_steps': 2, 'vqvae_batch': 2, 'prior_batch': 2, 'calib_patches': 4,
            'device': 'cpu', 'vqvae': {'hidden_channels': 8, 'residual_channels': 4, 'n_residual_blocks': 1,
                                       'codebook_size': 8, 'code_dim': 4, 'perceptual_weight': 0.0},
            'prior': {'u2net': 'small', 'width': 0.25, 'blocks': ['4F'], 'side_channels': 4, 'head_channels': 8}
                     if method == 'mna' else {'channels': 8, 'n_blocks': 1}}
    (tmp_path / 'tiny.json').write_text(json.dumps(tiny))
    code, out, err = run(capsys, 'fit', '--method', method, '--data', tmp_path / 'big', '--config', tmp_path / 'tiny.json',
                         '--out', tmp_path / 'm.sdm', '--quantile', '1', '--quiet')
    assert code == 0, err
    assert f'fitted {method}' in out
    code, out, err = run(capsys, 'inspect', tmp_path / 'm.sdm', tmp_path / 'big', '--out', tmp_path / 'res', '--quiet')
    assert code in (0, 1), err
    assert len(json.loads((tmp_path / 'res' / 'results.json').read_text())['results']) == 4


def test_fit_notes_when_the_quantile_is_the_maximum(folders, capsys, tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / 'many').mkdir()
    for k in range(20): _img(tmp_path / 'many' / f'{k}.png', rng)
    argv = ['fit', '--method', 'reference', '--data', tmp_path / 'many', '--out', tmp_path / 'm.sdm', '--calib-fraction', '0.5']
    code, out, err = run(capsys, *argv, '--quantile', '0.99')       # 10 held out: the 0.99 quantile is their maximum
    assert code == 0 and 'with 10 held-out image(s) the 0.99 quantile is their largest score' in err
    assert '--quantile 0.88 or lower' in err
    code, out, err = run(capsys, *argv, '--quantile', '0.8')
    assert code == 0 and 'largest score' not in err


def test_inspect_clean_folder_exit_0(folders, capsys):
    fit(capsys, folders)
    code, *_ = run(capsys, 'inspect', folders / 'm.sdm', folders / 'new' / 'a_ok.png', '--out', folders / 'res', '--quiet')
    assert code == 0


def test_corrupt_image_among_many_is_skipped(folders, capsys):
    fit(capsys, folders)
    (folders / 'new' / 'c_corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    code, out, err = run(capsys, 'inspect', folders / 'm.sdm', folders / 'new', '--out', folders / 'res', '--quiet')
    assert code == 1 and 'c_corrupt.png' in err
    res = json.loads((folders / 'res' / 'results.json').read_text())
    assert len(res['results']) == 2 and Path(res['skipped'][0]['image']).name == 'c_corrupt.png'


@pytest.mark.parametrize('case', ['missing_model', 'corrupt_model', 'empty_folder', 'missing_input', 'unwritable_out',
                                  'fit_empty', 'fit_missing', 'bad_config', 'unknown_method'])
def test_bad_input_one_line_exit_2(folders, capsys, case):
    fit(capsys, folders)
    m, new, res = folders / 'm.sdm', folders / 'new', folders / 'res'
    (folders / 'afile').write_text('x')
    argv = {
        'missing_model': ('inspect', folders / 'nope.sdm', new, '--out', res),
        'corrupt_model': ('inspect', folders / 'good' / '0.png', new, '--out', res),
        'empty_folder': ('inspect', m, folders / 'empty', '--out', res),
        'missing_input': ('inspect', m, folders / 'nothere', '--out', res),
        'unwritable_out': ('inspect', m, new, '--out', folders / 'afile' / 'sub'),
        'fit_empty': ('fit', '--method', 'reference', '--data', folders / 'empty', '--out', folders / 'x.sdm'),
        'fit_missing': ('fit', '--method', 'reference', '--data', folders / 'nothere', '--out', folders / 'x.sdm'),
        'bad_config': ('fit', '--method', 'reference', '--data', folders / 'good', '--out', folders / 'x.sdm', '--set', 'nonsense=1'),
        'unknown_method': ('fit', '--method', 'nosuch', '--data', folders / 'good', '--out', folders / 'x.sdm'),
    }[case]
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, err)
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and 'error' in lines[0] and 'Traceback' not in err, err


def test_unsupported_channel_count_is_a_usage_error(folders):
    with pytest.raises(SystemExit) as e:
        main(['fit', '--method', 'reference', '--data', str(folders / 'good'), '--out', str(folders / 'x.sdm'), '--channels', '2'])
    assert e.value.code == 2


def test_model_of_other_channels_is_refused(folders, capsys):
    """A model fitted on grey images given colour ones: the message names the expected shape."""
    fit(capsys, folders, 'grey.sdm', '--channels', '1')
    code, out, err = run(capsys, 'inspect', folders / 'grey.sdm', folders / 'new', '--out', folders / 'res')
    assert code == 2 and 'expected shape' in err


def test_help_for_every_command():
    for cmd in ['fit', 'inspect', 'evaluate', 'demo', 'bench']:
        r = subprocess.run([sys.executable, '-c', 'import sys; from stampdefect.cli import main; sys.exit(main())', cmd, '--help'], capture_output=True, text=True)
        assert r.returncode == 0 and 'usage: stampdefect' in r.stdout, (cmd, r.stderr)


# -- raw panel photos: --align / --tile, the pipeline behind fit / inspect / evaluate / demo ---------------------------

@pytest.fixture(scope='module')
def panels(tmp_path_factory):
    "A small MVTec-layout set of synthetic panels (480x270): 4 train, 1 good + 1 cracked test; and a blank photo."
    from stampdefect.synthetic import make_panel_dataset, SAMPLE_CONFIG
    root = tmp_path_factory.mktemp('panels')
    make_panel_dataset(root / 'set', n_train=4, n_test_good=1, n_test_defect=1, size=(270, 480), config=SAMPLE_CONFIG,
                       seed=3, compress_level=1)
    new = root / 'new'; new.mkdir()
    for f in sorted((root / 'set' / 'test').rglob('*.png')): (new / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    Image.fromarray(np.full((270, 480, 3), 100, np.uint8)).save(new / 'z_blank.png')
    return root


def fit_aligned(capsys, root, out='pc.sdm', *extra):
    return run(capsys, 'fit', '--method', 'patchcore', '--data', root / 'set', '--out', root / out, '--align', 'classical',
               '--align-steps', '20', '--tile', '128', '--stride', '64', '--set', 'coreset_ratio=0.05', '--quantile', '1', *extra)


def test_align_tile_roundtrip(panels, capsys):
    code, out, err = fit_aligned(capsys, panels)
    assert code == 0, err
    assert (panels / 'pc.sdm').is_file() and (panels / 'pc.sdm.aligner').is_file() and 'pixel threshold' in out
    from stampdefect.pipeline import load_pipeline
    det, al, info = load_pipeline(panels / 'pc.sdm')
    assert (det.config.tile_size, det.config.tile_stride, det.config.image_size) == (128, 64, None)
    assert al is not None and info['train_hw'] == [270, 480] and info['pixel_threshold'] > 0
    code, out, err = run(capsys, 'inspect', panels / 'pc.sdm', panels / 'new', '--out', panels / 'res', '--quiet')
    assert code == 1                                   # the blank photo is not aligned: a finding, never "good"
    rows = {Path(r['image']).name: r for r in json.loads((panels / 'res' / 'results.json').read_text())['results']}
    assert rows['z_blank.png']['status'] == 'not aligned' and rows['z_blank.png']['defect'] is None
    assert rows['z_blank.png']['score'] is None and 'no product' in rows['z_blank.png']['align_reason']
    assert 'z_blank.png' in err and 'not aligned' in err
    for name in ('good_000.png', 'crack_000.png'):
        assert rows[name]['aligned'] is True and rows[name]['status'] in ('good', 'defect') and rows[name]['score'] is not None
        assert Image.open(panels / 'res' / rows[name]['overlay']).size == (480, 270)
    assert 'not aligned' in (panels / 'res' / 'results.csv').read_text()
    code, out, err = run(capsys, 'inspect', panels / 'pc.sdm', panels / 'new' / 'z_blank.png', '--out', panels / 'res2',
                         '--quiet', '--on-align-failure', 'inspect_unaligned')
    row = json.loads((panels / 'res2' / 'results.json').read_text())['results'][0]
    assert row['score'] is not None and row['aligned'] is False and 'no product' in row['align_reason']
    code, out, err = run(capsys, 'evaluate', panels / 'pc.sdm', '--data', panels / 'set', '--json')
    assert code == 0, err
    res = json.loads(out)
    assert res['aligned'] is True and res['not_aligned'] == [] and res['n_images'] == 2 and 0 <= res['pixel_auroc'] <= 1


def test_align_tile_bad_input(panels, capsys, tmp_path):
    code, out, err = run(capsys, 'fit', '--method', 'reference', '--data', panels / 'set', '--out', tmp_path / 'r.sdm', '--tile', '64')
    assert code == 2 and 'no tiled mode' in err and len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, 'fit', '--method', 'patchcore', '--data', panels / 'set', '--out', tmp_path / 'r.sdm', '--stride', '64')
    assert code == 2 and '--stride needs --tile' in err
    code, out, err = run(capsys, 'fit', '--method', 'patchcore', '--data', panels / 'set', '--out', tmp_path / 'r.sdm', '--align', tmp_path / 'nosam.pth')
    assert code == 2 and 'nosam.pth' in err
    # photos of different sizes in the training folder: rejected, naming them
    mixed = tmp_path / 'mixed'; mixed.mkdir()
    for f in sorted((panels / 'set' / 'train' / 'good').glob('*.png'))[:3]: (mixed / f.name).write_bytes(f.read_bytes())
    Image.open(mixed / '000.png').resize((240, 135)).save(mixed / 'zz_small.png')
    code, out, err = run(capsys, 'fit', '--method', 'reference', '--data', mixed, '--out', tmp_path / 'r.sdm', '--align', 'classical', '--align-steps', '5')
    assert code == 2 and 'zz_small.png is 240x135' in err and len(err.strip().splitlines()) == 1
    # a model fitted without alignment cannot be used "aligned"; a model whose aligner file is gone is refused
    fit(capsys, folders_for_plain(tmp_path))
    code, out, err = run(capsys, 'inspect', tmp_path / 'm.sdm', tmp_path / 'good', '--out', tmp_path / 'res', '--align', 'classical')
    assert code == 2 and 'fitted without alignment' in err


def folders_for_plain(d):
    rng = np.random.default_rng(1)
    (d / 'good').mkdir(exist_ok=True)
    for k in range(4): _img(d / 'good' / f'{k}.png', rng)
    return d


def test_missing_aligner_file_is_refused(panels, capsys, tmp_path):
    code, out, err = fit_aligned(capsys, panels, 'pc2.sdm')
    assert code == 0, err
    (panels / 'pc2.sdm.aligner').unlink()
    code, out, err = run(capsys, 'inspect', panels / 'pc2.sdm', panels / 'new', '--out', tmp_path / 'res')
    assert code == 2 and 'aligner file' in err and len(err.strip().splitlines()) == 1


def test_demo_runs_the_pipeline(panels, capsys, tmp_path):
    code, out, err = run(capsys, 'demo', '--data', panels / 'set', '--out', tmp_path / 'demo', '--quiet', '--align-steps', '20')
    assert code == 0, err
    assert (tmp_path / 'demo' / 'patchcore.sdm').is_file() and (tmp_path / 'demo' / 'patchcore.sdm.aligner').is_file()
    assert 'pixel_auroc' in out and 'tiles 128, stride 64' in (tmp_path / 'demo' / 'report.html').read_text()
    assert len(list((tmp_path / 'demo' / 'overlays').glob('*.png'))) == 2


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / 'checkpoints' / 'mna_samples.sdm').is_file() or not (ROOT / 'data_samples' / 'train').is_dir(),
                    reason='the shipped MNA model or data_samples/ is absent')
def test_demo_mna_uses_the_shipped_model(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = run(capsys, 'demo', '--method', 'mna', '--out', tmp_path / 'demo', '--quiet')
    assert code == 0, err
    assert 'using the trained model that ships with the samples' in out and 'pixel_auroc' in out
    assert not (tmp_path / 'demo' / 'mna.sdm').exists()                 # nothing was fitted
    assert len(list((tmp_path / 'demo' / 'overlays').glob('*.png'))) == 10
    assert (tmp_path / 'demo' / 'report.html').is_file()


def test_shipped_model_files_are_small():
    for f in (ROOT / 'checkpoints').glob('*.sdm*'):
        assert f.stat().st_size <= 5 * 2**20, f
