"""Trajectory view of the tracker: one path ``q(t)`` on the quotient, pure tensor functions, no host sync.

Along the path the compression rate is ``s = <v, dv/dt> / |v|^2`` (``= d log|v| / dt``). Burgers predicts the
Riccati law ``ds/dt = -s^2``: ``1/s`` grows with slope 1 and, when ``s < 0``, blows up after ``-1/s``.

1. :func:`path_rate` -- velocity and acceleration at the window's centre from a least-squares quadratic over the
   last ``L`` snapshots, and ``s`` (``nan`` when the velocity is not significantly non-zero).
2. :func:`riccati_fit` -- a least-squares line ``1/s = a + b t`` over the last ``M`` values of ``s``: the slope ``b``
   is the *Burgers-consistency* figure (1 for Burgers, 0 for a stationary contraction), and the line's zero
   ``t* = t - (1/s)/b`` is the forecast blow-up time.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def quadratic_weights(times: Tensor, filled: int) -> tuple[Tensor, Tensor, Tensor]:
    """Weights ``(3, L)`` of the least-squares quadratic about the window's centre time, and that centre time.

    Returns ``(W, tbar, var_b)`` with ``W @ q = (q(tbar), q'(tbar), q''(tbar)/2)`` and ``var_b`` the variance
    factor of the slope coefficient (per unit residual variance).
    """
    L = times.shape[0]
    valid = torch.arange(L, device=times.device) < filled
    m = valid.to(times.dtype)
    t = torch.where(valid, times, torch.zeros_like(times))
    tbar = (m * t).sum() / float(min(filled, L))
    u = (t - tbar) * m
    X = torch.stack([m, u, u * u], 1)  # (L, 3)
    G = X.T @ X
    scale = G.diagonal().clamp_min(1e-300).sqrt()
    Gs = G / (scale[:, None] * scale[None, :]) + 1e-12 * torch.eye(3, dtype=G.dtype, device=G.device)
    Ginv = torch.linalg.inv(Gs) / (scale[:, None] * scale[None, :])
    W = Ginv @ X.T  # (3, L)
    return W, tbar, Ginv[1, 1]


def residual_var(ring: Tensor, coef: Tensor, times: Tensor, tbar: Tensor, filled: int) -> Tensor:
    """Pooled residual variance per coordinate of the quadratic fit."""
    L = ring.shape[0]
    valid = torch.arange(L, device=ring.device) < filled
    u = torch.where(valid, times - tbar, torch.zeros_like(times)).to(ring.dtype)
    X = torch.stack([torch.ones_like(u), u, u * u], 1)
    res = (ring - X @ coef) * valid.to(ring.dtype)[:, None]
    dof = max(min(filled, L) - 3, 1)
    return (res * res).sum() / (dof * ring.shape[1])


def path_rate(ring: Tensor, times: Tensor, filled: int, z: float) -> tuple[Tensor, Tensor]:
    """``(s, tbar)``: compression rate along the path at the window's centre time, ``nan`` if ``|v|`` is not
    significantly above its noise (``z`` standard errors, pooled over coordinates) or below float resolution."""
    W, tbar, var_b = quadratic_weights(times, filled)
    coef = W.to(ring.dtype) @ ring
    b, c = coef[1], coef[2]
    vb = (b * b).sum()
    s = (b * 2.0 * c).sum() / vb.clamp_min(torch.finfo(ring.dtype).tiny)
    rv = residual_var(ring, coef, times, tbar, filled)
    P = ring.shape[1]
    scale = ring.abs().amax() + torch.finfo(ring.dtype).tiny
    floor = (64 * torch.finfo(ring.dtype).eps * scale) ** 2 * var_b.to(ring.dtype)
    noise = (rv * var_b.to(ring.dtype) + floor) * P
    ok = vb > (z * z) * noise
    return torch.where(ok, s, torch.full_like(s, math.nan)), tbar


def riccati_fit(ts: Tensor, ss: Tensor, min_points: int) -> tuple[Tensor, Tensor, Tensor]:
    """Line ``1/s = a + b t`` by least squares over the finite entries of a history.

    Args:
        ts, ss: ``(M,)`` times (float64) and rates (``nan`` where missing).
        min_points: fewer finite entries than this give ``nan``.

    Returns:
        ``(b, se_b, t_star)``: slope, its standard error, and the zero of the line (``inf`` when ``b <= 0`` or the
        current ``1/s >= 0``, i.e. no blow-up ahead).
    """
    y = (1.0 / ss).double()
    ok = torch.isfinite(y) & torch.isfinite(ts)
    m = ok.double()
    cnt = m.sum()
    t0 = torch.where(ok, ts, torch.zeros_like(ts))
    y0 = torch.where(ok, y, torch.zeros_like(y))
    tbar = (m * t0).sum() / cnt.clamp_min(1)
    ybar = (m * y0).sum() / cnt.clamp_min(1)
    dt = (t0 - tbar) * m
    stt = (dt * dt).sum()
    b = (dt * (y0 - ybar)).sum() / stt.clamp_min(1e-300)
    res = (y0 - ybar - b * dt) * m
    se = torch.sqrt((res * res).sum() / (cnt - 2).clamp_min(1) / stt.clamp_min(1e-300))
    enough = (cnt >= min_points) & (stt > 0)
    nan = torch.full_like(b, math.nan)
    b = torch.where(enough, b, nan)
    se = torch.where(enough, se, nan)
    t_last = torch.where(ok, ts, torch.full_like(ts, -math.inf)).amax()
    y_last = ybar + b * (t_last - tbar)
    t_star = tbar - ybar / b
    ahead = enough & (b > 0) & (y_last < 0)
    return b, se, torch.where(ahead, t_star, torch.full_like(t_star, math.inf))
