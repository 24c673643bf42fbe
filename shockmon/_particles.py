"""Particle view of the tracker: pure tensor functions, batched over the ``B`` groups of a bucket.

A bucket holds groups of identical shape ``(n, D)``; its history is a ring of the last ``L`` snapshots, ``pos:
(L, B, n, D)``, with times ``(L,)``. Every function here is vectorised over groups and particles, performs no
host synchronisation and allocates O(B * n * (L + K) * D) at most.

The steps, in order:

1. :func:`window_weights` -- least-squares weights over the ring (slope and mean), the window's centre time,
   and the two variance factors of a least-squares slope: ``sum w^2`` (independent position noise) and
   ``sum_j dt_j c_j^2`` with ``c_j = sum_{k >= j} w_k`` (diffusion, i.e. a random walk on top of the motion).
2. :func:`noise_update` -- robust (MAD) variances of third differences at two lags separate diffusion
   (growing with the lag) from position noise: the diffusion rate ``D_hat = Var(dx)/dt`` and the
   position-noise variance; ``nu = D_hat / 2``.
3. :func:`local_rates_1d` / :func:`local_rates_jacobian` / :func:`local_rates_pairs` -- the local compression
   rate ``lambda_i`` of each particle with its standard error, from its neighbours (sorted neighbours in 1-D,
   k-nearest neighbours otherwise).
4. :func:`reduce_group` -- significance with a Bonferroni correction, the time to shock ``tau = -1/lambda``
   and a robust minimum over the group, the strength and the units most involved.
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist
from typing import Any

import torch

from shockmon._device import to_device

Tensor = torch.Tensor

MAD_TO_SD = 1.482602218505602


def finite(x: Tensor) -> Tensor:
    """``torch.isfinite(x)`` for a floating tensor in two kernels instead of four (``isfinite`` is a composite of
    ``==``, ``abs``, ``!=`` and ``*``): the tracker calls it on small tensors every update, where each kernel
    launch, not the arithmetic, is the cost."""
    return x.abs() < math.inf


def bonferroni_z(alpha: float, tests: int) -> float:
    """One-sided critical ``z``: family-wise error ``alpha`` over ``tests`` comparisons (host arithmetic)."""
    return NormalDist().inv_cdf(1.0 - alpha / max(int(tests), 1))


def window_weights(times: Tensor, filled: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Least-squares weights over a ring of snapshot times.

    Args:
        times: ``(L,)`` float64 ring of times; only the first ``filled`` slots (in ring order) are valid when
            the ring is not yet full.
        filled: number of valid slots (host int, ``>= 2``).

    Returns:
        ``(w_slope, w_mean, t_center, var_iid, var_walk)``: ``w_slope @ x`` is the least-squares slope,
        ``w_mean @ x`` the mean (the fitted value at ``t_center``), and a slope's variance is ``var_iid *
        s_m^2 + var_walk * D`` for position noise of variance ``s_m^2`` and diffusion of rate ``D`` (variance
        per unit time).
    """
    L = times.shape[0]
    valid = torch.arange(L, device=times.device) < filled
    m = valid.to(times.dtype)
    t = torch.where(valid, times, 0.0)
    cnt = float(min(filled, L))
    tbar = (m * t).sum() / cnt
    dt = (t - tbar) * m
    stt = (dt * dt).sum().clamp_min(1e-300)
    w_slope = dt / stt
    w_mean = m / cnt
    # chronological order for the random-walk factor (invalid slots sort last and carry zero weight)
    order = torch.argsort(torch.where(valid, times, math.inf))
    ts = times[order]
    ws = w_slope[order]
    c = torch.flip(torch.cumsum(torch.flip(ws, [0]), 0), [0])  # c_j = sum_{k >= j} w_k
    vs = valid[order]
    gaps = torch.where(vs[1:], ts[1:] - ts[:-1], 0.0)
    var_walk = (gaps * c[1:] ** 2).sum()
    var_iid = 1.0 / stt
    return w_slope, w_mean, tbar, var_iid, var_walk


def window_weights_host(
    times: list[float], filled: int
) -> tuple[list[float], list[float], float, float, float]:
    """:func:`window_weights` in host arithmetic, for host-known times (steps, or a float learning rate)."""
    L = len(times)
    valid = [i < filled for i in range(L)]
    cnt = float(min(filled, L))
    tbar = sum(t for t, ok in zip(times, valid) if ok) / cnt
    dt = [(t - tbar) if ok else 0.0 for t, ok in zip(times, valid)]
    stt = max(sum(d * d for d in dt), 1e-300)
    w_slope = [d / stt for d in dt]
    w_mean = [(1.0 / cnt) if ok else 0.0 for ok in valid]
    chron = sorted((t, i) for i, (t, ok) in enumerate(zip(times, valid)) if ok)
    acc, var_walk = 0.0, 0.0
    cs = []
    for _, i in reversed(chron):
        acc += w_slope[i]
        cs.append(acc)
    cs.reverse()
    for j in range(1, len(chron)):
        var_walk += (chron[j][0] - chron[j - 1][0]) * cs[j] ** 2
    return w_slope, w_mean, tbar, 1.0 / stt, var_walk


def window_fit_weights(
    times: list[float], filled: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, float, float, float]:
    """:func:`window_weights_host` as the ``(2, filled)`` weight tensor of :func:`fit_window` (the mean's, then
    the slope's), with ``(tbar, var_iid, var_walk)``.

    The weights depend on the times only relative to the first one, so they are cached under those offsets:
    with evenly spaced steps the ring's ``L`` rotations are all there is.
    """
    t0, rel = relative_times(times)
    w, tbar_rel, var_iid, var_walk = _fit_weights_cached(rel, filled, dtype, device)
    return w, tbar_rel + t0, var_iid, var_walk


def relative_times(times: list[float]) -> tuple[float, tuple[float, ...]]:
    """``(t0, offsets)``: a ring's first time and every time relative to it, the cache key of designs that depend
    on the times only through their differences (with evenly spaced steps, the ring's ``L`` rotations)."""
    t0 = float(times[0])
    return t0, tuple(float(t) - t0 for t in times)


@functools.lru_cache(maxsize=512)
def _fit_weights_cached(
    rel: tuple[float, ...], filled: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, float, float, float]:
    ws, wm, tbar, var_iid, var_walk = window_weights_host(list(rel), filled)
    return to_device(torch.tensor([wm[:filled], ws[:filled]], dtype=dtype), device), tbar, var_iid, var_walk


def fit_window(pos: Tensor, w: Tensor) -> Tensor:
    """Centre positions and least-squares velocities of a ring ``pos: (L, B, n, D)``, stacked ``(2, B, n, D)``.

    ``w``: ``(2, L)`` weights, the mean's then the slope's. One matrix product over all groups and particles.
    """
    L, B, n, D = pos.shape
    return torch.mm(w.to(pos.dtype), pos.reshape(L, B * n * D)).view(2, B, n, D)


def fit_window_sums(
    pos: Tensor, rel: tuple[float, ...], ref: int, center: float, inv_stt: float
) -> tuple[Tensor, Tensor]:
    """The window fit of a full ring from sums of displacements, and the sums, which :func:`advance_fit_sums`
    keeps from there.

    Args:
        pos: ``(L, B, n, D)`` full ring.
        rel: the ring's times relative to its first (:func:`relative_times`).
        ref: the slot of the reference snapshot ``x_ref`` (the newest).
        center, inv_stt: the times' mean, relative to the first, and ``1 / sum_l (t_l - center)^2``.

    Returns:
        ``(xv, sums)``: ``xv`` as from :func:`fit_from_sums`; ``sums: (2, B, n, D)``, ``sum_l (x_l - x_ref)``
        and ``sum_l (t_l - t_ref) (x_l - x_ref)`` over the ring. Sums of displacements round off relative to how far the
        particles moved, not to where they are: a particle that did not move has velocity 0 exactly, and the
        fit is closer to the exact one than the ring's weighted sum (:func:`fit_window`).
    """
    L = pos.shape[0]
    x_ref = pos[ref]
    W = _sums_weights_cached(rel, ref, pos.dtype, pos.device)
    sums = torch.mm(W, (pos - x_ref).reshape(L, -1)).view(2, *pos.shape[1:])
    return fit_from_sums(sums, x_ref, L, center - rel[ref], inv_stt), sums


@functools.lru_cache(maxsize=512)
def _sums_weights_cached(rel: tuple[float, ...], ref: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    w = [[1.0] * len(rel), [t - rel[ref] for t in rel]]
    return to_device(torch.tensor(w, dtype=dtype), device)


def advance_fit_sums(sums: Tensor, x_new: Tensor, x_old: Tensor, x_ref: Tensor, a_new: float, gap: float) -> None:
    """Advance :func:`fit_window_sums`' ``sums`` in place: ``x_new`` replaces ``x_old`` in the ring.

    ``a_new = t_new - t_ref``, ``gap = t_new - t_old``: the sums gain ``x_new - x_ref`` and ``a_new (x_new -
    x_ref)`` and lose ``x_old - x_ref`` and ``(t_old - t_ref)(x_old - x_ref)``, written with ``d = x_new -
    x_old`` as ``d`` and ``a_new d + gap (x_old - x_ref)``. O(B n D), where the fit itself reads the whole ring.
    """
    d = x_new - x_old
    s0, s1 = sums.unbind(0)
    s0.add_(d)
    s1.add_(d, alpha=a_new).add_(x_old - x_ref, alpha=gap)


def fit_from_sums(sums: Tensor, x_ref: Tensor, L: int, a_center: float, inv_stt: float) -> Tensor:
    """Centre positions and least-squares velocities from :func:`fit_window_sums`' ``sums`` (``a_center =
    t_center - t_ref``, ``inv_stt = 1 / sum_l (t_l - t_center)^2``): ``x_ref + s0 / L`` and ``(s1 - a_center
    s0) / stt``, stacked ``(2, B, n, D)`` as :func:`fit_window` gives them."""
    s0, s1 = sums.unbind(0)
    xv = torch.empty_like(sums)
    torch.add(x_ref, s0, alpha=1.0 / L, out=xv[0])
    torch.add(s1, s0, alpha=-a_center, out=xv[1]).mul_(inv_stt)
    return xv


def mad_var(r: Tensor) -> Tensor:
    """Robust variance per row: ``(1.4826 median |r|)^2`` over all but the first dimension (zero-centred)."""
    flat = r.reshape(r.shape[0], -1).abs()
    med = torch.median(flat, dim=1).values
    return (MAD_TO_SD * med) ** 2


def _third_difference(x: list[Tensor], t: list[Any]) -> tuple[Tensor, Any, float]:
    """``d1 - 2 d2 + d3`` of the increments ``d_k = x_{k-1} - x_k`` of four snapshots (newest first).

    It annihilates constant, linear and quadratic motion (exactly for evenly spaced times; for a smoothly
    varying spacing up to its second difference). Under diffusion of rate ``D`` its variance is ``D (h1 + 4 h2
    + h3)`` (``h_k`` the gaps), under independent position noise of variance ``s^2`` it is ``20 s^2``.
    """
    e = (x[0] - x[1]) - 2.0 * (x[1] - x[2]) + (x[2] - x[3])
    fd = (t[0] - t[1]) + 4.0 * (t[1] - t[2]) + (t[2] - t[3])
    return e, fd, 20.0


def _positive(x: Any) -> Any:
    return x.clamp_min(1e-300) if isinstance(x, Tensor) else max(float(x), 1e-300)


def noise_update(snaps: list[Tensor], times: list[Any]) -> tuple[Tensor, Tensor]:
    """Instantaneous diffusion rate and position-noise variance per group from the newest snapshots.

    Args:
        snaps: the newest snapshots, newest first, ``(B, m)`` each (any particles-by-coordinates subset):
            seven of them, or three to six with less information (see below).
        times: their times (floats or 0-d float64 tensors), newest first.

    Returns:
        ``(D_rate, s_m2)``, float64 ``(B,)``, unclamped (average them over updates, then clamp at zero).

    The robust (MAD) variances ``V1``, ``V2`` of third differences at lag one (snapshots 0-3) and lag two (0,
    2, 4, 6) are linear in ``D`` and ``s^2`` with different coefficients (diffusion grows with the lag,
    position noise does not), so the 2x2 system separates them. Smooth motion barely enters: a third
    difference of a trajectory is ``O(jerk h^3)``, against ``O(v h)`` for a plain velocity residual, so
    accelerating particles (say, entering a viscous shock) are not mistaken for noise. With fewer than seven
    snapshots, the newest increments' residuals are attributed to diffusion alone, the conservative choice for
    the velocities' standard errors.
    """
    if len(snaps) < 7:
        if len(snaps) >= 4:
            e, fd, _ = _third_difference(snaps[:4], times[:4])
        else:
            e = (snaps[0] - snaps[1]) - (snaps[1] - snaps[2])
            fd = times[0] - times[2]
        v = mad_var(e).double()
        return v / _positive(fd), torch.zeros_like(v)
    e1, fd1, fm1 = _third_difference(snaps[:4], times[:4])
    e2, fd2, fm2 = _third_difference(snaps[0:7:2], times[0:7:2])
    v1 = mad_var(e1).double()
    v2 = mad_var(e2).double()
    d = (v2 - v1) / _positive(fd2 - fd1)
    sm2 = (v1 - d * fd1) / fm1
    return d, sm2


def sorted_windows(n: int, k: int, device: torch.device) -> Tensor:
    """Start index of the ``k``-wide window of sorted neighbours centred (as far as possible) on each rank."""
    p = torch.arange(n, device=device)
    return (p - k // 2).clamp(0, max(n - k, 0))


def local_rates_1d(xc: Tensor, v: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Local velocity gradient in 1-D: least-squares slope of ``v`` on ``x`` over ``k`` sorted neighbours.

    Args:
        xc: centre positions ``(B, n)``; v: velocities ``(B, n)``; k: neighbourhood size (``<= n``).

    Returns:
        ``(lam, sxx, var_v, dxs, dvs)``: slopes and the position spread ``sum (x - mean)^2`` of each
        particle's window (SE of the slope is ``sd_v / sqrt(sxx)``), ``(B, n)`` in particle order; the
        velocity noise variance per group ``(B,)``: the robust (MAD) variance of the fits' residuals (on
        windows half a window apart), pooled over the group and corrected for the two fitted parameters, which
        measures every source of velocity error (position noise, diffusion, misfit) without a noise model; and
        the position and velocity differences of neighbours in sorted order ``(B, n - 1)``.
    """
    B, n = xc.shape
    order = torch.argsort(xc, dim=1)
    xs = xc.gather(1, order)
    vs = v.gather(1, order)
    xw = xs.unfold(1, k, 1)  # (B, n-k+1, k), a view
    vw = vs.unfold(1, k, 1)
    dx = xw - xw.mean(-1, keepdim=True)
    dv = vw - vw.mean(-1, keepdim=True)
    sxx = (dx * dx).sum(-1)
    slope = (dx * dv).sum(-1) / sxx.clamp_min(torch.finfo(xc.dtype).tiny)
    step = max(1, k // 2)
    resid = dv[:, ::step] - slope[:, ::step, None] * dx[:, ::step]
    var_v = mad_var(resid).double() * (k / max(k - 2, 1))
    start = sorted_windows(n, k, xc.device).expand(B, n)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=xc.device).expand(B, n))
    where = start.gather(1, rank)
    return slope.gather(1, where), sxx.gather(1, where), var_v, xs.diff(dim=1), vs.diff(dim=1)


def knn(xc: Tensor, k: int, rows: Tensor | None = None, chunk: int = 1024) -> Tensor:
    """Exact ``k`` nearest neighbours (excluding self) by squared distances and ``topk``, in row chunks.

    Args:
        xc: ``(B, n, D)`` positions.
        k: neighbours per particle.
        rows: optional ``(r,)`` particle indices to compute the lists of (all when ``None``).

    Returns:
        ``(B, r, k)`` neighbour indices. Cost O(B r n D) time, O(B * chunk * n) memory.

    The squared distances are ``|a|^2 + |b|^2 - 2 a.b`` (one batched product), which rounds off relative to
    ``|a|^2``: in float32 (``torch.cdist``'s own product form) a cloud whose distance from the origin is 10^3
    times its neighbours' spacing gets neighbour lists that are noise. So they are taken in float64, of
    positions centred on each group's mean: exact lists up to a ratio ~10^6, at the cost of ``cdist``
    (the square root is left out: it does not change the order).
    """
    B, n, D = xc.shape
    if rows is None:
        rows = torch.arange(n, device=xc.device)
    c = (xc - xc.mean(1, keepdim=True)).double()
    sq = (c * c).sum(-1)  # (B, n)
    ct = c.transpose(1, 2)
    out = []
    for s in range(0, rows.numel(), chunk):
        r = rows[s : s + chunk]
        d = torch.baddbmm(sq[:, None, :], c.index_select(1, r), ct, alpha=-2.0)  # (B, c, n)
        d.add_(sq.index_select(1, r)[:, :, None])
        d[:, torch.arange(r.numel(), device=xc.device), r] = math.inf
        out.append(torch.topk(d, k, dim=2, largest=False).indices)
    return torch.cat(out, dim=1)


def gather_neighbours(x: Tensor, idx: Tensor) -> Tensor:
    """``x: (B, N, F)``, ``idx: (B, n, K)`` into ``N`` -> ``(B, n, K, F)``, by one ``index_select``."""
    B, n, K = idx.shape
    N, F = x.shape[1], x.shape[-1]
    off = (torch.arange(B, device=idx.device) * N)[:, None, None]
    return x.reshape(B * N, F).index_select(0, (idx + off).reshape(-1)).reshape(B, n, K, F)


def _small_inv(A: Tensor) -> Tensor:
    """Inverse of ``(..., D, D)`` matrices: closed form (adjugate / determinant) for D <= 3, LAPACK beyond."""
    D = A.shape[-1]
    if D == 1:
        return 1.0 / A
    if D == 2:
        a, b, c, d = A[..., 0, 0], A[..., 0, 1], A[..., 1, 0], A[..., 1, 1]
        det = a * d - b * c
        return torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / det[..., None, None]
    if D == 3:
        r0, r1, r2 = A[..., 0, :], A[..., 1, :], A[..., 2, :]
        c0 = torch.linalg.cross(r1, r2)
        c1 = torch.linalg.cross(r2, r0)
        c2 = torch.linalg.cross(r0, r1)
        det = (r0 * c0).sum(-1)
        return torch.stack([c0, c1, c2], -1) / det[..., None, None]
    return torch.linalg.inv_ex(A).inverse  # inv_ex: no error check (a host sync on a GPU), inf/nan if singular


def _sym_min_eig(S: Tensor) -> tuple[Tensor, Tensor]:
    """Smallest eigenvalue and its unit eigenvector of symmetric ``(..., D, D)``; closed form for D <= 3."""
    D = S.shape[-1]
    if D == 1:
        return S[..., 0, 0], torch.ones_like(S[..., 0])
    if D == 2:
        a, b, d = S[..., 0, 0], S[..., 0, 1], S[..., 1, 1]
        half = 0.5 * (a - d)
        r = torch.sqrt(half * half + b * b)
        lam = 0.5 * (a + d) - r
        # eigenvector of [[a, b], [b, d]] for lam: (b, lam - a) or (lam - d, b), whichever is better
        # conditioned
        e1 = torch.stack([b, lam - a], -1)
        e2 = torch.stack([lam - d, b], -1)
        use1 = (e1 * e1).sum(-1) >= (e2 * e2).sum(-1)
        e = torch.where(use1[..., None], e1, e2)
        nrm = e.norm(dim=-1, keepdim=True)
        fallback = torch.zeros_like(e)
        fallback[..., 0] = 1.0
        e = torch.where(nrm > 0, e / nrm.clamp_min(torch.finfo(S.dtype).tiny), fallback)
        return lam, e
    if D == 3:
        return _sym3_min_eig(S)
    # D > 3 (method="jacobian" only): LAPACK's eigh, which checks for failure on the host (a sync on a GPU) and
    # raises on a non-finite matrix; such matrices are solved as zeros and their eigenvalue reported as nan
    ok = finite(S).all(-1).all(-1)
    w, V = torch.linalg.eigh(torch.where(ok[..., None, None], S, 0.0))
    return torch.where(ok, w[..., 0], math.nan), V[..., :, 0]


def _sym3_min_eig(S: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form smallest eigenpair of symmetric 3x3 matrices (trigonometric method), vectorised."""
    tiny = torch.finfo(S.dtype).tiny
    a00, a11, a22 = S[..., 0, 0], S[..., 1, 1], S[..., 2, 2]
    a01, a02, a12 = S[..., 0, 1], S[..., 0, 2], S[..., 1, 2]
    q = (a00 + a11 + a22) / 3.0
    p1 = a01 * a01 + a02 * a02 + a12 * a12
    p2 = (a00 - q) ** 2 + (a11 - q) ** 2 + (a22 - q) ** 2 + 2.0 * p1
    p = torch.sqrt(p2 / 6.0)
    eye = torch.eye(3, dtype=S.dtype, device=S.device)
    Bm = (S - q[..., None, None] * eye) / p.clamp_min(tiny)[..., None, None]
    r = (torch.linalg.det(Bm) / 2.0).clamp(-1.0, 1.0)
    phi = torch.acos(r) / 3.0
    lam = torch.where(p > 0, q + 2.0 * p * torch.cos(phi + 2.0 * math.pi / 3.0), q)
    # eigenvector: the largest cross product of two rows of S - lam I
    M = S - lam[..., None, None] * eye
    c = torch.stack(
        [
            torch.linalg.cross(M[..., 0, :], M[..., 1, :]),
            torch.linalg.cross(M[..., 0, :], M[..., 2, :]),
            torch.linalg.cross(M[..., 1, :], M[..., 2, :]),
        ],
        -2,
    )
    nrm = c.norm(dim=-1)
    best = nrm.argmax(-1, keepdim=True)
    e = c.gather(-2, best[..., None].expand(*best.shape, 3))[..., 0, :]
    en = nrm.gather(-1, best)
    fallback = torch.zeros_like(e)
    fallback[..., 0] = 1.0
    e = torch.where(en > tiny, e / en.clamp_min(tiny), fallback)
    return lam, e


def local_rates_jacobian(
    xc: Tensor, v: Tensor, idx: Tensor, sd_v: Tensor, sd_m: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``lambda_min`` of the symmetric part of the least-squares velocity gradient over each neighbourhood.

    ``dV ~ dX J`` is fitted over the particle and its ``K`` neighbours (centred); ``lambda = lambda_min(sym
    J)`` and its standard error ``sd * sqrt(e^T (dX^T dX)^-1 e)`` along the eigenvector ``e``, with ``sd`` the
    larger of the model-based ``sd_v`` ``(B,)`` and the fits' pooled robust residual SD. With the position
    noise SD ``sd_m`` ``(B,)``, ``dX^T dX`` gets a ridge of ``(K + 1) sd_m^2``: along a direction in which the
    neighbourhood spreads no wider than the noise (particles on a lower-dimensional set), the gradient is not
    identified, and without the ridge its noise reads as an enormous, "significant" compression. Returns
    ``(lam, se, sd, r2, dot)``, the last two the pair statistics of :func:`pair_stats`.
    """
    D = xc.shape[-1]
    nb = gather_neighbours(torch.cat([xc, v], -1), idx)
    pdx = nb[..., :D] - xc[:, :, None]
    pdv = nb[..., D:] - v[:, :, None]
    xn = torch.cat([xc[:, :, None], nb[..., :D]], 2)  # (B, n, K+1, D)
    vn = torch.cat([v[:, :, None], nb[..., D:]], 2)
    dx = xn - xn.mean(2, keepdim=True)
    dv = vn - vn.mean(2, keepdim=True)
    A = dx.transpose(-1, -2) @ dx  # (B, n, D, D)
    Bm = dx.transpose(-1, -2) @ dv
    eye = torch.eye(D, dtype=A.dtype, device=A.device)
    ridge = 1e-6 * A.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] / D + torch.finfo(A.dtype).tiny
    if sd_m is not None:
        ridge = torch.maximum(ridge, (dx.shape[2] * sd_m.to(A.dtype) ** 2)[:, None, None, None])
    Ainv = _small_inv(A + ridge * eye)
    J = Ainv @ Bm
    S = 0.5 * (J + J.transpose(-1, -2))
    lam, e = _sym_min_eig(S)
    q = (e[..., None, :] @ Ainv @ e[..., :, None])[..., 0, 0].clamp_min(0)
    k1 = dx.shape[2]
    resid = dv - dx @ J
    var_v = mad_var(resid).double() * (k1 / max(k1 - D - 1, 1))
    sd = torch.maximum(sd_v.double(), var_v.sqrt()).to(lam.dtype)
    return lam, sd[:, None] * torch.sqrt(q), sd, (pdx * pdx).sum(-1), (pdx * pdv).sum(-1)


def feature_major(xv: Tensor) -> Tensor:
    """Positions and velocities stacked ``(2, B, n, D)`` (as the window fit gives them) as one feature-major
    matrix ``(2D, B n)``."""
    _, B, n, D = xv.shape
    return xv.permute(0, 3, 1, 2).reshape(2 * D, B * n)


def pair_index(idx: Tensor) -> Tensor:
    """Neighbour indices ``(B, n, K)`` as the flat, neighbour-major column index :func:`pair_stats` gathers with,
    ``(K B n,)``: a function of the lists alone, so a caller may keep it until the lists change."""
    B, n, K = idx.shape
    off = (torch.arange(B, device=idx.device) * n)[:, None, None]
    return (idx + off).permute(2, 0, 1).reshape(-1)


def pair_stats(fm: Tensor, idx: Tensor, flat: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(|dx|^2, dx.dv)`` over the kNN pairs, shaped ``(K, B, n)`` (neighbour-major).

    Args:
        fm: :func:`feature_major` positions and velocities ``(2D, B n)``.
        idx: neighbour indices ``(B, n, K)``.
        flat: ``pair_index(idx)``, when the caller kept it (the lists change only when refreshed).

    One ``index_select`` gathers positions and velocities of all neighbours at once; the feature-major layout
    makes the sums over coordinates (and later the minimum over neighbours) run over leading dimensions,
    several times faster on CPU than reducing a short trailing one.
    """
    B, n, K = idx.shape
    D = fm.shape[0] // 2
    if flat is None:
        flat = pair_index(idx)
    d = fm.index_select(1, flat).view(2 * D, K, B * n)
    d.sub_(fm.view(2 * D, 1, B * n))  # in place: the (2D, K, B n) buffer is the largest the tracker makes
    dx = d[:D]
    dot = d[D:].mul_(dx).sum(0)
    return dx.square_().sum(0).view(K, B, n), dot.view(K, B, n)


def local_rates_pairs(r2: Tensor, dot: Tensor, sd_v: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise strain rates over kNN pairs: ``dx.dv / |dx|^2 = -c/|dx|`` (``c`` the closing speed).

    The time to close a pair is ``|dx|/c = -1/strain``; the most significantly closing pair of each particle
    gives its ``lambda`` (the strain along a pair direction ``e`` is ``e^T J e >= lambda_min(sym J)``), with
    standard error ``sqrt(2) sd_v / |dx|``. Args: ``r2, dot`` ``(K, B, n)`` from :func:`pair_stats`; ``sd_v``
    ``(B,)``.
    """
    inv_r = torch.rsqrt(r2.clamp_min(torch.finfo(r2.dtype).tiny))
    return _rates_from(dot * inv_r, inv_r, sd_v)


def _float_ops(t: Tensor) -> bool:
    """Whether to write a selection or a test with float ops rather than with comparisons: on CPU a comparison's
    bool tensor, ``any`` and a min-with-indices cost ~5-20x a float op of the same size; on an accelerator every
    op is a launch, and the comparisons take fewer."""
    return t.device.type == "cpu"


def row_sums(x: Tensor) -> Tensor:
    """``x.sum(-1)`` of a contiguous ``(B, N, D)`` tensor as one matrix-vector product: a reduction over a
    trailing dimension of a few elements is ~2x slower on CPU (27 vs 13 us at 16 x 512 x 8)."""
    B, N, D = x.shape
    return torch.mv(x.view(B * N, D), _ones(D, x.dtype, x.device)).view(B, N)


@functools.lru_cache(maxsize=64)
def _ones(D: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.ones(D, dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device)


def take_rows(both: Tensor, keep: Tensor) -> Tensor:
    """``torch.where(keep[..., None], both[0], both[1])`` for ``both: (2, B, n, D)`` and ``keep: (B, n)``, as one
    gather of whole rows: on CPU a ``where`` whose condition is broadcast over the coordinates costs ~3x."""
    _, B, n, D = both.shape
    idx = (~keep).reshape(-1).long().mul_(B * n).add_(_arange(B * n, both.device))
    return both.view(2 * B * n, D).index_select(0, idx).view(B, n, D)


#: the snapshot size (elements, ``B n D``) from which, on CPU, the window fit runs from sums
#: (:func:`advance_fit_sums`) and non-finite particles are replaced by a gather of rows (:func:`take_rows`)
CPU_LARGE = 16384


def large_on_cpu(numel: int, device: torch.device) -> bool:
    """Whether a bucket's snapshots (``numel`` elements) take the CPU forms that pay only at size. The product over
    a 16-snapshot ring reads it all: 121 us at 65,536 elements against 60 us for the running sums, 28 against 23
    at 16,384, but 6 against 16 at 2,304, where the sums' eight small ops cost more than the read. The gather of
    rows against a ``where``: 63 against 113 us at 65,536 elements, 27 against 36 at 16,384, 17 against 15 at
    2,304. On an accelerator, one kernel beats several at any size."""
    return device.type == "cpu" and numel >= CPU_LARGE


def _rates_from(zp: Tensor, inv_r: Tensor, sd_v: Tensor) -> tuple[Tensor, Tensor]:
    # zp = dx.dv/|dx| = -c is proportional to the z-score strain/SE; the minimum over neighbours (dim 0) wins
    if _float_ops(zp):
        # its 1/|dx| without a min-with-indices: 1 - sign(zp - min) is 1 exactly at the minimum. Of exact ties
        # the nearest pair is taken; the z-score m/(sqrt(2) sd_v) does not depend on which
        m = zp.amin(0)
        ir = (inv_r * (1.0 - torch.sign(zp - m))).amax(0)
    else:
        mi = torch.min(zp, dim=0, keepdim=True)
        m, ir = mi.values[0], inv_r.gather(0, mi.indices)[0]
    return m * ir, (math.sqrt(2.0) * sd_v[:, None]) * ir


def pairs_rates_and_collapse(
    r2: Tensor,
    dot: Tensor,
    dt_now: Tensor,
    sd_v: Tensor,
    sd_m: Tensor,
    nu: Tensor,
    z: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`local_rates_pairs` and :func:`collapse_pairs` in one pass over ``(K, B, n)`` pair statistics.

    Every approaching pair counts, whatever its transverse offset: under the theory's assumption that the
    velocity is a gradient field, ``J`` is symmetric and ``dx.dv / |dx|^2 = e^T J e`` along the pair direction
    ``e``, so a pair that "passes by" in ``D > 1`` still measures a real compression (a fold of the
    characteristics onto a surface, not a point collision). Requiring a collision course instead rejected the
    textbook 1-D fold of units whose other coordinates differ (``tests/test_distributed.py``'s scripted
    crossing); the false alarms it was meant to stop are the forecast-consistency gate's job.
    """
    inv_r = torch.rsqrt(r2.clamp_min(torch.finfo(r2.dtype).tiny))
    zp = dot * inv_r  # = -c
    lam, se = _rates_from(zp, inv_r, sd_v)
    return lam, se, _collapse(r2, dot, zp, inv_r, dt_now, sd_v, sd_m, nu, z, gdim=1)


def coherent_compression(r2: Tensor, dot: Tensor, t_crit: float) -> Tensor:
    """Whether each particle's neighbourhood as a whole is compressing, ``(B, n)`` bool: the mean of its ``K``
    pair strains ``dx.dv/|dx|^2`` is below zero by ``t_crit`` standard errors of that mean (from their scatter
    over the pairs). Args: ``r2, dot`` ``(K, B, n)`` from :func:`pair_stats`.

    The pairs method's rate is the *minimum* over the pairs: an extreme value, negative for nearly every particle
    of a cloud whose units drift past one another at random (the smallest of ``K`` strains of either sign),
    however well resolved the velocities are. A compression that will make characteristics cross shows in most
    pairs. Measured on the detection benchmark's recordings (``K = 8``, ``t_crit = 3``, velocities fitted over 16
    steps): while the condensation runs' unit directions collapse, 10-34 % of their 500 units pass and are due
    to cross within 200 steps; in every control and every other case at most 4 % of the units do at any time.
    Without the test, 50-70 % of the units of both the condensation runs and their lazy control had a pair due
    within 200 steps. The price: a fold along one axis of a cloud whose neighbours lie in all directions of a
    high-dimensional space shows in the mean only as ``lambda / D`` and is not seen.
    """
    K = r2.shape[0]
    s = dot / r2.clamp_min(torch.finfo(r2.dtype).tiny)
    m = s.mean(0)
    d = s - m
    var_mean = (d * d).sum(0) / (K * (K - 1))  # the squared standard error of the mean
    return (m < 0) & (m * m > (t_crit * t_crit) * var_mean)


def collapse_pairs(
    r2: Tensor, dot: Tensor, dt_now: Tensor, sd_v: Tensor, sd_m: Tensor, nu: Tensor, z: float
) -> Tensor:
    """Whether a significantly closing pair has crossed or come within the viscous width, per group.

    Args:
        r2, dot: ``|dx|^2`` and ``dx.dv`` of pairs at the window centre, ``(B, ...)`` or ``(K, B, n)``.
        dt_now: time from the window centre to now (0-d).
        sd_v, sd_m: velocity and position noise SDs ``(B,)``; nu: viscosity ``(B,)`` (zero unless
            significant);
        z: critical value.

    A pair is *closing* when its closing speed ``c = -dx.dv/|dx|`` exceeds ``z sqrt(2) sd_v``. Its separation
    now, along the fitted lines, is ``dx + dt dv``; projected on ``dx`` that is ``(|dx|^2 + dt dx.dv)/|dx|``.
    The pair has
    *crossed* when that is below ``-z sqrt(2) sd_m``, and it is *viscous* when ``|proj| c < 2 nu`` (closer
    than the viscous width ``2 nu / c``).
    """
    B = sd_v.shape[0]
    gdim = 1 if (r2.dim() == 3 and r2.shape[0] != B) else 0  # neighbour-major (K, B, n) or (B, ...)
    inv_r = torch.rsqrt(r2.clamp_min(torch.finfo(r2.dtype).tiny))
    return _collapse(r2, dot, dot * inv_r, inv_r, dt_now, sd_v, sd_m, nu, z, gdim)


def _collapse(
    r2: Tensor,
    dot: Tensor,
    zp: Tensor,
    inv_r: Tensor,
    dt_now: Tensor,
    sd_v: Tensor,
    sd_m: Tensor,
    nu: Tensor,
    z: float,
    gdim: int,
) -> Tensor:
    B = sd_v.shape[0]
    shape = [1] * r2.dim()
    shape[gdim] = B
    k = z * math.sqrt(2.0)
    dims = [d for d in range(r2.dim()) if d != gdim]
    proj = (r2 + dt_now.to(r2.dtype) * dot) * inv_r
    if not _float_ops(r2):
        closing = zp < (-k * sd_v).reshape(shape)  # c = -zp > z sqrt(2) sd_v
        crossed = proj < (-k * sd_m).reshape(shape)
        viscous = proj.abs() * zp > (-2.0 * nu).reshape(shape)  # |proj| c < 2 nu
        hit = closing & (crossed | viscous)
        return hit.any(dims[0]).any(dims[1] - 1) if len(dims) == 2 else hit.any(dims[0])
    # the three tests as signs of floats: hit = closing & (crossed | viscous) is max(a, min(b, c)) < 0, where a
    # NaN fails its own test only
    a = zp + (k * sd_v).reshape(shape)
    b = proj + (k * sd_m).reshape(shape)
    c = (-2.0 * nu).reshape(shape) - proj.abs() * zp
    h = torch.maximum(a.nan_to_num_(1.0), torch.minimum(b.nan_to_num_(1.0), c.nan_to_num_(1.0)))
    return h.amin(dims) < 0


def reduce_group(
    lam: Tensor,
    se: Tensor,
    valid: Tensor,
    z: float,
    rank: int,
    quantile: float | None,
    k_units: int,
    collective: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Significance, time to shock and a robust minimum over each group.

    Args:
        lam, se: local compression rates and standard errors ``(B, n)``.
        valid: particles allowed to count ``(B, n)`` (finite input).
        z: critical value (already corrected for the number of comparisons).
        rank: the group's time to shock is the ``rank``-th smallest ``tau`` of its significant particles (or
            the largest when fewer are significant): a crossing involves a neighbourhood, not one particle,
            and an order statistic is far less noisy than the minimum of many noisy estimates.
        quantile: when given, the ``quantile`` of the significant ``tau`` instead.
        k_units: number of unit indices to report.
        collective: the ``collective``-th smallest significant ``tau`` is returned too (``inf`` when fewer are
            significant): when a macroscopic share of the group will have crossed.

    Returns:
        ``(tau, strength, units, sd_tau, tau_collective)``: ``tau = -1/lambda`` of the group (``inf`` when
        nothing is significant), the largest ``-lambda/SE`` among significant particles, the indices of the
        ``k_units`` most compressive significant particles (``-1`` padding), the standard error of ``tau``
        (``tau^2 SE``), and the ``collective``-th smallest significant ``tau``.
    """
    tiny = torch.finfo(lam.dtype).tiny
    sig = valid & (lam + z * se < 0) & finite(lam)
    tau = torch.where(
        sig, -1.0 / torch.where(sig, lam, -1.0), math.inf
    )
    n_sig = sig.sum(1)
    zscore = torch.where(sig, -lam / se.clamp_min(tiny), 0.0)
    strength = zscore.amax(1)
    score = torch.where(sig, -lam, -math.inf)
    B, n = lam.shape
    k = min(max(k_units, rank, collective), n)
    if quantile is None:
        # one topk for both the rank statistic (smallest tau) and the units (most compressive): same order
        top = torch.topk(score, k, dim=1)
        r = min(rank, n)
        kq = (n_sig.clamp(1, r) - 1)[:, None]
        pick = top.indices.gather(1, kq)
    else:
        top = torch.topk(score, k, dim=1)
        srt = torch.sort(tau, dim=1)
        kq = torch.floor(quantile * (n_sig - 1).clamp_min(0).to(lam.dtype)).long()[:, None]
        pick = srt.indices.gather(1, kq)
    tau_g = tau.gather(1, pick)[:, 0]
    kc = min(collective, n)
    # the top-k is ordered by -lambda, which orders tau = -1/lambda the same way among significant particles
    tau_c = tau.gather(1, top.indices[:, kc - 1 : kc])[:, 0]
    tau_c = torch.where(n_sig >= collective, tau_c, math.inf)
    # uncertainty of the group's forecast: delta method on tau = -1/lambda of the chosen particle
    sd_tau = torch.where(
        finite(tau_g), (tau_g**2) * se.gather(1, pick)[:, 0], math.inf
    )
    ku = min(k_units, k)
    units = torch.where(
        finite(top.values[:, :ku]), top.indices[:, :ku], -1
    )
    if ku < k_units:
        pad = torch.full((B, k_units - ku), -1, dtype=units.dtype, device=units.device)
        units = torch.cat([units, pad], 1)
    return tau_g, strength, units, sd_tau, tau_c
