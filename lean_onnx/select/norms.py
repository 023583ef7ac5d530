"""Operator norms of single convolution kernels (lean-spec section 2).

LEAN weights every graph edge with the spectral norm of the single-channel convolution that one 2-D
kernel ``W[j, i]`` performs.  The norm is taken for the *circular* (periodic) convolution on a fixed
grid, which is exactly computable in the Fourier domain (Sedghi, Gupta and Long, 2019).

Method
------
With stride ``s`` and dilation ``d`` (per axis), an input grid ``N`` is treated as the periodic grid
``s*M`` with ``M = ceil(N / s)`` output positions.  Tap ``a`` sits at ``p = d*a``; it belongs to the
polyphase component ``r = p mod s`` at index ``b = p // s`` of an ``M``-periodic grid.  At each
frequency ``w`` of the ``M``-point DFT the operator is a ``1 x s_h*s_w`` row, so

    sigma^2 = max_w  sum_r |W_r(w)|^2 = max_w  sum_delta R[delta] cos(2 pi w.delta / M),

where ``R[delta]`` sums ``w_a w_a'`` over tap pairs of the same component whose indices differ by
``delta`` (the polyphase autocorrelation).  Lags are reduced modulo ``M`` (a kernel larger than the
grid folds exactly as the circulant does) and ``delta``/``-delta`` are merged, so the power spectrum
of every kernel is one small real GEMM ``R @ cos``; real kernels need only half of the frequencies.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kernel_operator_norms"]

#: Bytes of the largest temporary per chunk (pair products or power spectra); cosine tables of up to
#: 8x this are cached, larger ones (huge grids only) are regenerated block by block for each chunk.
_CHUNK_BYTES = 4 << 20
#: GEMMs up to this m*n*k stay single-threaded in OpenBLAS.  These GEMMs are memory-bound (inner
#: dimension ~10), so threads gain little when the machine is idle but cost up to 10x when another
#: process holds a core; bounding the chunk keeps ResNet-50 near 0.2 s either way.
_SINGLE_THREAD_MNK = 1 << 18


def _pair(value, name):
    """Return ``value`` as a pair of positive ints (an int means both axes)."""
    if np.ndim(value) == 0:
        value = (value, value)
    out = tuple(int(v) for v in value)
    if len(out) != 2 or min(out) < 1 or any(o != v for o, v in zip(out, value)):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return out


def _axis_taps(k, s, d, n):
    """Per-axis polyphase component, folded index and output grid size ``M`` of ``k`` taps."""
    m = -(-n // s)
    p = d * np.arange(k)
    return p % s, (p // s) % m, m


def _lag_plan(kshape, stride, dilation, grid):
    """Pair selection and lag classes shared by every kernel of one shape.

    Returns ``(ia, ib, factor, cls, lags, (Mh, Mw))``: flat tap pairs ``ia <= ib`` in the same polyphase
    component, their multiplicity (1 on the diagonal, 2 off it), their lag class, and one
    representative lag ``(delta_h, delta_w)`` per class.
    """
    rh, bh, mh = _axis_taps(kshape[0], stride[0], dilation[0], grid[0])
    rw, bw, mw = _axis_taps(kshape[1], stride[1], dilation[1], grid[1])
    r = (rh[:, None] * stride[1] + rw[None, :]).ravel()
    bh2 = np.repeat(bh, kshape[1])
    bw2 = np.tile(bw, kshape[0])
    ia, ib = np.triu_indices(r.size)
    keep = r[ia] == r[ib]
    ia, ib = ia[keep], ib[keep]
    dh, dw = (bh2[ia] - bh2[ib]) % mh, (bw2[ia] - bw2[ib]) % mw
    code = np.minimum(dh * mw + dw, (-dh % mh) * mw + (-dw % mw))  # merge delta and -delta
    codes, cls = np.unique(code, return_inverse=True)
    factor = np.where(ia == ib, 1.0, 2.0)
    return ia, ib, factor, cls.ravel(), np.stack([codes // mw, codes % mw], 1), (mh, mw)


def _cos_tables(lags, m_grid, dtype):
    """Yield ``cos(2 pi (w_h delta_h / M_h + w_w delta_w / M_w))``, shape (freqs, lags), in blocks.

    Only the half-plane ``w_w <= M_w // 2`` is needed (the spectrum of a real kernel is even).
    """
    mh, mw = m_grid
    wh, ww = np.divmod(np.arange(mh * (mw // 2 + 1)), mw // 2 + 1)
    step = max(1, _CHUNK_BYTES // (8 * len(lags)))
    for lo in range(0, wh.size, step):
        turns = (np.outer(wh[lo:lo + step], lags[:, 0]) % mh) / mh
        turns += (np.outer(ww[lo:lo + step], lags[:, 1]) % mw) / mw
        yield np.cos(2.0 * np.pi * turns).astype(dtype)


def kernel_operator_norms(weights, *, stride=(1, 1), dilation=(1, 1), grid=(16, 16)) -> np.ndarray:
    """Spectral norm of the circular convolution with each single 2-D kernel.

    Parameters
    ----------
    weights : array_like, shape (n_out, n_in, kh, kw)
        Convolution weights (float16, float32 or float64), ONNX ``Conv`` layout.
    stride, dilation : int or (int, int)
        Stride and dilation along (height, width).
    grid : int or (int, int)
        Periodic input grid ``(Nh, Nw)``.  The output grid is ``M = ceil(N / s)`` and the circulant
        acts on the input grid ``s * M`` (``N`` itself when the stride divides it).

    Returns
    -------
    numpy.ndarray of float64, shape (n_out, n_in)
        ``sigma[j, i]``: largest singular value of the single-channel periodic, strided, dilated
        cross-correlation with ``weights[j, i]``.  Convolution and correlation have the same norm.

    Notes
    -----
    The power spectrum is accumulated in float32 (float64 for float64 weights) and the final
    square root in float64.  A 1x1 kernel has ``sigma = |w|`` exactly, and a kernel whose taps all lie
    in different polyphase components (e.g. ``k = s = 2``) has its Frobenius norm; both skip the
    transform.  Memory stays bounded (chunks of about 4 MB) whatever the layer size.

    ``ConvTranspose`` is the caller's business: ``sigma(T^T) = sigma(T)``, so a ConvTranspose with
    stride ``s`` on an input grid ``n`` is the adjoint of the strided conv with the same kernel on the
    grid ``s * n``.  Pass its ``(C_in, C_out/g, kh, kw)`` weights with ``grid = s * n`` and transpose
    the first two axes of the result (or of the weights).

    References
    ----------
    Sedghi, Gupta, Long (2019), The singular values of convolutional layers.  ICLR 2019.

    Examples
    --------
    >>> w = np.array([[[[1.0, 1.0], [1.0, 1.0]]]])
    >>> kernel_operator_norms(w, grid=(8, 8))      # DC gain of the 2x2 box
    array([[4.]])
    >>> kernel_operator_norms(w, stride=2)         # k = s = 2: Frobenius norm
    array([[2.]])
    """
    w = np.asarray(weights)
    if w.ndim != 4 or not np.issubdtype(w.dtype, np.number):
        raise ValueError(f"weights must be a numeric (n_out, n_in, kh, kw) array, got shape {w.shape}")
    stride, dilation, grid = _pair(stride, "stride"), _pair(dilation, "dilation"), _pair(grid, "grid")
    n_out, n_in, kh, kw = w.shape
    if kh * kw == 1 or w.size == 0:
        return np.abs(w.reshape(n_out, n_in).astype(np.float64))
    dtype = np.float64 if w.dtype == np.float64 else np.float32
    flat_t = w.reshape(-1, kh * kw).T
    ia, ib, factor, cls, lags, m_grid = _lag_plan((kh, kw), stride, dilation, grid)
    select = np.zeros((len(lags), ia.size), dtype)
    np.add.at(select, (cls, np.arange(ia.size)), factor)
    n_freq = m_grid[0] * (m_grid[1] // 2 + 1)
    if len(lags) == 1:  # lag 0 only (e.g. k = s): flat spectrum, no transform needed
        n_freq, cached = 1, [np.ones((1, 1), dtype)]
    else:  # cache the cosine table unless it exceeds 8 * _CHUNK_BYTES in float64
        cached = list(_cos_tables(lags, m_grid, dtype)) if len(lags) * n_freq <= _CHUNK_BYTES else None
    blocks = (lambda: cached) if cached else (lambda: _cos_tables(lags, m_grid, dtype))
    width = min(n_freq, max(1, _CHUNK_BYTES // (8 * len(lags))))  # rows of the largest table block
    step = max(1, min(_CHUNK_BYTES // 8, _SINGLE_THREAD_MNK // len(lags)) // max(ia.size, width))
    out = np.empty(flat_t.shape[1], np.float64)
    for lo in range(0, flat_t.shape[1], step):  # kernels along the columns: fast gathers and maxima
        c = np.ascontiguousarray(flat_t[:, lo:lo + step], dtype)
        autocorr = select @ (c[ia] * c[ib])
        best = np.full(c.shape[1], -np.inf, dtype)
        for table in blocks():
            np.maximum(best, (table @ autocorr).max(axis=0), out=best)
        out[lo:lo + step] = best
    return np.sqrt(np.maximum(out, 0.0)).reshape(n_out, n_in)
