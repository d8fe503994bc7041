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
    """A model fitted on grey images reads colour photos as grey (its capabilities say 1 channel); photos of a size
    the model cannot take are refused, and when none can be inspected that is exit 2, the message naming the shape."""
    fit(capsys, folders, 'grey.sdm', '--channels', '1')
    code, out, err = run(capsys, 'inspect', folders / 'grey.sdm', folders / 'new', '--out', folders / 'res')
    assert code == 1 and 'inspected 2 of 2' in out                   # the scratch is found on the grey version
    rng = np.random.default_rng(3)
    (folders / 'big').mkdir()
    for k in range(2): _img(folders / 'big' / f'{k}.png', rng, size=32)
    code, out, err = run(capsys, 'inspect', folders / 'grey.sdm', folders / 'big', '--out', folders / 'res')
    assert code == 2 and 'expected shape' in err
    assert err.strip().splitlines()[-1].startswith('stampdefect inspect: error: none of the 2 photo(s) could be inspected')
    res = json.loads((folders / 'res' / 'results.json').read_text())
    assert res['results'] == [] and [r['status'] for r in res['skipped']] == ['error', 'error']


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
    assert (det.tiling.size, det.tiling.stride, det.detector.config.image_size) == (128, 64, None)   # the tiling stage (Tiled)
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
    code, out, err = run(capsys, 'fit', '--method', 'reference', '--data', panels / 'set', '--out', tmp_path / 'r.sdm', '--tile', '64',
                         '--stride', '65')
    assert code == 2 and '--stride between 1 and --tile' in err and len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, 'fit', '--method', 'reference', '--data', panels / 'set', '--out', tmp_path / 'r.sdm', '--tile', '64', '--quiet')
    assert code == 0, err                                # every method takes the tiling stage
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


# -- issue 12: outputs never collide, every photo is a row, one meaning per exit code, inputs checked first -----------

def _rows(res_dir):
    return json.loads((res_dir / 'results.json').read_text())


def test_same_names_in_two_folders_get_distinct_overlays(folders, capsys):
    fit(capsys, folders)
    rng = np.random.default_rng(7)
    for sub in ('crack', 'good'): (folders / 'test' / sub).mkdir(parents=True)
    _img(folders / 'test' / 'crack' / '000.png', rng, scratch=True)
    _img(folders / 'test' / 'good' / '000.png', rng)
    code, out, err = run(capsys, 'inspect', folders / 'm.sdm', folders / 'test' / 'crack', folders / 'test' / 'good',
                         '--out', folders / 'res', '--quiet')
    assert code == 1
    rows = _rows(folders / 'res')['results']
    assert [r['overlay'] for r in rows] == ['overlays/crack/000_overlay.png', 'overlays/good/000_overlay.png']
    a, b = (np.asarray(Image.open(folders / 'res' / r['overlay'])) for r in rows)
    assert not np.array_equal(a, b)                                  # each row's overlay is its own photo's
    with open(folders / 'res' / 'results.csv') as fh: csv_rows = fh.read().splitlines()[1:]
    assert len({l.split(',')[8] for l in csv_rows}) == 2


@pytest.mark.parametrize('bad', ['corrupt', 'truncated', 'one_pixel', 'wrong_size', 'not_an_image'])
def test_a_bad_photo_is_a_row_and_the_run_finishes_exit_3(folders, capsys, bad):
    fit(capsys, folders)
    new = folders / 'new'
    (new / 'b_scratch.png').unlink()                                 # nothing defective left: the code says "some failed"
    p = new / f'z_{bad}.png'
    if bad == 'corrupt': p.write_bytes(b'\x89PNG\r\n\x1a\n not really')
    elif bad == 'truncated': p.write_bytes((new / 'a_ok.png').read_bytes()[:200])
    elif bad == 'one_pixel': Image.fromarray(np.full((1, 1, 3), 128, np.uint8)).save(p)
    elif bad == 'wrong_size': _img(p, np.random.default_rng(1), size=30)
    else: p.write_text('hello')
    code, out, err = run(capsys, 'inspect', folders / 'm.sdm', new, '--out', folders / 'res', '--quiet')
    assert code == 3, err
    res = _rows(folders / 'res')
    assert [Path(r['image']).name for r in res['results']] == ['a_ok.png'] and res['results'][0]['status'] == 'good'
    row, = res['skipped']
    assert row['status'] == 'error' and p.name in row['error'] and row['score'] is None
    assert res['summary']['exit_code'] == 3 and res['summary']['error'] == 1 and res['summary']['complete'] is True
    csv_text = (folders / 'res' / 'results.csv').read_text()
    assert csv_text.count('\n') == 3 and ',error,' in csv_text
    assert p.name in err and 'exit code 3' in out


def test_exit_codes_0_1_2(folders, capsys):
    fit(capsys, folders)
    code, out, err = run(capsys, 'inspect', folders / 'm.sdm', folders / 'new' / 'a_ok.png', '--out', folders / 'r0', '--quiet')
    assert code == 0 and _rows(folders / 'r0')['summary']['exit_code'] == 0
    code, out, err = run(capsys, 'inspect', folders / 'm.sdm', folders / 'new', '--out', folders / 'r1', '--quiet')
    assert code == 1 and _rows(folders / 'r1')['summary']['exit_code'] == 1
    (folders / 'bad').mkdir()
    for k in range(2): (folders / 'bad' / f'{k}.png').write_bytes(b'garbage')
    code, out, err = run(capsys, 'inspect', folders / 'm.sdm', folders / 'bad', '--out', folders / 'r2', '--quiet')
    assert code == 2 and 'none of the 2 photo(s) could be inspected' in err
    assert len(_rows(folders / 'r2')['skipped']) == 2                # the files are written all the same


def test_exit_codes_are_in_the_help():
    from stampdefect.cli import build_parser
    text = build_parser()._subparsers._group_actions[0].choices['inspect'].format_help()
    for code in '0123': assert f'{code} =' in text, text


def test_interrupted_run_keeps_the_results(folders, capsys, monkeypatch):
    fit(capsys, folders)
    import stampdefect.cli as cli
    real, seen = cli.inspect_panel, []
    def stop_on_second(*a, **k):
        seen.append(1)
        if len(seen) == 2: raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(cli, 'inspect_panel', stop_on_second)
    code, out, err = run(capsys, 'inspect', folders / 'm.sdm', folders / 'new', '--out', folders / 'res', '--quiet')
    assert code == 130
    res = _rows(folders / 'res')
    assert len(res['results']) == 1 and res['summary']['complete'] is False and res['summary']['exit_code'] is None


def test_fit_out_unwritable_fails_before_training(folders, capsys, monkeypatch):
    from stampdefect.core import ReferenceDetector
    calls = []
    monkeypatch.setattr(ReferenceDetector, 'fit', lambda self, *a, **k: calls.append(1))
    code, out, err = run(capsys, 'fit', '--method', 'reference', '--data', folders / 'good', '--out', '/proc/x.sdm')
    assert code == 2 and '--out /proc/x.sdm' in err and '.tmp' not in err and calls == []
    assert len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, 'fit', '--method', 'reference', '--data', folders / 'good', '--out', folders / 'good')
    assert code == 2 and 'is a folder' in err and calls == []


def test_fit_training_options_only_for_trained_methods(folders, capsys):
    for extra in (['--max-minutes', '1'], ['--resume', str(folders / 'ck')]):
        code, out, err = run(capsys, 'fit', '--method', 'reference', '--data', folders / 'good', '--out', folders / 'x.sdm', *extra)
        assert code == 2 and extra[0] in err and 'trains no network' in err
    assert not (folders / 'x.sdm').exists() and not (folders / 'ck').exists()


def test_fit_shows_its_stages_unless_quiet(folders, capsys):
    code, out, err = fit(capsys, folders)
    assert code == 0 and 'fitting reference on 5 normal images' in err
    code, out, err = fit(capsys, folders, 'm2.sdm', '--quiet')
    assert code == 0 and 'fitting' not in err


def _anti_aliased_set(root):
    rng = np.random.default_rng(4)
    for d in ('train/good', 'test/good', 'test/crack', 'ground_truth/crack'): (root / d).mkdir(parents=True)
    for k in range(4): _img(root / 'train' / 'good' / f'{k}.png', rng)
    _img(root / 'test' / 'good' / '0.png', rng)
    for k in range(2):
        _img(root / 'test' / 'crack' / f'{k}.png', rng, scratch=True)
        m = np.zeros((24, 24), np.uint8); m[8:10, 3:21] = 255; m[10, 3:21] = 120 * k     # the second one anti-aliased
        Image.fromarray(m).save(root / 'ground_truth' / 'crack' / f'{k}_mask.png')
    return root


def test_evaluate_checks_masks_before_scoring(tmp_path, capsys, monkeypatch):
    root = _anti_aliased_set(tmp_path / 'mt')
    code, out, err = run(capsys, 'fit', '--method', 'reference', '--data', root, '--out', tmp_path / 'm.sdm', '--quantile', '1')
    assert code == 0, err
    from stampdefect.core import ReferenceDetector
    real, calls = ReferenceDetector.predict, []
    monkeypatch.setattr(ReferenceDetector, 'predict', lambda self, x: (calls.append(len(x)), real(self, x))[1])
    code, out, err = run(capsys, 'evaluate', tmp_path / 'm.sdm', '--data', root)
    assert code == 2 and '--binarize-masks' in err and 'binarize=True' not in err and '1_mask.png' in err
    assert len(err.strip().splitlines()) == 1 and calls == []        # refused before the first prediction
    code, out, err = run(capsys, 'evaluate', tmp_path / 'm.sdm', '--data', root, '--binarize-masks', '--quiet',
                         '--out', tmp_path / 'res' / 'eval.json')
    assert code == 0, err
    saved = json.loads((tmp_path / 'res' / 'eval.json').read_text())
    assert saved['n_images'] == 3 and saved['model'] == str(tmp_path / 'm.sdm') and 'crack' in saved['per_defect_type']
    assert calls and 'pixel_auroc' in out
    code, out, err = run(capsys, 'evaluate', tmp_path / 'm.sdm', '--data', root, '--out', '/proc/eval.json')
    assert code == 2 and '/proc/eval.json' in err


def test_version_methods_and_help_text(capsys):
    from stampdefect import __version__
    from stampdefect.core import REGISTRY, _import_builtin_methods
    from stampdefect.cli import build_parser
    with pytest.raises(SystemExit) as e: main(['--version'])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f'stampdefect {__version__}'
    _import_builtin_methods()
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    fit_help = subs['fit'].format_help()
    for m in sorted(REGISTRY): assert m in fit_help
    for name, sp in subs.items():
        for a in sp._actions:
            assert a.help, f"{name} {a.option_strings or a.dest} has no help text"
    assert 'evaluate' in subs['bench'].format_help()


def test_demo_out_is_per_method(panels, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, 'demo', '--method', 'reference', '--data', panels / 'set', '--align', 'none', '--quiet')
    assert code == 0, err
    assert (tmp_path / 'stampdefect_demo' / 'reference' / 'reference.sdm').is_file()
    assert (tmp_path / 'stampdefect_demo' / 'reference' / 'report.html').is_file()
    assert not (tmp_path / 'stampdefect_demo' / 'report.html').exists()


def test_bench_evaluate_from_the_command_line(capsys):
    code, out, err = run(capsys, 'bench', 'evaluate', '--quick', '--json')
    assert code == 0, err
    case = json.loads(out.strip().splitlines()[-1])
    assert case['case'] == 'evaluate/reference 64x64' and case['ratio_to_predict_all'] > 0


def test_fit_default_calibration_is_the_robust_rule(folders, capsys):
    "Without --quantile both thresholds come from the robust rule, stored with its record in the model file."
    from stampdefect.core import Detector
    code, out, err = run(capsys, 'fit', '--method', 'reference', '--data', folders / 'good', '--out', folders / 'r.sdm', '--quiet')
    assert code == 0 and 'largest score' not in err
    det = Detector.load(folders / 'r.sdm')
    assert det.calibration['rule'] == 'robust' and det.pixel_threshold is not None and det.calibration['n_images'] >= 1
