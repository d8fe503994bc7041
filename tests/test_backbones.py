"Tests for stampdefect.backbones: EfficientNet-Lite0 rebuild, feature taps, weights loading and its errors."
import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from skimage import data as skdata, transform as sktransform

from stampdefect.backbones import (BACKBONES, IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, Conv2dSame,
                                   EfficientNetLite0, bench_backbone, efficientnet_lite0,
                                   get_backbone, load_state_dict_file, shipped_weights_path, tf_same_padding)

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ALL_LITE0 = ('stem', 'stage0', 'stage1', 'stage2', 'stage3', 'stage4', 'head')
LITE0_TAPS = {'stem': (2, 32), 'stage0': (2, 16), 'stage1': (4, 24), 'stage2': (8, 40), 'stage3': (16, 112),
              'stage4': (32, 320), 'head': (32, 1280)}


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "One torch thread: on a shared 2-core machine, multi-threaded kernels spend their time contending, not computing."
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope='module')
def lite0():
    return efficientnet_lite0()


@pytest.fixture(scope='module')
def cat():
    img = sktransform.resize(skdata.chelsea(), (224, 224), anti_aliasing=True).astype(np.float32)
    return torch.from_numpy(img).permute(2, 0, 1)[None]  # (1, 3, 224, 224) in [0, 1]


@pytest.fixture(scope='module')
def fe_all():
    return get_backbone('efficientnet_lite0', layers=ALL_LITE0)


def _probs(model, x, mean, std):
    with torch.inference_mode():
        return model((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]).softmax(1)[0]


def test_shipped_checkpoint_loads_strict():
    sd = torch.load(shipped_weights_path(), map_location='cpu', weights_only=True)
    result = EfficientNetLite0().load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(sd) == 296


@pytest.mark.parametrize('mean,std', [(IMAGENET_MEAN, IMAGENET_STD), (INCEPTION_MEAN, INCEPTION_STD)],
                         ids=['imagenet', 'inception'])
def test_cat_in_top5(lite0, cat, mean, std):
    top5 = _probs(lite0, cat, mean, std).topk(5).indices.tolist()
    assert any(c in CAT_CLASSES for c in top5), top5
    assert top5[0] in CAT_CLASSES


def test_cat_test_has_teeth(cat):
    "A plausible bug (residuals dropped) loads with strict=True but must fail the cat check."
    broken = efficientnet_lite0()
    for b in broken._blocks: b.residual = False
    top5 = _probs(broken, cat, INCEPTION_MEAN, INCEPTION_STD).topk(5).indices.tolist()
    assert not any(c in CAT_CLASSES for c in top5)


def test_tf_same_padding():
    assert tf_same_padding(224, 3, 2) == (0, 1)
    assert tf_same_padding(225, 3, 2) == (1, 1)
    assert tf_same_padding(256, 5, 2) == (1, 2)
    conv = Conv2dSame(1, 1, 3, stride=2)
    assert conv(torch.zeros(1, 1, 7, 9)).shape[-2:] == (4, 5)


def test_tap_shapes_and_strides_256(fe_all):
    assert fe_all.strides == {k: s for k, (s, _) in LITE0_TAPS.items()}
    with torch.inference_mode():
        feats = fe_all(torch.rand(2, 3, 256, 256))
    assert list(feats) == list(ALL_LITE0)
    for k, (s, c) in LITE0_TAPS.items():
        assert fe_all.out_channels(k) == c
        assert feats[k].shape == (2, c, 256 // s, 256 // s), k
        assert feats[k].dtype == torch.float32


def test_odd_size_is_ceil():
    fe = get_backbone()
    with torch.inference_mode():
        feats = fe(torch.rand(1, 3, 250, 300))
    assert feats['stage2'].shape == (1, 40, 32, 38) and feats['stage3'].shape == (1, 112, 16, 19)


def test_default_layers_and_truncation():
    fe = get_backbone()
    assert fe.layers == ('stage2', 'stage3')
    assert list(fe.body) == ['stem', 'stage0', 'stage1', 'stage2', 'stage3']
    assert list(get_backbone(layers=('stage1',)).body) == ['stem', 'stage0', 'stage1']
    # requested order is kept, stages are run once
    fe2 = get_backbone(layers=('stage3', 'stem'))
    with torch.inference_mode():
        assert list(fe2(torch.rand(1, 3, 64, 64))) == ['stage3', 'stem']


def test_taps_equal_classifier_stages(lite0, fe_all):
    "The extractor runs the very modules the classifier runs (after the inception normalisation)."
    x = torch.rand(1, 3, 96, 96)
    with torch.inference_mode():
        feats = fe_all(x)
        h = (x - torch.tensor(INCEPTION_MEAN)[:, None, None]) / torch.tensor(INCEPTION_STD)[:, None, None]
        for stage in lite0.stages():
            h = stage.module(h)
            torch.testing.assert_close(feats[stage.name], h)


def test_frozen_and_eval(fe_all):
    assert all(not p.requires_grad for p in fe_all.parameters())
    assert not any(m.training for m in fe_all.modules())
    fe_all.train()
    assert not any(m.training for m in fe_all.modules())
    bn = next(m for m in fe_all.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    fe_all(torch.rand(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, before)


def test_gradient_reaches_input_not_weights():
    fe = get_backbone(layers=('stage1', 'stage2'))
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    sum(f.square().mean() for f in fe(x).values()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in fe.parameters())


def test_grayscale_equals_repeated_rgb():
    fe = get_backbone()
    g = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        a, b = fe(g), fe(g.repeat(1, 3, 1, 1))
    for k in a: torch.testing.assert_close(a[k], b[k])


def test_deterministic():
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    fe1, fe2 = get_backbone(), get_backbone()
    with torch.inference_mode():
        a, b, c = fe1(x), fe1(x), fe2(x)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])


def test_bad_inputs():
    fe = get_backbone()
    with pytest.raises(TypeError, match='float'): fe(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match='torch.Tensor'): fe(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'): fe(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'): fe(torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match='unknown backbone'): get_backbone('vgg16')
    with pytest.raises(ValueError, match='unknown layers'): get_backbone(layers=('layer2',))
    with pytest.raises(ValueError, match='empty'): get_backbone(layers=())
    with pytest.raises(ValueError, match='duplicates'): get_backbone(layers=('stage2', 'stage2'))
    with pytest.raises(ValueError, match='unknown layer'): fe.out_channels('layer9')


def test_missing_file_says_how_to_get_it(tmp_path):
    missing = tmp_path / 'wide_resnet50_2.pth'
    with pytest.raises(FileNotFoundError) as e:
        get_backbone('wide_resnet50_2', weights=missing)
    msg = str(e.value)
    assert str(missing) in msg
    assert 'https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth' in msg  # IMAGENET1K_V1
    assert 'https://download.pytorch.org/models/wide_resnet50_2-9ba9bcbe.pth' in msg  # IMAGENET1K_V2
    with pytest.raises(FileNotFoundError, match='https://download.pytorch.org/models/resnet18-'):
        get_backbone('resnet18')  # no file given: nothing is downloaded, the error says where to get it
    with pytest.raises(FileNotFoundError, match='does not exist'):
        get_backbone('efficientnet_lite0', weights=tmp_path / 'nope.pth')


class _Evil:
    def __reduce__(self):
        return (print, ('this must never run',))


def test_bad_files_name_the_file(tmp_path):
    junk = tmp_path / 'junk.pth'
    junk.write_text('not a checkpoint')
    with pytest.raises(ValueError, match='junk.pth'):
        get_backbone('resnet18', weights=junk)
    evil = tmp_path / 'evil.pth'
    torch.save({'x': _Evil()}, evil)  # arbitrary object: refused by weights_only unpickling
    with pytest.raises(ValueError, match='evil.pth'):
        load_state_dict_file(evil)
    wrapped = tmp_path / 'ckpt.pth'
    torch.save({'epoch': 1, 'state_dict': {'w': torch.zeros(1)}}, wrapped)
    with pytest.raises(ValueError, match=r"ckpt.pth.*\['state_dict'\]"):
        load_state_dict_file(wrapped)
    not_dict = tmp_path / 'tensor.pth'
    torch.save(torch.zeros(3), not_dict)
    with pytest.raises(ValueError, match='tensor.pth.*not a state dict'):
        load_state_dict_file(not_dict)
    wrong = tmp_path / 'resnet18.pth'
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match='resnet18.pth.*does not fit wide_resnet50_2'):
        get_backbone('wide_resnet50_2', weights=wrong)
    with pytest.raises(ValueError, match='resnet18.pth.*does not fit efficientnet_lite0'):
        get_backbone('efficientnet_lite0', weights=wrong)


def test_torchvision_resnet18_local_weights(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / 'resnet18-random.pth'
    torch.save(ref.state_dict(), path)
    fe = get_backbone('resnet18', weights=path, layers=('layer1', 'layer2', 'layer3', 'layer4'))
    assert fe.strides == {'layer1': 4, 'layer2': 8, 'layer3': 16, 'layer4': 32}
    assert [fe.out_channels(f'layer{i}') for i in range(1, 5)] == [64, 128, 256, 512]
    x = torch.rand(2, 1, 256, 256)  # grayscale works here too
    with torch.inference_mode():
        feats = fe(x)
        h = (x.repeat(1, 3, 1, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(h))))
        for i in range(1, 5):
            h = getattr(ref, f'layer{i}')(h)
            assert feats[f'layer{i}'].shape == (2, fe.out_channels(f'layer{i}'), 256 // 2 ** (i + 1), 256 // 2 ** (i + 1))
            torch.testing.assert_close(feats[f'layer{i}'], h)  # the weights in the file are the ones used
    assert get_backbone('resnet18', weights=path).layers == ('layer2', 'layer3')


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file
    sd = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / 'resnet18.safetensors'
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load_state_dict_file(path)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_registry_channels_match_architectures():
    "The stage tables of the torchvision backbones match the real modules (built on the meta device: no memory)."
    with torch.device('meta'):
        for name in ('resnet50', 'wide_resnet50_2'):
            stages = BACKBONES[name].stages(BACKBONES[name].build())
            assert [(s.name, s.stride, s.channels) for s in stages] == [
                ('stem', 4, 64), ('layer1', 4, 256), ('layer2', 8, 512), ('layer3', 16, 1024), ('layer4', 32, 2048)]
            assert all(s.channels == s.module[-1].conv3.out_channels for s in stages[1:])


def test_bench_quick():
    cases = bench_backbone(quick=True)
    assert len(cases) == 2 and all(c['seconds'] > 0 for c in cases)
    assert {'ratio_to_wrn50_l2l3', 'ratio_to_lite0_full', 'ratio_to_resnet18_l2l3'} <= set(cases[0])
