"""Trajectory view of the tracker: one path ``q(t)`` on the quotient, pure tensor functions, no host sync.

Along the path the compression rate is ``s = <v, dv/dt> / |v|^2`` (``= d log|v| / dt``). Burgers predicts the
Riccati law ``ds/dt = -s^2``: ``1/s`` grows with slope 1 and, when ``s < 0``, blows up after ``-1/s``.

1. :func:`path_rate` -- velocity and acceleration at the window's centre from a least-squares quadratic over
the last ``L`` snapshots, and ``s`` (``nan`` when the velocity is not significantly non-zero).
2. :func:`riccati_fit` -- a least-squares line ``1/s = a + b t`` over the last ``M`` values of ``s``: the
slope ``b`` is the *Burgers-consistency* figure (1 for Burgers, 0 for a stationary contraction), and the
line's zero ``t* = t - (1/s)/b`` is the forecast blow-up time.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from shockmon._device import to_device
from shockmon._particles import finite, relative_times

Tensor = torch.Tensor


def quadratic_weights(times: Tensor, filled: int) -> tuple[Tensor, Tensor, Tensor]:
    """Weights ``(3, L)`` of the least-squares quadratic about the window's centre time, and that centre time.

    Returns ``(W, tbar, var_b)`` with ``W @ q = (q(tbar), q'(tbar), q''(tbar)/2)`` and ``var_b`` the variance
    factor of the slope coefficient (per unit residual variance).
    """
    L = times.shape[0]
    valid = torch.arange(L, device=times.device) < filled
    m = valid.to(times.dtype)
    t = torch.where(valid, times, 0.0)
    tbar = (m * t).sum() / float(min(filled, L))
    u = (t - tbar) * m
    X = torch.stack([m, u, u * u], 1)  # (L, 3)
    G = X.T @ X
    scale = G.diagonal().clamp_min(1e-300).sqrt()
    Gs = G / (scale[:, None] * scale[None, :]) + 1e-12 * torch.eye(3, dtype=G.dtype, device=G.device)
    Ginv = torch.linalg.inv_ex(Gs).inverse / (scale[:, None] * scale[None, :])  # _ex: no host-side error check
    W = Ginv @ X.T  # (3, L)
    return W, tbar, Ginv[1, 1]


def quadratic_design_host(
    times: list[float], filled: int, device: torch.device
) -> tuple[Tensor, Tensor, float, float]:
    """:func:`quadratic_weights` for host-known times: ``(W, X, tbar, var_b)``, design ``X`` ``(L, 3)``.

    The design depends on the times only relative to their first one, so it is cached under those offsets: with
    evenly spaced steps the ring's ``L`` rotations are all there is, and each step costs a dictionary lookup.
    """
    t0, rel = relative_times(times)
    W, X, tbar_rel, var_b = _design_cached(rel, filled, device)
    return W, X, tbar_rel + t0, var_b


@functools.lru_cache(maxsize=512)
def _design_cached(rel: tuple[float, ...], filled: int, device: torch.device) -> tuple[Tensor, Tensor, float, float]:
    L = len(rel)
    valid = np.arange(L) < filled
    t = np.where(valid, np.asarray(rel, dtype=np.float64), 0.0)
    tbar = float(t[valid].mean())
    u = (t - tbar) * valid
    X = np.stack([valid.astype(np.float64), u, u * u], 1)
    G = X.T @ X
    scale = np.sqrt(np.maximum(np.diag(G), 1e-300))
    Ginv = np.linalg.inv(G / np.outer(scale, scale) + 1e-12 * np.eye(3)) / np.outer(scale, scale)
    W = Ginv @ X.T
    both = to_device(torch.from_numpy(np.concatenate([W, X.T], 0)), device)
    return both[:3], both[3:].T, tbar, float(Ginv[1, 1])


def path_rate(
    ring: Tensor, times: Tensor, filled: int, z: float, host_times: list[float] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, var_s, tbar)``: compression rate along the path at the window's centre, its variance, the time.

    ``s = <v, a>/|v|^2`` from the quadratic fit; ``var_s ~ Var(a_parallel)/|v|^2`` (the acceleration's error
    along ``v`` dominates). ``s`` is ``nan`` if ``|v|`` is not ``z`` standard errors (pooled over coordinates)
    above its noise, or below float resolution. ``host_times``: the ring's times when known on the host
    (faster).
    """
    L, P = ring.shape
    if host_times is not None:
        W, X, tbar_h, var_b_h = quadratic_design_host(host_times, filled, ring.device)
        tbar = torch.full((), tbar_h, dtype=torch.float64, device=ring.device)  # a fill: no host->device copy
        var_b: Tensor | float = var_b_h
        W = W.to(ring.dtype)
        X = X.to(ring.dtype)
    else:
        W, tbar, var_b = quadratic_weights(times, filled)
        valid = torch.arange(L, device=ring.device) < filled
        u = torch.where(valid, times - tbar, 0.0)
        X = torch.stack([valid.to(u.dtype), u, u * u], 1).to(ring.dtype)
        W = W.to(ring.dtype)
    coef = W @ ring  # (3, P)
    res = ring - X @ coef  # unfilled rows of X are zero, and so are the ring's
    rv = (res * res).sum() / (max(min(filled, L) - 3, 1) * P)
    b, c = coef[1], coef[2]
    vb = (b * b).sum()
    tiny = torch.finfo(ring.dtype).tiny
    s = (b * 2.0 * c).sum() / vb.clamp_min(tiny)
    scale = ring.abs().amax() + tiny
    rvf = rv + (64 * torch.finfo(ring.dtype).eps * scale) ** 2
    Wd = W.double()
    w22 = (Wd[2] * Wd[2]).sum()  # variance factor of the quadratic coefficient
    ok = vb > (z * z) * (rvf * var_b) * P
    var_s = (4.0 * rvf.double() * w22) / vb.double().clamp_min(1e-300)
    return torch.where(ok, s, math.nan), torch.where(ok, var_s.to(s.dtype), math.nan), tbar


def riccati_fit(
    ts: Tensor, ss: Tensor, vs: Tensor, min_points: int, inflate: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Line ``1/s = a + b t`` by inverse-variance weighted least squares over the finite entries of a history.

    Args:
        ts, ss, vs: ``(M,)`` times (float64), rates (``nan`` where missing) and their variances.
        min_points: fewer finite entries than this give ``nan``.
        inflate: factor on the slope's standard error for the correlation of successive rates (they come from
            overlapping windows).

    The variance of ``y = 1/s`` is ``var_s / s^4`` (delta method), so early, small rates weigh little. The
    slope's standard error is the larger of the weighted-residual one and the model one, times ``inflate``.

    Returns:
        ``(b, se_b, t_star)``: slope, its standard error, and the zero of the line (``inf`` when ``b <= 0`` or
        the current ``1/s >= 0``, i.e. no blow-up ahead).
    """
    ss = ss.double()
    y = 1.0 / ss
    s2 = ss * ss
    vy = vs.double() / (s2 * s2).clamp_min(1e-300)
    # each of y, ts, vy finite (a sum of finite values overflows only beyond 1e308; inf - inf is nan)
    ok = finite(y + ts + vy) & (vy > 0)
    w = torch.where(ok, vy.reciprocal(), 0.0)
    okd = ok.double()
    ty = torch.where(ok, torch.stack([ts, y]), 0.0)  # (2, M): t and y, zero where not ok
    sw = w.sum().clamp_min(1e-300)
    mean = (ty * w).sum(1, keepdim=True) / sw  # (2, 1): weighted tbar, ybar
    d = (ty - mean) * okd  # (2, M): dt, dy
    wd = d * w
    mom = wd @ d.t()  # (2, 2): [[stt, sty], [sty, syy]]
    stt, sty, syy = mom[0, 0], mom[0, 1], mom[1, 1]
    b = sty / stt.clamp_min(1e-300)
    cnt = okd.sum()
    chi2 = (syy - b * sty) / (cnt - 2).clamp_min(1)  # the weighted residual sum of squares, per degree of freedom
    se = inflate * torch.sqrt(chi2.clamp_min(1.0) / stt.clamp_min(1e-300))
    enough = (cnt >= min_points) & (stt > 0)
    b = torch.where(enough, b, math.nan)
    se = torch.where(enough, se, math.nan)
    tbar, ybar = mean[0, 0], mean[1, 0]
    t_last = torch.where(ok, ts, -math.inf).amax()
    y_last = ybar + b * (t_last - tbar)
    t_star = tbar - ybar / b
    ahead = enough & (b > 0) & (y_last < 0)
    return b, se, torch.where(ahead, t_star, math.inf)
