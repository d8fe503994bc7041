"""Widget logic without a browser: set `.value` on the controls and check what was computed (ipywidgets uses a
dummy comm outside a kernel)."""
import io
import json
import re

import numpy as np
import pytest
import torch
import ipywidgets as W
from PIL import Image

from stampdefect.core import Prediction
from stampdefect.pipeline import overlay
from stampdefect.widgets import (CONTOUR_RGB, RESAMPLED_RGB, HeatmapViewer, LatentExplorer, StaticHeatmapViewer,
                                 decision_text, embed_html, explorer_state, fit_width, heatmap_viewer,
                                 latent_explorer, outline, render_codes, render_nll, render_overlay)


@pytest.fixture(autouse=True)
def _close_widgets():
    yield
    W.Widget.close_all()


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert('RGB'))


def _two_images():
    "Two 3x24x40 images (dark and bright) with maps hot in different places; scores 1.0 and 5.0."
    x = torch.stack([torch.full((3, 24, 40), 0.2), torch.full((3, 24, 40), 0.7)])
    maps = np.zeros((2, 24, 40), np.float32)
    maps[0, 2:6, 2:10] = 1.0
    maps[1, 10:20, 20:36] = 5.0
    return x, Prediction(np.array([1.0, 5.0]), maps)


# -- pure functions -----------------------------------------------------------------------------------------------
def test_render_overlay_opacity_zero_is_the_plain_image():
    x, p = _two_images()
    out = render_overlay(x[1], p.maps[1], 0.0, 2.0)
    assert out.dtype == np.uint8 and out.shape == (24, 40, 3)
    assert (out == round(0.7 * 255)).all()                       # the grey photo: no heat, no outline
    assert np.array_equal(out, overlay(x[1], p.maps[1], None, 0.0))


def test_render_overlay_outlines_regions_above_threshold():
    x, p = _two_images()
    out = render_overlay(x[1], p.maps[1], 0.5, 2.0)
    drawn = (out == CONTOUR_RGB).all(-1)
    assert np.array_equal(drawn, outline(p.maps[1] > 2.0))
    assert drawn.sum() == 2 * (10 + 16) - 4                       # the rim of a 10x16 box
    assert not (render_overlay(x[1], p.maps[1], 0.5, 6.0) == CONTOUR_RGB).all(-1).any()
    with pytest.raises(ValueError, match='opacity'): render_overlay(x[1], p.maps[1], -0.1, 1.0)
    with pytest.raises(ValueError, match='finite'): render_overlay(x[1], p.maps[1], 0.5, float('nan'))


def test_fit_width_keeps_thin_peaks():
    img = torch.rand(3, 100, 400)
    amap = np.zeros((100, 400), np.float32); amap[50, 3:397] = 7.0   # a 1-px crack
    small, small_map = fit_width(img, amap, 100)
    assert tuple(small.shape) == (3, 25, 100) and small_map.shape == (25, 100)
    assert small_map.max() == 7.0 and (small_map == 7.0).any(0).sum() >= 95
    with pytest.raises(ValueError, match='differ in size'): fit_width(img, amap[:50], 100)


def test_decision_text():
    assert 'DEFECT' in decision_text(2.5, 2.0, 'a') and 'DEFECT' not in decision_text(2.0, 2.0, 'a')
    assert '50.00 %' in decision_text(1.0, 2.0, None, 0.5)


# -- live heatmap viewer ------------------------------------------------------------------------------------------
def test_viewer_controls_and_png_output():
    x, p = _two_images()
    v = heatmap_viewer(x, p, threshold=2.0, titles=['dark', 'bright'])
    assert isinstance(v, HeatmapViewer) and isinstance(v, W.VBox)
    assert v.image.format == 'png' and v.image.value[:4] == b'\x89PNG'
    assert np.array_equal(_decode(v.image.value), v.frame)
    assert v.index in v.children[0].children                      # several images: the selector is shown
    v.opacity.value = 0.0
    assert (v.frame == round(0.2 * 255)).all()                    # opacity 0: the plain (dark) image
    assert np.array_equal(_decode(v.image.value), v.frame)


def test_viewer_threshold_changes_the_decision():
    x, p = _two_images()
    v = heatmap_viewer(x, p, threshold=2.0, titles=['dark', 'bright'])
    assert 'ok' in v.label.value and 'DEFECT' not in v.label.value     # image 0: score 1.0 <= 2.0
    v.threshold.value = 0.5
    assert 'DEFECT' in v.label.value
    assert (v.frame == CONTOUR_RGB).all(-1).sum() == outline(p.maps[0] > 0.5).sum()
    v.threshold.value = v.threshold.max
    assert 'DEFECT' not in v.label.value and not (v.frame == CONTOUR_RGB).all(-1).any()


def test_viewer_index_switches_image():
    x, p = _two_images()
    v = heatmap_viewer(x, p, threshold=2.0, titles=['dark', 'bright'], opacity=0.0)
    assert (v.frame == round(0.2 * 255)).all() and 'dark' in v.label.value
    v.index.value = 1
    assert (v.frame == round(0.7 * 255)).all() and 'bright' in v.label.value and 'DEFECT' in v.label.value
    v.opacity.value = 0.5
    assert np.array_equal(v.frame, render_overlay(x[1], p.maps[1], 0.5, 2.0))


def test_viewer_defaults_resizing_and_single_image():
    x, p = _two_images()
    small_maps = Prediction(p.scores, p.maps[:, ::2, ::2])          # a detector that resized its input
    v = heatmap_viewer(list(x), small_maps)                         # list input, no threshold, no titles
    assert v.frame.shape == (24, 40, 3)
    assert v.threshold.value == pytest.approx(3.0) and 'median' in v.label.value and 'image 0' in v.label.value
    one = heatmap_viewer(x[1], Prediction(p.scores[1:], p.maps[1:]), threshold=1.0)
    assert one.index not in one.children[0].children                # one image: no selector
    big = heatmap_viewer(torch.rand(1, 3, 300, 1200), Prediction(np.ones(1), np.zeros((1, 300, 1200))), 1.0)
    assert big.frame.shape == (160, 640, 3)                         # shrunk to the default display width


def test_viewer_bad_input():
    x, p = _two_images()
    with pytest.raises(ValueError, match='2 images but prediction has 1'): heatmap_viewer(x, Prediction(p.scores[:1], p.maps[:1]))
    with pytest.raises(ValueError, match='titles'): heatmap_viewer(x, p, 1.0, titles=['a'])
    with pytest.raises(TypeError, match='Prediction'): heatmap_viewer(x, p.maps)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): heatmap_viewer(x * 3, p)
    with pytest.raises(ValueError, match='opacity'): heatmap_viewer(x, p, opacity=2.0)
    with pytest.raises(ValueError, match=r'images\[1\]: expected one'): heatmap_viewer([x[0], x], p)
    with pytest.raises(TypeError, match='uint8'): heatmap_viewer((x * 255).to(torch.uint8), p)
    with pytest.raises(ValueError, match='threshold'): heatmap_viewer(x, p, threshold=float('inf'))


# -- static viewer ------------------------------------------------------------------------------------------------
def test_static_viewer_structure_and_links():
    x, p = _two_images()
    v = heatmap_viewer(x, p, threshold=2.0, titles=['dark', 'bright'], static=True,
                       static_opacities=(0.0, 0.5), static_thresholds=(0.5, 2.0, 4.0))
    assert isinstance(v, StaticHeatmapViewer)
    assert isinstance(v.stack, W.Stack) and len(v.stack.children) == 2                   # images
    for per_image in v.stack.children:
        assert isinstance(per_image, W.Stack) and len(per_image.children) == 3           # thresholds
        for per_thr in per_image.children:
            op_stack, label = per_thr.children
            assert isinstance(op_stack, W.Stack) and len(op_stack.children) == 2         # opacities
            assert all(isinstance(c, W.Image) and c.format == 'jpeg' for c in op_stack.children)
            assert isinstance(label, W.HTML)
    assert v.threshold.index == 1 and v.opacity.index == 1 and v.stack.children[0].selected_index == 1
    # the thresholds flip image 1 (score 5) at none and image 0 (score 1) at 0.5 only
    labels = [[t.children[1].value for t in s.children] for s in v.stack.children]
    assert ['DEFECT' in l for l in labels[0]] == [True, False, False]
    assert ['DEFECT' in l for l in labels[1]] == [True, True, True]
    # identical frames are one widget: opacity 0 (the photo) is shared across thresholds, and so are image 1's
    # frames at thresholds 0.5 and 2.0 (same outline, and its map of 5 saturates the heat scale at both)
    frames = [[t.children[0].children for t in s.children] for s in v.stack.children]
    assert all(f[k][0] is f[0][0] for f in frames for k in range(3))
    assert frames[1][0][1] is frames[1][1][1] and frames[1][2][1] is not frames[1][1][1]
    assert v.n_frames == len({id(w) for f in frames for t in f for w in t}) == 2 + 3 + 2
    # links: image selector -> outer stack, threshold -> each image's stack, opacity -> each opacity stack
    pairs = [(l.source[0], l.source[1], l.target[0], l.target[1]) for l in v.links]
    assert (v.index, 'index', v.stack, 'selected_index') in pairs
    assert sum(s is v.threshold for s, *_ in pairs) == 2 and sum(s is v.opacity for s, *_ in pairs) == 6
    assert all(isinstance(t, W.Stack) and tt == 'selected_index' for _, _, t, tt in pairs)
    # frames are small JPEGs close to the live rendering
    frame = _decode(v.stack.children[1].children[1].children[0].children[1].value)
    assert np.abs(frame.astype(int) - render_overlay(x[1], p.maps[1], 0.5, 2.0)).mean() < 4


def test_static_viewer_default_levels_and_downscaling():
    v = heatmap_viewer(torch.rand(1, 3, 200, 800), Prediction(np.ones(1), np.random.rand(1, 200, 800)), 2.0, static=True)
    assert v.thresholds == (1.5, 2.0, 3.0) and v.opacities == (0.0, 0.5, 1.0)
    assert len(v.stack.children) == 1 and len(v.stack.children[0].children) == 3
    img = Image.open(io.BytesIO(v.stack.children[0].children[0].children[0].children[0].value))
    assert img.size == (320, 80)                                                          # <= 320 px wide
    with pytest.raises(ValueError, match='repeated'): heatmap_viewer(torch.rand(1, 3, 8, 8), Prediction(np.ones(1), np.zeros((1, 8, 8))), 1.0, static=True, static_thresholds=(1, 1))


def test_embed_html_holds_state_and_links():
    x, p = _two_images()
    v = heatmap_viewer(x, p, threshold=2.0, static=True, static_opacities=(0.0, 0.5), static_thresholds=(0.5, 2.0))
    page = embed_html(v).data
    state = json.loads(re.search(r'widget-state\+json">\s*(.*?)\s*</script>', page, re.S).group(1))['state']
    names = [s['model_name'] for s in state.values()]
    assert names.count('LinkModel') == len(v.links) == 1 + 2 + 2 * 2
    assert names.count('ImageModel') == v.n_frames
    assert v.model_id in re.search(r'widget-view\+json">\s*(.*?)\s*</script>', page, re.S).group(1)


# -- latent explorer ----------------------------------------------------------------------------------------------
def _explorer_inputs():
    rng = np.random.default_rng(0)
    patch = torch.rand(3, 32, 32)
    codes = rng.integers(0, 16, (8, 8))
    nll = rng.random((8, 8)).astype(np.float32)
    nll[2, 3] = 5.0
    calls = []
    def crack_map_fn(mask):
        calls.append(mask.copy())
        return np.kron(mask, np.ones((4, 4))).astype(np.float32)
    return patch, codes, nll, crack_map_fn, calls


def test_explorer_state():
    nll = np.array([[0.1, 2.0], [3.0, 0.5]], np.float32)
    assert np.array_equal(explorer_state(nll, 1.0), [[False, True], [True, False]])
    assert not explorer_state(nll, 3.0).any()
    with pytest.raises(ValueError, match='nll'): explorer_state(np.zeros(4, np.float32), 1.0)
    with pytest.raises(TypeError, match='floats'): explorer_state(np.zeros((2, 2), int), 1.0)


def test_explorer_threshold_above_max_gives_empty_mask():
    patch, codes, nll, fn, calls = _explorer_inputs()
    e = latent_explorer(patch, codes, nll, fn, threshold=1.0)
    assert isinstance(e, LatentExplorer)
    assert np.array_equal(e.mask, nll > 1.0) and e.mask.sum() == 1
    assert np.array_equal(calls[-1], e.mask) and e.crack_map.max() == 1.0
    e.threshold.value = e.threshold.max
    assert e.threshold.max > nll.max()
    assert not e.mask.any() and not calls[-1].any() and calls[-1].shape == (8, 8)
    assert e.crack_map.shape == (32, 32) and e.crack_map.max() == 0.0
    assert 'resampling 0 of 64' in e.label.value
    n = len(calls)
    e.threshold.value = 0.5
    e.threshold.value = e.threshold.max                           # seen before: no new decode
    assert len(calls) == n + 1


def test_explorer_renders_and_defaults():
    patch, codes, nll, fn, calls = _explorer_inputs()
    e = latent_explorer(patch, codes, nll, fn, size=64)
    assert e.threshold.value == pytest.approx(float(np.quantile(nll, 0.9)), abs=e.threshold.step)
    assert _decode(e.codes_image.value).shape == (64, 64, 3) and _decode(e.patch_image.value).shape == (64, 64, 3)
    nll_img = _decode(e.nll_image.value)
    assert np.array_equal((nll_img == RESAMPLED_RGB).all(-1), outline(np.kron(e.mask, np.ones((8, 8), bool))))
    assert not e.threshold.continuous_update                       # decoding runs on release, not on every drag step
    assert np.array_equal(render_codes(np.array([[1, 1], [2, 2]]), 4)[0, 0], render_codes(np.array([[1]]), 1)[0, 0])
    assert render_nll(nll, nll > 0.5, size=16).shape == (16, 16, 3)


def test_explorer_bad_input():
    patch, codes, nll, fn, _ = _explorer_inputs()
    with pytest.raises(ValueError, match='same'): latent_explorer(patch, codes, nll[:4], fn)
    with pytest.raises(ValueError, match='codes'): latent_explorer(patch, codes.astype(np.float32), nll, fn)
    with pytest.raises(TypeError, match='callable'): latent_explorer(patch, codes, nll, None)
    with pytest.raises(ValueError, match='crack_map_fn returned shape'):
        latent_explorer(patch, codes, nll, lambda m: np.zeros((8, 8)))
    with pytest.raises(ValueError, match='one'): latent_explorer(torch.rand(2, 3, 8, 8), codes, nll, fn)
    with pytest.raises(ValueError, match='finite'): latent_explorer(patch, codes, nll, fn, threshold=float('nan'))


# -- latent explorer on the MNA detector --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_mna():
    "A tiny MNA detector (untrained VQ-VAE, 2 prior steps): enough to check the wiring, in a few seconds."
    from stampdefect.core import get_detector
    from stampdefect.blocks.vqvae import VQVAE
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                      # tiny tensors: threads only add overhead (and contention)
    try:
        det = get_detector('mna', dict(
            patch_size=16, channels=1, device='cpu', prior_steps=2, prior_batch=2, calib_patches=4,
            vqvae=dict(hidden_channels=8, residual_channels=4, n_residual_blocks=1, codebook_size=16, code_dim=4, perceptual_weight=0.0),
            prior=dict(u2net='small', width=0.25, blocks=('4', '4F'), side_channels=8, head_channels=16)))
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        det.fit(torch.rand(2, 1, 24, 40, generator=g), vqvae=VQVAE(det.config.vqvae_config()))
        yield det
    finally:
        torch.set_num_threads(threads)


def test_latent_explorer_for_matches_the_detector(tiny_mna):
    from stampdefect.widgets import latent_explorer_for
    patch = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(3))
    e = latent_explorer_for(tiny_mna, patch)
    assert e.threshold.value == pytest.approx(tiny_mna.nll_threshold, abs=e.threshold.step)
    for thr in (float(np.quantile(e.nll, 0.5)), float(np.quantile(e.nll, 0.9))):
        e.threshold.value = thr
        ref = tiny_mna.explain(patch[None], threshold=e.threshold.value)
        assert np.array_equal(e.mask, ref['resampled'][0].numpy())
        np.testing.assert_allclose(e.crack_map, ref['map'][0].numpy(), atol=1e-6)
    e.threshold.value = e.threshold.max
    assert not e.mask.any() and e.crack_map.max() == 0.0
    e2 = latent_explorer_for(tiny_mna, patch, origin=(4, 8), panel_hw=(24, 40), threshold=0.0)
    assert e2.threshold.value == 0.0 and e2.threshold.min == 0.0 and e2.mask.all()    # the slider reaches a given threshold


def test_latent_explorer_for_bad_input(tiny_mna):
    from stampdefect.core import get_detector
    from stampdefect.widgets import latent_explorer_for
    with pytest.raises(TypeError, match='latent-prior'): latent_explorer_for(get_detector('reference'), torch.rand(1, 16, 16))
    with pytest.raises(ValueError, match='panel_hw'): latent_explorer_for(tiny_mna, torch.rand(1, 16, 16), origin=(0, 0))
    with pytest.raises(ValueError, match='patches'): latent_explorer_for(tiny_mna, torch.rand(1, 8, 8))
