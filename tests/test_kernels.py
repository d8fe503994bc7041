"Tests for stampdefect.kernels: knn and greedy_coreset against NumPy/torch references, bad input, GPU kernels."
import os, subprocess, sys, textwrap
import numpy as np
import pytest
import torch

from stampdefect.kernels import knn, greedy_coreset, greedy_coreset_torch, bench_knn, bench_coreset, torch_chunked_knn


def knn_ref(q, b, k):
    "float64 brute force; ties -> lower index (stable sort)."
    d = ((np.asarray(q, np.float64)[:, None, :] - np.asarray(b, np.float64)[None]) ** 2).sum(-1)
    i = np.argsort(d, axis=1, kind='stable')[:, :k]
    return np.take_along_axis(d, i, 1), i


def grid_data(rng, n, d, lo=-3, hi=3):
    "Small integers as float32: every norm, dot product and distance is exact, so ties are exact."
    return rng.integers(lo, hi + 1, (n, d)).astype(np.float32)


# ---------------------------------------------------------------- knn: correctness

@pytest.mark.parametrize('k', [1, 2, 7])
@pytest.mark.parametrize('chunk,block', [(None, None), (64, 100), (1000, 33)])
def test_knn_matches_float64_reference(k, chunk, block):
    rng = np.random.default_rng(k)
    q = rng.standard_normal((257, 19)).astype(np.float32); b = rng.standard_normal((301, 19)).astype(np.float32)
    d, i = knn(q, b, k, chunk_size=chunk, bank_block=block)
    rd, ri = knn_ref(q, b, k)
    assert d.dtype == np.float32 and i.dtype == np.int64 and d.shape == i.shape == (257, k)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(d, rd, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(d, axis=1) >= 0)


@pytest.mark.parametrize('k', [1, 4, 30])
def test_knn_exact_ties_lower_index_first(k):
    rng = np.random.default_rng(0)
    q, b = grid_data(rng, 90, 5, -1, 1), grid_data(rng, 150, 5, -1, 1)   # few distinct values: many ties
    b[100:] = b[:50]                                                      # and duplicated rows
    d, i = knn(q, b, k, chunk_size=32, bank_block=40)
    rd, ri = knn_ref(q, b, k)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(d, rd.astype(np.float32))              # exact arithmetic on the grid


def test_knn_query_equal_to_bank_rows():
    b = np.repeat(np.random.default_rng(1).standard_normal((6, 12)).astype(np.float32), 3, axis=0)
    d, i = knn(b[::3], b, 3)
    np.testing.assert_array_equal(i, np.arange(18).reshape(6, 3))
    assert (d >= 0).all() and d.max() < 1e-5
    assert (d[:, 0] == d[:, 2]).all()


def test_knn_k_equals_bank_size_gives_full_sort():
    rng = np.random.default_rng(2)
    q, b = rng.standard_normal((10, 4)).astype(np.float32), rng.standard_normal((9, 4)).astype(np.float32)
    _, i = knn(q, b, 9)
    np.testing.assert_array_equal(np.sort(i, 1), np.tile(np.arange(9), (10, 1)))
    np.testing.assert_array_equal(i, knn_ref(q, b, 9)[1])


def test_knn_empty_queries():
    d, i = knn(np.zeros((0, 3), np.float32), np.ones((4, 3), np.float32), 2)
    assert d.shape == (0, 2) and i.shape == (0, 2) and i.dtype == np.int64


def test_knn_non_contiguous_inputs():
    rng = np.random.default_rng(3)
    q = np.asfortranarray(rng.standard_normal((120, 16)).astype(np.float32))
    b = rng.standard_normal((400, 32)).astype(np.float32)[::-2, ::2]          # negative and step strides
    _, i = knn(q[::3], b, 3, chunk_size=16, bank_block=50)
    np.testing.assert_array_equal(i, knn_ref(q[::3], b, 3)[1])


@pytest.mark.parametrize('qdt,bdt', [(np.float64, np.float64), (np.float16, np.float32), (np.float32, np.float16)])
def test_knn_float_dtypes(qdt, bdt):
    rng = np.random.default_rng(4)
    q, b = grid_data(rng, 40, 6).astype(qdt), grid_data(rng, 70, 6).astype(bdt)
    d, i = knn(q, b, 3)
    rd, ri = knn_ref(q, b, 3)
    np.testing.assert_array_equal(i, ri); assert d.dtype == np.float32


def test_knn_fp16_bank_storage():
    rng = np.random.default_rng(5)
    q, b = rng.standard_normal((50, 24)).astype(np.float32), rng.standard_normal((200, 24)).astype(np.float32)
    d, i = knn(q, b, 4, bank_dtype=np.float16, bank_block=64)
    rd, ri = knn_ref(q, b.astype(np.float16), 4)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(d, rd, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='bank_dtype'):
        knn(q, b, bank_dtype=np.int8)


def test_knn_torch_in_torch_out():
    rng = np.random.default_rng(6)
    q = torch.from_numpy(rng.standard_normal((30, 8)).astype(np.float32)).requires_grad_()
    b = torch.from_numpy(rng.standard_normal((40, 8))).double()
    d, i = knn(q, b, 2)
    assert isinstance(d, torch.Tensor) and isinstance(i, torch.Tensor)
    assert d.dtype == torch.float32 and i.dtype == torch.int64
    np.testing.assert_array_equal(i.numpy(), knn_ref(q.detach().numpy(), b.numpy(), 2)[1])
    d2, i2 = knn(q.detach().numpy(), b, 2)                     # mixed CPU kinds: output follows queries
    assert isinstance(i2, np.ndarray) and (i2 == i.numpy()).all()


def test_knn_gemm_backends_agree():
    rng = np.random.default_rng(11)
    q, b = rng.standard_normal((300, 40)).astype(np.float32), rng.standard_normal((900, 40)).astype(np.float32)
    ref = knn_ref(q, b, 4)
    for gemm in ('auto', 'numpy', 'onednn'):
        d, i = knn(q, b, 4, gemm=gemm, bank_block=256)
        np.testing.assert_array_equal(i, ref[1]); np.testing.assert_allclose(d, ref[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="gemm must be 'auto', 'onednn' or 'numpy'"):
        knn(q, b, gemm='mkl')


def test_knn_read_only_inputs():
    rng = np.random.default_rng(12)
    q, b = rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal((60, 8)).astype(np.float32)
    q.flags.writeable = False; b.flags.writeable = False
    np.testing.assert_array_equal(knn(q, b, 2)[1], knn_ref(q, b, 2)[1])


def test_knn_threads_do_not_change_results():
    rng = np.random.default_rng(7)
    q, b = rng.standard_normal((700, 10)).astype(np.float32), rng.standard_normal((500, 10)).astype(np.float32)
    for k in (1, 3):
        a, b1 = knn(q, b, k, threads=1), knn(q, b, k, threads=2)
        np.testing.assert_array_equal(a[1], b1[1]); np.testing.assert_array_equal(a[0], b1[0])


# ---------------------------------------------------------------- knn: bad input

Q = np.zeros((5, 4), np.float32)
B = np.ones((6, 4), np.float32)


@pytest.mark.parametrize('args,kwargs,exc,msg', [
    ((Q, B[:, :3]), {}, ValueError, 'queries have 4 dimensions but bank rows have 3'),
    ((Q[0], B), {}, ValueError, 'queries must be 2-D'),
    ((Q, B[None]), {}, ValueError, 'bank must be 2-D'),
    ((Q, B[:0]), {}, ValueError, 'bank is empty'),
    ((Q, B), {'k': 0}, ValueError, 'k must be >= 1'),
    ((Q, B), {'k': 7}, ValueError, r'k=7 is larger than the bank \(6 rows\)'),
    ((Q, B), {'k': 1.5}, TypeError, 'k must be an integer'),
    ((Q, B), {'k': True}, TypeError, 'k must be an integer'),
    ((Q, B), {'chunk_size': 0}, ValueError, 'chunk_size must be >= 1'),
    ((Q.astype(np.int32), B), {}, TypeError, 'queries must be a floating-point array'),
    ((Q, B.astype(bool)), {}, TypeError, 'bank must be a floating-point array'),
    ((Q, torch.ones(6, 4, dtype=torch.bfloat16)), {}, TypeError, 'bank must be a floating-point tensor'),
    ((Q[:, :0], B[:, :0]), {}, ValueError, 'queries has 0 feature dimensions'),
])
def test_knn_bad_input(args, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        knn(*args, **kwargs)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize('which', ['queries', 'bank'])
def test_knn_nonfinite_names_argument_and_row(bad, which):
    q, b = Q.copy(), B.copy()
    (q if which == 'queries' else b)[3, 2] = bad
    with pytest.raises(ValueError, match=rf'{which} contains NaN or inf \(first in row 3\)'):
        knn(q, b)


def test_knn_overflowing_values():
    b = B.astype(np.float64); b[2, 0] = 1e30                     # finite, but not in float32
    with pytest.raises(ValueError, match='bank row 2 is too large'):
        knn(Q, b)


# ---------------------------------------------------------------- coreset

@pytest.mark.parametrize('N,D,n,seed', [(2000, 300, 40, 0), (1500, 64, 30, 1), (500, 129, 500, 2)])
def test_coreset_equals_torch_reference(N, D, n, seed):
    x = np.random.default_rng(seed).standard_normal((N, D)).astype(np.float32)
    ours = greedy_coreset(x, n=n, seed=seed)
    ref = greedy_coreset_torch(torch.from_numpy(x), n=n, seed=seed)
    assert ours.dtype == np.int64 and ours.shape == (n,)
    np.testing.assert_array_equal(ours, ref.numpy())


def test_coreset_is_farthest_point_sequence():
    "Without projection (D <= proj_dim) each pick is the farthest point from the ones before (float64 check)."
    x = np.random.default_rng(3).standard_normal((400, 5)).astype(np.float32)
    sel = greedy_coreset(x, n=25)
    for t in range(1, 25):
        dist = ((x[:, None].astype(np.float64) - x[sel[:t]][None]) ** 2).sum(-1).min(1)
        assert dist[sel[t]] == pytest.approx(dist.max(), rel=1e-9)


def test_coreset_n_equals_N_is_a_permutation_even_with_duplicates():
    x = np.repeat(np.random.default_rng(4).standard_normal((7, 3)).astype(np.float32), 3, axis=0)
    sel = greedy_coreset(x, n=21)
    assert sorted(sel.tolist()) == list(range(21))
    assert len(set((sel[:7] // 3).tolist())) == 7                    # distinct points first
    np.testing.assert_array_equal(sel, greedy_coreset_torch(x, n=21).numpy())


def test_coreset_determinism_and_seed():
    x = np.random.default_rng(5).standard_normal((1000, 200)).astype(np.float32)
    a, b = greedy_coreset(x, ratio=0.02, seed=11), greedy_coreset(x, ratio=0.02, seed=11)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 20
    c = greedy_coreset(x, ratio=0.02, seed=12)
    assert not np.array_equal(a, c)


def test_coreset_torch_in_torch_out_and_dtypes():
    x = np.random.default_rng(6).standard_normal((300, 16))
    out = greedy_coreset(torch.from_numpy(x), n=10)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64
    np.testing.assert_array_equal(out.numpy(), greedy_coreset(x.astype(np.float32), n=10))
    np.testing.assert_array_equal(greedy_coreset(np.asfortranarray(x)[::2], n=5), greedy_coreset(x[::2].copy(), n=5))


@pytest.mark.parametrize('kwargs,exc,msg', [
    ({}, ValueError, 'exactly one of n or ratio'),
    ({'n': 5, 'ratio': 0.1}, ValueError, 'exactly one of n or ratio'),
    ({'n': 0}, ValueError, 'n must be >= 1'),
    ({'n': 101}, ValueError, r'n=101 is larger than the number of features \(100\)'),
    ({'n': 2.0}, TypeError, 'n must be an integer'),
    ({'ratio': 0.0}, ValueError, r'ratio must be in \(0, 1\]'),
    ({'ratio': 1.5}, ValueError, r'ratio must be in \(0, 1\]'),
    ({'ratio': '0.1'}, TypeError, 'ratio must be a number'),
    ({'n': 3, 'proj_dim': 0}, ValueError, 'proj_dim must be >= 1'),
])
def test_coreset_bad_arguments(kwargs, exc, msg):
    x = np.zeros((100, 4), np.float32)
    with pytest.raises(exc, match=msg):
        greedy_coreset(x, **kwargs)
    with pytest.raises(exc, match=msg):
        greedy_coreset_torch(x, **kwargs)


def test_coreset_bad_features():
    with pytest.raises(ValueError, match='features is empty'):
        greedy_coreset(np.zeros((0, 3), np.float32), n=1)
    with pytest.raises(TypeError, match='features must be a floating-point'):
        greedy_coreset(np.zeros((5, 3), np.int64), n=1)
    with pytest.raises(ValueError, match='features must be 2-D'):
        greedy_coreset(np.zeros(5, np.float32), n=1)
    x = np.zeros((5, 3), np.float32); x[4, 1] = np.nan
    with pytest.raises(ValueError, match=r'features contains NaN or inf \(first in row 4\)'):
        greedy_coreset(x, n=2)


# ---------------------------------------------------------------- the chunked torch baseline: both former copies

def _old_kernels_baseline(q, b, k, chunk=1024):
    "kernels._torch_chunked_knn before torch_chunked_knn, verbatim (squared distances)."
    q, b = torch.as_tensor(q), torch.as_tensor(b)
    out_d, out_i = [], []
    for s in range(0, len(q), chunk):
        x = q[s:s + chunk]
        dist = x.pow(2).sum(-1, keepdim=True) - 2 * torch.matmul(x, b.T) + b.pow(2).sum(-1, keepdim=True).T
        dist = dist.clamp_min_(0)
        if k == 1:
            v, i = dist.min(1); out_d.append(v[:, None]); out_i.append(i[:, None])
        else:
            v, i = dist.topk(k, largest=False); out_d.append(v); out_i.append(i)
    return torch.cat(out_d), torch.cat(out_i)


def _old_patchcore_baseline(queries, bank, k=1, chunk_size=1024):
    "models/patchcore.torch_chunked_nn before torch_chunked_knn, verbatim (Euclidean distances)."
    bank = bank.float()
    bank_sq = bank.pow(2).sum(1)
    dists, idxs = [], []
    for q in queries.float().split(chunk_size):
        d = (q.pow(2).sum(1, keepdim=True) - 2 * q @ bank.T + bank_sq).clamp_min_(0).sqrt_()
        v, i = d.min(1, keepdim=True) if k == 1 else d.topk(k, dim=1, largest=False)
        dists.append(v); idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


@pytest.mark.parametrize('k', [1, 4])
def test_torch_chunked_knn_is_both_former_copies(k):
    rng = np.random.default_rng(11)
    q, b = rng.standard_normal((2100, 24)).astype(np.float32), rng.standard_normal((300, 24)).astype(np.float32)
    d, i = torch_chunked_knn(q, b, k)
    od, oi = _old_kernels_baseline(q, b, k)
    assert torch.equal(d, od) and torch.equal(i, oi)
    d, i = torch_chunked_knn(torch.from_numpy(q), torch.from_numpy(b), k, squared=False)
    od, oi = _old_patchcore_baseline(torch.from_numpy(q), torch.from_numpy(b), k)
    assert torch.equal(d, od) and torch.equal(i, oi)
    ref = torch.cdist(torch.from_numpy(q), torch.from_numpy(b)).topk(k, largest=False)
    assert torch.allclose(d, ref.values, atol=1e-4) and torch.equal(i, ref.indices)
    with pytest.raises(ValueError, match='k must be'):
        torch_chunked_knn(q, b, k=301)
    with pytest.raises(ValueError, match='share D'):
        torch_chunked_knn(q, b[:, :10])


# ---------------------------------------------------------------- benchmarks (quick sizes)

def test_quick_benches_run_and_agree():
    cases = bench_knn(quick=True)
    assert [c['case'] for c in cases] == ['knn_D64_k1', 'knn_D128_k9']
    for c in cases:
        assert c['ratio_to_torch_chunked'] > 0 and c['agree_idx_torch_chunked'] >= 0.999
    (c,) = bench_coreset(quick=True)
    assert c['same_selection'] and c['ratio_to_torch_plain'] > 0


# ---------------------------------------------------------------- Numba-CUDA kernels in the simulator

SIM_SCRIPT = textwrap.dedent('''
    import numpy as np
    from numba import cuda
    assert cuda.is_available() and cuda.simulator is not None   # the simulator, not a GPU
    from stampdefect.kernels import _cuda_topk_kernel, _coreset_cuda_loop, _kcenter_greedy, knn
    rng = np.random.default_rng(0)
    q = rng.integers(-1, 2, (5, 4)).astype(np.float32)         # grid values: exact arithmetic, many ties
    b = rng.integers(-1, 2, (23, 4)).astype(np.float32)
    qn, bn = (q * q).sum(1), (b * b).sum(1)
    for k, tpb in ((1, 4), (3, 2)):
        top_d = np.full((5, k), np.inf, np.float32); top_i = np.full((5, k), -1, np.int64)
        kern = _cuda_topk_kernel(k, tpb)
        for j0 in (0, 10, 20):
            T = np.ascontiguousarray(q @ b[j0:j0 + 10].T)      # (queries, bank block)
            kern[5, tpb](T, qn, bn[j0:j0 + 10], j0, top_d, top_i)
        d, i = knn(q, b, k)
        assert (top_i == i).all(), (k, top_i, i)
        assert (top_d == d).all(), (k, top_d, d)
    x = rng.standard_normal((14, 3)).astype(np.float32)
    x[10:] = x[:4]                                              # duplicates; n = N must still be a permutation
    for n, nblocks in ((5, 3), (14, 2)):
        sel = np.empty(n, np.int64); sel[0] = 7
        mind = np.full(14, np.inf); pv = np.empty(nblocks); pi = np.empty(nblocks, np.int64)
        _coreset_cuda_loop(np.ascontiguousarray(x.T), mind, sel, pv, pi, 4)
        ref = _kcenter_greedy(x, 7, n, 3)
        assert (sel == ref).all(), (sel, ref)
    assert sorted(sel) == list(range(14))
    print('SIM-OK')
''')


def test_numba_cuda_kernels_in_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM='1')
    r = subprocess.run([sys.executable, '-c', SIM_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'SIM-OK' in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- GPU (CuPy + a CUDA device)

@pytest.mark.gpu
@pytest.mark.parametrize('k', [1, 9, 40])
def test_knn_gpu_matches_cpu(k):
    cp = pytest.importorskip('cupy')
    rng = np.random.default_rng(8)
    q, b = rng.standard_normal((3000, 96)).astype(np.float32), rng.standard_normal((5000, 96)).astype(np.float32)
    d, i = knn(cp.asarray(q), cp.asarray(b), k, chunk_size=1000, bank_block=1500)
    assert isinstance(d, cp.ndarray) and d.dtype == cp.float32 and i.dtype == cp.int64
    rd, ri = knn(q, b, k)
    assert (cp.asnumpy(i) == ri).mean() > 0.999
    np.testing.assert_allclose(cp.asnumpy(d), rd, rtol=1e-4, atol=1e-3)
    gq, gb = grid_data(rng, 500, 6, -1, 1), grid_data(rng, 700, 6, -1, 1)          # exact ties
    np.testing.assert_array_equal(cp.asnumpy(knn(cp.asarray(gq), cp.asarray(gb), k, bank_block=256)[1]), knn_ref(gq, gb, k)[1])


@pytest.mark.gpu
def test_knn_gpu_torch_cuda_and_fp16_and_errors():
    cp = pytest.importorskip('cupy')
    rng = np.random.default_rng(9)
    q, b = rng.standard_normal((300, 32)).astype(np.float32), rng.standard_normal((900, 32)).astype(np.float32)
    d, i = knn(torch.from_numpy(q).cuda(), torch.from_numpy(b).cuda().half(), 3)
    assert isinstance(i, torch.Tensor) and i.is_cuda
    np.testing.assert_array_equal(i.cpu().numpy(), knn(q, b.astype(np.float16), 3)[1])
    bad = cp.asarray(b); bad[5, 1] = cp.nan
    with pytest.raises(ValueError, match=r'bank contains NaN or inf \(first in row 5\)'):
        knn(cp.asarray(q), bad)
    with pytest.raises(ValueError, match='same device'):
        knn(cp.asarray(q), b)
    with pytest.raises(ValueError, match='GPU limit'):
        knn(cp.asarray(q), cp.asarray(b), 129)


@pytest.mark.gpu
def test_coreset_gpu_matches_cpu_and_torch_cuda():
    cp = pytest.importorskip('cupy')
    x = np.random.default_rng(10).standard_normal((20000, 256)).astype(np.float32)
    cpu = greedy_coreset(x, n=100, seed=4)
    gpu = greedy_coreset(cp.asarray(x), n=100, seed=4)
    assert isinstance(gpu, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(gpu), cpu)
    tc = greedy_coreset(torch.from_numpy(x).cuda(), n=100, seed=4)
    assert tc.is_cuda
    np.testing.assert_array_equal(tc.cpu().numpy(), cpu)
    np.testing.assert_array_equal(greedy_coreset_torch(torch.from_numpy(x).cuda(), n=100, seed=4).cpu().numpy(), cpu)
