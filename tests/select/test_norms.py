"""Tests of lean_onnx.select.norms (and graph.handlers.average_pool_norm) against explicit periodic convolution matrices."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lean_onnx.graph.handlers import average_pool_norm
from lean_onnx.select import norms
from lean_onnx.select.norms import kernel_operator_norms


def conv_matrix(w, stride, dilation, grid):
    """Explicit matrix of the periodic strided, dilated cross-correlation y[m] = sum_a w[a] x[s*m + d*a]."""
    (kh, kw), (sh, sw), (dh, dw) = w.shape, stride, dilation
    mh, mw = -(-grid[0] // sh), -(-grid[1] // sw)
    lh, lw = sh * mh, sw * mw  # input grid of the circulant
    a = np.zeros((mh * mw, lh * lw))
    for m in range(mh):
        for n in range(mw):
            for i in range(kh):
                for j in range(kw):
                    x, y = (sh * m + dh * i) % lh, (sw * n + dw * j) % lw
                    a[m * mw + n, x * lw + y] += w[i, j]
    return a


def transposed_conv_matrix(w, stride, dilation, in_grid):
    """Explicit matrix of the periodic ConvTranspose y[s*m + d*a] += w[a] x[m] (scatter form)."""
    (kh, kw), (sh, sw), (dh, dw) = w.shape, stride, dilation
    lh, lw = sh * in_grid[0], sw * in_grid[1]
    a = np.zeros((lh * lw, in_grid[0] * in_grid[1]))
    for m in range(in_grid[0]):
        for n in range(in_grid[1]):
            for i in range(kh):
                for j in range(kw):
                    x, y = (sh * m + dh * i) % lh, (sw * n + dw * j) % lw
                    a[x * lw + y, m * in_grid[1] + n] += w[i, j]
    return a


def single(w, **kw):
    return kernel_operator_norms(w[None, None], **kw)[0, 0]


CASES = [(k, s, d) for k in (1, 2, 3, 5, 7) for s in (1, 2, 3) for d in (1, 2, 3)]


@pytest.mark.parametrize("k,s,d", CASES)
def test_matches_explicit_matrix(k, s, d):
    rng = np.random.default_rng(1000 * k + 10 * s + d)
    w = rng.uniform(-10, 10, (k, k))
    grid = (18, 18) if s == 3 else (12, 12)
    expected = np.linalg.norm(conv_matrix(w, (s, s), (d, d), grid), 2)
    got = single(w, stride=(s, s), dilation=(d, d), grid=grid)
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("k,s,d", [(3, 1, 1), (3, 2, 1), (5, 2, 2), (7, 3, 1), (2, 2, 3)])
def test_float32_weights_match_explicit_matrix(k, s, d):
    # float32 weights take the float32 path; the oracle uses the same (rounded) values in float64.
    w = np.random.default_rng(k + s + d).standard_normal((k, k)).astype(np.float32)
    expected = np.linalg.norm(conv_matrix(w.astype(np.float64), (s, s), (d, d), (12, 12)), 2)
    got = single(w, stride=(s, s), dilation=(d, d), grid=(12, 12))
    assert got == pytest.approx(expected, rel=1e-6)


def test_float16_weights():
    w = np.random.default_rng(5).standard_normal((3, 3)).astype(np.float16)
    expected = np.linalg.norm(conv_matrix(w.astype(np.float64), (1, 1), (1, 1), (8, 8)), 2)
    assert single(w, grid=(8, 8)) == pytest.approx(expected, rel=1e-6)


def test_non_square_grid_and_kernel():
    w = np.random.default_rng(7).standard_normal((3, 5))
    stride, dilation, grid = (2, 3), (1, 2), (10, 12)
    expected = np.linalg.norm(conv_matrix(w, stride, dilation, grid), 2)
    got = single(w, stride=stride, dilation=dilation, grid=grid)
    assert got == pytest.approx(expected, rel=1e-6)


def test_stride_not_dividing_grid_uses_grid_s_times_m():
    w = np.random.default_rng(8).standard_normal((3, 3))
    expected = np.linalg.norm(conv_matrix(w, (2, 2), (1, 1), (13, 13)), 2)  # circulant on 14x14
    assert single(w, stride=(2, 2), grid=(13, 13)) == pytest.approx(expected, rel=1e-6)
    assert single(w, stride=(2, 2), grid=(13, 13)) == pytest.approx(single(w, stride=2, grid=14), rel=1e-12)


@pytest.mark.parametrize("k,s,d,grid", [(5, 1, 2, (4, 4)), (7, 2, 2, (6, 4)), (3, 1, 3, (2, 3)), (5, 1, 1, (1, 1))])
def test_folding_when_grid_smaller_than_dilated_kernel(k, s, d, grid):
    w = np.random.default_rng(k * d).standard_normal((k, k))
    expected = np.linalg.norm(conv_matrix(w, (s, s), (d, d), grid), 2)
    got = single(w, stride=(s, s), dilation=(d, d), grid=grid)
    assert got == pytest.approx(expected, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(kshape=st.tuples(st.integers(1, 5), st.integers(1, 5)), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)), grid=st.tuples(st.integers(1, 11), st.integers(1, 11)),
       seed=st.integers(0, 2**32 - 1))
def test_property_matches_explicit_matrix(kshape, stride, dilation, grid, seed):
    w = np.random.default_rng(seed).standard_normal(kshape)
    expected = np.linalg.norm(conv_matrix(w, stride, dilation, grid), 2)
    got = single(w, stride=stride, dilation=dilation, grid=grid)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9 * np.abs(w).sum())


def test_folding_cancellation_gives_zero():
    # On a 1x1 grid the kernel folds to the sum of its taps: [[1, -1]] is the zero operator.
    assert single(np.array([[1.0, -1.0]]), grid=(1, 1)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k,s,d", [(2, 2, 1), (3, 2, 1), (4, 2, 1), (3, 3, 2), (5, 2, 1)])
def test_conv_transpose_is_adjoint(k, s, d):
    w = np.random.default_rng(k * s * d).standard_normal((k, k))
    in_grid = (6, 6)
    expected = np.linalg.norm(transposed_conv_matrix(w, (s, s), (d, d), in_grid), 2)
    got = single(w, stride=(s, s), dilation=(d, d), grid=(s * in_grid[0], s * in_grid[1]))
    assert got == pytest.approx(expected, rel=1e-6)


def test_batch_equals_per_kernel_calls():
    w = np.random.default_rng(3).standard_normal((5, 4, 3, 3))
    got = kernel_operator_norms(w, stride=(2, 2), dilation=(1, 2), grid=(12, 10))
    assert got.shape == (5, 4) and got.dtype == np.float64
    for j in range(5):
        for i in range(4):
            one = kernel_operator_norms(w[j:j + 1, i:i + 1], stride=(2, 2), dilation=(1, 2), grid=(12, 10))
            assert got[j, i] == pytest.approx(one[0, 0], rel=1e-12)


def test_large_layer_is_chunked_consistently():
    w = np.random.default_rng(4).standard_normal((64, 300, 3, 3)).astype(np.float32)
    got = kernel_operator_norms(w, grid=(20, 20))
    ref = np.abs(np.fft.fft2(w.astype(np.float64), s=(20, 20))).max(axis=(2, 3))
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_tiny_chunks_and_uncached_cos_blocks(monkeypatch):
    monkeypatch.setattr(norms, "_CHUNK_BYTES", 4096)  # many kernel chunks and frequency blocks, no cache
    w = np.random.default_rng(6).standard_normal((7, 5, 3, 3))
    got = kernel_operator_norms(w, grid=(40, 40))
    ref = np.abs(np.fft.fft2(w, s=(40, 40))).max(axis=(2, 3))
    np.testing.assert_allclose(got, ref, rtol=1e-9)


def test_one_by_one_is_abs():
    w = np.array([[[[-3.0]], [[0.5]]]], dtype=np.float32)
    got = kernel_operator_norms(w, stride=(2, 2), dilation=(3, 3), grid=(7, 7))
    np.testing.assert_array_equal(got, [[3.0, 0.5]])


def test_average_pool_2x2_stride_2():
    assert average_pool_norm((2, 2), (2, 2)) == 0.5


def test_average_pool_3x3_stride_2_matches_explicit_matrix():
    expected = np.linalg.norm(conv_matrix(np.full((3, 3), 1 / 9), (2, 2), (1, 1), (16, 16)), 2)
    got = average_pool_norm((3, 3), (2, 2))
    assert got == pytest.approx(expected, rel=1e-9)
    # 5/9: at the zero frequency the components carry 4/9, 2/9, 2/9, 1/9 -> sqrt(16+4+4+1)/9.
    assert got == pytest.approx(5 / 9, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(kh=st.integers(1, 5), kw=st.integers(1, 5), sh=st.integers(1, 3), sw=st.integers(1, 3),
       grid=st.integers(4, 12))
def test_average_pool_closed_form_equals_the_periodic_norm(kh, kw, sh, sw, grid):
    """The graph's closed form (zero frequency of a non-negative kernel) is the operator norm that
    kernel_operator_norms computes for the constant kernel, on any grid."""
    kernel = np.full((1, 1, kh, kw), 1.0 / (kh * kw))
    expected = float(kernel_operator_norms(kernel, stride=(sh, sw), grid=(grid, grid))[0, 0])
    assert average_pool_norm((kh, kw), (sh, sw)) == pytest.approx(expected, rel=1e-9)


def test_k_equals_s_equals_2_is_frobenius():
    w = np.random.default_rng(9).standard_normal((3, 2, 2, 2))
    got = kernel_operator_norms(w, stride=(2, 2), grid=(16, 16))
    np.testing.assert_allclose(got, np.sqrt((w ** 2).sum(axis=(2, 3))), rtol=1e-12)


def test_reference_mode_stride_1_grid_128():
    w = np.random.default_rng(11).uniform(-10, 10, (3, 3))
    expected = np.abs(np.fft.fft2(w, s=(128, 128))).max()
    assert single(w, grid=(128, 128)) == pytest.approx(expected, rel=1e-9)


def test_dilation_spec_example():
    # lean-spec 2.4: on a 16 grid, d=3 keeps sigma (gcd(3,16)=1), d=2 can only lower it.
    w = np.random.default_rng(12).standard_normal((3, 3))
    base = single(w, grid=(16, 16))
    assert single(w, dilation=(3, 3), grid=(16, 16)) == pytest.approx(base, rel=1e-9)
    assert single(w, dilation=(2, 2), grid=(16, 16)) <= base * (1 + 1e-9)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        kernel_operator_norms(np.ones((3, 3)))
    with pytest.raises(ValueError):
        kernel_operator_norms(np.ones((1, 1, 3, 3)), stride=(0, 1))
