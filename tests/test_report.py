"""stampdefect.report: overlay names never collide, every photo is a row (failures too), files are written atomically,
the HTML report embeds the overlays."""
import base64, csv, json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stampdefect.core import ReferenceDetector
from stampdefect.pipeline import inspect_panel
from stampdefect.report import (CSV_FIELDS, save_png, overlay_names, result_row, error_row, write_results, html_report)


def test_overlay_names_keep_the_folders_apart(tmp_path):
    files = [tmp_path / 'test' / 'crack' / '000.png', tmp_path / 'test' / 'good' / '000.png',
             tmp_path / 'test' / 'good' / '001.png']
    assert overlay_names(files) == [Path('crack/000_overlay.png'), Path('good/000_overlay.png'), Path('good/001_overlay.png')]
    assert overlay_names([tmp_path / 'a.png']) == [Path('a_overlay.png')]
    # relative inputs, and the same folder name under two parents
    names = overlay_names(['x/1/p.png', 'y/1/p.png'])
    assert names == [Path('x/1/p_overlay.png'), Path('y/1/p_overlay.png')]


@pytest.mark.parametrize('files', [['d/a.png', 'd/a.jpg', 'd/a.JPG', 'd/A.png'],
                                   ['d/a.png', 'd/a.png', 'd/a.png'],
                                   ['d/a_png.png', 'd/a.png', 'd/a.png']])
def test_overlay_names_are_distinct_ignoring_case(files):
    names = overlay_names(files)
    assert len(names) == len(files)
    assert len({str(n).lower() for n in names}) == len(files), names
    assert all(str(n).endswith('_overlay.png') for n in names)


def test_save_png_roundtrip_and_no_leftovers(tmp_path):
    a = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    p = save_png(a, tmp_path / 'o.png')
    assert (np.asarray(Image.open(p)) == a).all()
    assert [f.name for f in tmp_path.iterdir()] == ['o.png']
    with pytest.raises(FileNotFoundError, match='does not exist'): save_png(a, tmp_path / 'no' / 'o.png')


def _report():
    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.normal(0.5, 0.02, (4, 3, 16, 16)).astype(np.float32)).clamp(0, 1)
    det = ReferenceDetector().fit(train); det.threshold = 5.0
    x = train[0].clone(); x[:, 5:7, 2:14] = 0.0
    return inspect_panel(x, det, pixel_threshold=5.0)


def test_rows_and_results_files(tmp_path):
    rep = _report()
    assert rep.decision == 'defect' and rep.regions
    rows = [result_row('in/a.png', rep, Path('overlays/a_overlay.png')),
            error_row('in/b.png', 'in/b.png: image too small', rep.threshold),
            result_row('in/c.png', rep)]
    assert set(rows[0]) == set(rows[1]) == set(CSV_FIELDS) | {'region_list'}
    assert rows[0]['status'] == 'defect' and rows[0]['defect'] is True and rows[0]['regions'] == len(rep.regions)
    assert rows[1]['status'] == 'error' and rows[1]['defect'] is None and rows[1]['score'] is None
    csv_path, json_path = write_results(tmp_path, rows, {'photos': 3})
    with open(csv_path, newline='') as fh: table = list(csv.DictReader(fh))
    assert [r['image'] for r in table] == ['in/a.png', 'in/b.png', 'in/c.png']       # every photo, in order
    assert table[1]['status'] == 'error' and table[1]['error'] == 'in/b.png: image too small' and table[0]['error'] == ''
    assert table[0]['overlay'] == 'overlays/a_overlay.png' and table[2]['overlay'] == ''
    res = json.loads(json_path.read_text())
    assert [r['image'] for r in res['results']] == ['in/a.png', 'in/c.png']
    assert [r['image'] for r in res['skipped']] == ['in/b.png'] and res['summary'] == {'photos': 3}
    assert res['results'][0]['region_list'][0]['area'] == rep.regions[0].area
    assert sorted(f.name for f in tmp_path.iterdir()) == ['results.csv', 'results.json']
    # an empty run still writes both files, with a header
    write_results(tmp_path, [])
    assert csv_path.read_text().strip() == ','.join(CSV_FIELDS)
    assert json.loads(json_path.read_text()) == {'results': [], 'skipped': [], 'summary': {}}


def test_html_report(tmp_path):
    ov = save_png(np.zeros((3, 3, 3), np.uint8), tmp_path / 'ov.png')
    res = {'image_auroc': np.float64(0.123456), 'n_images': 1, 'images_per_second': 2.5, 'peak_rss_mb': 10.0, 'threshold': 1.0,
           'per_defect_type': {'<b>': {'image_auroc': 1.0}}}
    page = html_report('t <x>', res, [{'name': 'n&1', 'score': 3.0, 'defect': False, 'overlay_path': str(ov)}],
                       tmp_path / 'r.html').read_text()
    assert '<title>t &lt;x&gt;</title>' in page and '&lt;b&gt;' in page and '<td>0.1235</td>' in page
    assert base64.b64encode(ov.read_bytes()).decode() in page and 'n&amp;1: score 3 (ok)' in page
    assert '1 test images, 2.50 images/s' in page
