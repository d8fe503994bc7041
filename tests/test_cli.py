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
