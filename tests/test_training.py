"""The shared training loop: determinism, exact resume from weights-only checkpoints, AMP policy, bad input."""
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stampdefect.training import (History, get_rng_state, load_checkpoint, plot_history, random_crops, seed_everything,
                                  set_rng_state, shuffled_batches, train)

IMAGES = [torch.rand(1, 48, 40, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def make(init_seed=0, scheduler=True):
    torch.manual_seed(init_seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.2), nn.Conv2d(8, 1, 3, padding=1))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if scheduler else None
    return net, opt, sched


def step_fn(net, crash_at=None):
    calls = [0]
    def step(x):
        calls[0] += 1
        if calls[0] == crash_at: raise KeyboardInterrupt('simulated crash')
        noisy = x + 0.1 * torch.randn_like(x) + 0.01 * np.random.rand() + 0.01 * random.random()
        return {'loss': F.mse_loss(noisy - net(noisy), x), 'scale': torch.tensor(2.0), 'plain': 1.5}
    return step


DATA = random_crops(IMAGES, 16, batch_size=4, batches_per_epoch=3)   # epochs of 3 batches: resume crosses epochs


def run(steps, ckpt=None, crash_at=None, init_seed=0, seed=5, **kw):
    net, opt, sched = make(init_seed)
    h = train(step_fn(net, crash_at), net, opt, DATA, steps, scheduler=sched, ckpt_path=ckpt, ckpt_every=4,
              seed=seed, progress=False, log_every=3, **kw)
    return net, opt, sched, h


def params(net): return [p.detach().clone() for p in net.parameters()]


def test_resume_after_crash_is_bit_identical(tmp_path):
    a, opt_a, sched_a, h_a = run(10)
    ck = tmp_path / 'c.ckpt'
    with pytest.raises(KeyboardInterrupt):
        run(10, ck, crash_at=7)                      # checkpoint at step 4, crash during step 7 (epoch 3)
    assert load_checkpoint(ck)['step'] == 4
    np.random.rand(3); random.random(); torch.rand(7)   # disturb the global generators
    b, opt_b, sched_b, h_b = run(10, ck, init_seed=99)
    assert h_b.resumed_from == 4
    for p, q in zip(a.parameters(), b.parameters()): assert torch.equal(p, q)
    assert h_a.values == h_b.values and len(h_b) == 10
    assert sched_a.get_last_lr() == sched_b.get_last_lr()
    sa, sb = opt_a.state_dict()['state'], opt_b.state_dict()['state']
    for k in sa: assert torch.equal(sa[k]['exp_avg_sq'], sb[k]['exp_avg_sq'])
    assert [p.name for p in tmp_path.iterdir()] == ['c.ckpt']   # atomic writes leave no temporary files


def test_checkpoint_is_weights_only_and_complete(tmp_path):
    run(5, tmp_path / 'c.ckpt')
    ck = torch.load(tmp_path / 'c.ckpt', weights_only=True)
    assert ck['step'] == 5 and ck['seed'] == 5
    assert set(ck) >= {'modules', 'optimizer', 'scheduler', 'rng', 'data', 'history'}
    assert ck['history']['loss'].shape == (5,)
    assert ck['data']['epoch'] == 1 and ck['data']['batch'] == 2   # 5 batches = one epoch of 3 + 2


def test_extending_a_finished_run_equals_a_longer_run(tmp_path):
    a, *_ = run(9)
    run(6, tmp_path / 'c.ckpt')
    b, _, _, h = run(9, tmp_path / 'c.ckpt')
    assert h.resumed_from == 6
    for p, q in zip(a.parameters(), b.parameters()): assert torch.equal(p, q)


def test_seed_determinism():
    a, *_ = run(4, seed=1)
    b, *_ = run(4, seed=1)
    c, *_ = run(4, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_history_logs_every_step_and_training_mode_is_restored():
    net, opt, _ = make(scheduler=False)
    net.eval()
    seen = []
    h = train(step_fn(net), net, opt, DATA, 7, log_every=3, progress=False, on_log=lambda s, m: seen.append(s))
    assert isinstance(h, History) and list(h.keys()) == ['loss', 'scale', 'plain'] and len(h) == 7
    assert h['plain'].tolist() == [1.5] * 7 and h.last(2)['scale'] == 2.0
    assert seen == [3, 6, 7]
    assert not net.training
    fig = plot_history(h)
    assert len(fig.axes) == 3


def test_loss_decreases():
    net, opt, _ = make(scheduler=False)
    h = train(step_fn(net), net, opt, DATA, 40, progress=False)
    assert h['loss'][-5:].mean() < h['loss'][:5].mean()


def test_dict_of_modules_and_grad_clip():
    torch.manual_seed(0)
    enc, dec = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1)
    opt = torch.optim.SGD([*enc.parameters(), *dec.parameters()], 0.1)
    h = train(lambda x: {'loss': F.mse_loss(dec(enc(x)), x)}, {'enc': enc, 'dec': dec}, opt, DATA, 3,
              grad_clip=0.01, progress=False)
    assert len(h) == 3


def test_rng_state_roundtrip():
    seed_everything(11)
    s = get_rng_state()
    a = (random.random(), np.random.randn(), torch.randn(2).tolist())
    set_rng_state(s)
    assert (random.random(), np.random.randn(), torch.randn(2).tolist()) == a


def test_data_functions():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(7.)
    assert sorted(torch.cat(list(shuffled_batches(x, 7)(g))).tolist()) == list(range(7))
    crops = list(random_crops(IMAGES, 16, 5, batches_per_epoch=2)(g))
    assert len(crops) == 2 and crops[0].shape == (5, 1, 16, 16)
    with pytest.raises(ValueError, match='images\\[1\\]'):
        random_crops([torch.rand(1, 20, 20), torch.rand(1, 8, 30)], 16, 2)
    with pytest.raises(TypeError, match='images must be'):
        random_crops(np.zeros((1, 1, 20, 20)), 16, 2)


def test_amp_policy_on_cpu():
    net, opt, _ = make(scheduler=False)
    with pytest.raises(ValueError, match='CUDA'):
        train(step_fn(net), net, opt, DATA, 2, amp=True, progress=False)
    with pytest.raises(ValueError, match='amp must be'):
        train(step_fn(net), net, opt, DATA, 2, amp='yes', progress=False)
    h = train(step_fn(net), net, opt, DATA, 2, amp='auto', progress=False)   # auto = off on the CPU
    assert len(h) == 2


@pytest.mark.parametrize('bad_step, err, msg', [
    (lambda net: (lambda x: F.mse_loss(net(x), x)), TypeError, 'dict of scalar losses'),
    (lambda net: (lambda x: {}), TypeError, 'dict of scalar losses'),
    (lambda net: (lambda x: {'loss': F.mse_loss(net(x), x).detach()}), ValueError, 'does not require grad'),
    (lambda net: (lambda x: {'loss': net(x).mean(1)}), TypeError, 'scalar tensor'),
    (lambda net: (lambda x: {'loss': F.mse_loss(net(x), x) / 0 * 0}), FloatingPointError, 'at step 1'),
])
def test_bad_step_functions(bad_step, err, msg):
    net, opt, _ = make(scheduler=False)
    before = params(net)
    with pytest.raises(err, match=msg):
        train(bad_step(net), net, opt, DATA, 3, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(before, net.parameters()))   # nothing reached the weights


def test_changing_keys_is_an_error():
    net, opt, _ = make(scheduler=False)
    calls = [0]
    def step(x):
        calls[0] += 1
        out = {'loss': F.mse_loss(net(x), x)}
        if calls[0] == 2: out['extra'] = 1.0
        return out
    with pytest.raises(ValueError, match='same keys'):
        train(step, net, opt, DATA, 3, progress=False)


def test_bad_arguments(tmp_path):
    net, opt, sched = make()
    s = step_fn(net)
    with pytest.raises(ValueError, match='steps must be'): train(s, net, opt, DATA, 0, progress=False)
    with pytest.raises(ValueError, match='ckpt_every'): train(s, net, opt, DATA, 2, ckpt_every=-1, progress=False)
    with pytest.raises(TypeError, match='data must be a function'): train(s, net, opt, IMAGES, 2, progress=False)
    with pytest.raises(TypeError, match='optimizer'): train(s, net, None, DATA, 2, progress=False)
    with pytest.raises(TypeError, match='modules'): train(s, [net], opt, DATA, 2, progress=False)
    with pytest.raises(ValueError, match='no batches'): train(s, net, opt, lambda g: [], 2, progress=False)
    with pytest.raises(ValueError, match='grad_clip'): train(s, net, opt, DATA, 2, grad_clip=0, progress=False)


def test_bad_checkpoints(tmp_path):
    ck = tmp_path / 'c.ckpt'
    run(4, ck, seed=1)
    with pytest.raises(ValueError, match='seed=1'): run(6, ck, seed=2)
    with pytest.raises(ValueError, match='beyond steps=3'): run(3, ck, seed=1)
    net, opt, _ = make(scheduler=False)
    with pytest.raises(ValueError, match='with a scheduler'):
        train(step_fn(net), net, opt, DATA, 6, ckpt_path=ck, seed=1, progress=False)
    other = nn.Conv2d(1, 2, 3)
    with pytest.raises(ValueError, match='does not fit'):
        train(lambda x: {'loss': other(x).mean()}, other, torch.optim.SGD(other.parameters(), 0.1), DATA, 6,
              ckpt_path=ck, seed=1, progress=False, scheduler=torch.optim.lr_scheduler.StepLR(opt, 2))
    (tmp_path / 'junk.ckpt').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='junk.ckpt'): run(4, tmp_path / 'junk.ckpt')
    torch.save({'a': torch.zeros(1)}, tmp_path / 'other.ckpt')
    with pytest.raises(ValueError, match='not a stampdefect training checkpoint'): run(4, tmp_path / 'other.ckpt')
    with pytest.raises(FileNotFoundError): load_checkpoint(tmp_path / 'missing.ckpt')
    run(4, ck, seed=3, resume=False)   # resume=False starts over and overwrites
    assert load_checkpoint(ck)['seed'] == 3


@pytest.mark.gpu
def test_amp_on_cuda(tmp_path):
    if not torch.cuda.is_available(): pytest.skip('no CUDA device')
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 1, 3, padding=1)).cuda()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    seen = {}
    def step(x):
        y = net(x)
        seen['dtype'] = y.dtype
        return {'loss': F.mse_loss(y.float(), x)}
    h = train(step, net, opt, DATA, 30, ckpt_path=tmp_path / 'c.ckpt', progress=False)
    assert seen['dtype'] == torch.float16
    assert h['loss'][-5:].mean() < h['loss'][:5].mean()
    assert load_checkpoint(tmp_path / 'c.ckpt')['scaler'] is not None
    net2 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 1, 3, padding=1)).cuda()
    h2 = train(step, net2, torch.optim.Adam(net2.parameters(), 1e-2), DATA, 30, amp=False, progress=False)
    assert seen['dtype'] == torch.float32 and len(h2) == 30


def test_dataloader_as_data_function_resumes_exactly(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset
    ds = TensorDataset(torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(3)))
    data = lambda gen: (b[0] for b in DataLoader(ds, batch_size=4, shuffle=True, generator=gen))
    def go(steps, ckpt=None):
        net, opt, _ = make(scheduler=False)
        train(step_fn(net), net, opt, data, steps, ckpt_path=ckpt, ckpt_every=3, progress=False)
        return net
    a = go(8)
    go(4, tmp_path / 'c')        # stops mid-epoch (epochs of 3 batches)
    b = go(8, tmp_path / 'c')
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
