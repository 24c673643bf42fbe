"""Exact reference solutions of Burgers' equation, for tests and benchmarks of the tracker.

Burgers' equation ``u_t + u u_x = nu u_xx`` on the line, with initial data ``u0``:

* **Inviscid** (``nu = 0``), before the first crossing: characteristics are straight lines,
  ``x = x0 + t u0(x0)`` (:func:`characteristics`), the velocity is carried unchanged along them, and the
  gradient along a characteristic obeys the Riccati law ``s' = -s^2``, so ``u_x = u0'/(1 + t u0')``. The first
  crossing (the gradient catastrophe) happens at ``t* = -1 / min u0'`` (:func:`breaking_time`).
* **Viscous**, exactly, by Hopf--Cole: ``u = -2 nu d/dx log phi`` with ``phi`` the heat-kernel convolution of
  ``exp(-Phi0 / (2 nu))``, ``Phi0`` a primitive of ``u0`` (the potential). :func:`hopf_cole` evaluates it by
  quadrature
  in the shift ``z = y - x``::

      w(z) ∝ exp(-z^2/(4 nu t) - Phi0(x + z)/(2 nu)),   u = -E_w[z]/t,   u_x = Cov_w(z, u0(x + z))/(2 nu t),

  with weights normalised by log-sum-exp (no overflow for small ``nu``) on a uniform grid fine enough to
  resolve the narrowest peak of ``w`` (trapezoid quadrature of a smooth, rapidly decaying integrand converges
  exponentially).
* Closed forms used to check the quadrature: the steady viscous shock ``-U tanh(U x/(2 nu))``
  (:func:`viscous_shock`) and the Riemann step (:func:`riemann_step`).

Everything is float64 torch, CPU by default. Example (the benchmark of Basdevant et al., 1986: ``u0 = -sin(pi
x)``, ``nu = 0.01/pi``, steepest gradient ``u_x(0, 1.6037/pi) = -152.00516``):

    >>> import math, torch
    >>> u0 = lambda x: -torch.sin(math.pi * x)
    >>> pot = lambda x: (torch.cos(math.pi * x) - 1) / math.pi
    >>> u, ux = hopf_cole(torch.zeros(1), 1.6037 / math.pi, 0.01 / math.pi, u0, potential=pot)
    >>> round(ux.item(), 3)
    -152.005
    >>> round(breaking_time(lambda x: -torch.sin(x), torch.linspace(-3, 3, 601)), 6)
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Field = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "breaking_time",
    "characteristics",
    "formation_time",
    "hopf_cole",
    "inviscid_solution",
    "riemann_step",
    "viscous_shock",
]


def _as64(x: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def characteristics(x0: torch.Tensor, t: float | torch.Tensor, u0: Field) -> torch.Tensor:
    """The inviscid characteristic map ``x0 -> x0 + t u0(x0)`` (exact before the first crossing).

    Example:
        >>> characteristics(torch.tensor([0.0, 1.0]), 0.5, lambda x: -x).tolist()
        [0.0, 0.5]
    """
    return x0 + t * u0(x0)


def _derivative(f: Field, x: torch.Tensor) -> torch.Tensor:
    x = _as64(x).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(x).sum(), x)
    return g.detach()


def breaking_time(u0: Field, x: torch.Tensor, du0: Field | None = None) -> float:
    """Gradient-catastrophe time ``t* = -1 / min u0'`` (``inf`` when ``u0`` is nowhere decreasing).

    The minimum of ``u0'`` is searched on the grid ``x`` and refined by golden-section search around the best
    grid point. ``u0'`` comes from ``du0`` when given, else from autograd.

    Example:
        >>> round(breaking_time(lambda x: torch.exp(-x * x), torch.linspace(-3, 3, 601)), 6)  # sqrt(e/2)
        1.165822
    """
    x = _as64(x)
    d = du0 if du0 is not None else (lambda y: _derivative(u0, y))
    g = d(x)
    i = int(torch.argmin(g))
    lo, hi = float(x[max(i - 1, 0)]), float(x[min(i + 1, len(x) - 1)])
    r = (math.sqrt(5) - 1) / 2
    a, b = hi - r * (hi - lo), lo + r * (hi - lo)
    fa, fb = float(d(_as64([a]))[0]), float(d(_as64([b]))[0])
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - r * (hi - lo)
            fa = float(d(_as64([a]))[0])
        else:
            lo, a, fa = a, b, fb
            b = lo + r * (hi - lo)
            fb = float(d(_as64([b]))[0])
    m = min(fa, fb, float(g[i]))
    return math.inf if m >= 0 else -1.0 / m


def inviscid_solution(
    x: torch.Tensor, t: float, u0: Field, lo: float, hi: float, iters: int = 100
) -> torch.Tensor:
    """Inviscid velocity ``u(x, t)`` before the first crossing, by inverting the characteristic map.

    Solves ``x = x0 + t u0(x0)`` for ``x0`` in ``[lo, hi]`` by bisection (the map is increasing for ``t <
    t*``), then returns ``u0(x0)``.

    Example:
        >>> inviscid_solution(torch.tensor([0.5]), 0.5, lambda x: -x, -2.0, 2.0).tolist()  # x0 = 1, u = -1
        [-1.0]
    """
    x = _as64(x)
    a = torch.full_like(x, lo)
    b = torch.full_like(x, hi)
    for _ in range(iters):
        m = 0.5 * (a + b)
        right = characteristics(m, t, u0) > x
        b = torch.where(right, m, b)
        a = torch.where(right, a, m)
    return u0(0.5 * (a + b))


def _cumulative_simpson(f: Field, y0: torch.Tensor, h: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of f and its running integral on the grids y0[:, None] + h * arange(n), by Simpson per cell."""
    k = torch.arange(n, dtype=torch.float64)
    y = y0[:, None] + h * k
    fy = f(y)
    fm = f(y[:, :-1] + 0.5 * h)
    cells = (h / 6.0) * (fy[:, :-1] + 4.0 * fm + fy[:, 1:])
    prim = torch.cat([torch.zeros_like(y0)[:, None], torch.cumsum(cells, dim=1)], dim=1)
    return fy, prim


def hopf_cole(
    x: torch.Tensor,
    t: float,
    nu: float,
    u0: Field,
    potential: Field | None = None,
    *,
    u_max: float | None = None,
    points_per_width: float = 6.0,
    tail: float = 40.0,
    max_points: int = 200_001,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact viscous Burgers solution ``u(x, t)`` and its gradient ``u_x`` by Hopf--Cole quadrature.

    Args:
        x: points, any shape (float64 internally).
        t: time, ``> 0``.
        nu: viscosity, ``> 0``.
        u0: initial velocity, a vectorised function of a float64 tensor.
        potential: a primitive of ``u0`` (any additive constant). When omitted it is integrated numerically
            (Simpson per grid cell, error ``O(h^4)``); pass it in closed form for benchmark accuracy.
        u_max: a bound on ``|u0|``, which sets the integration range; estimated on a grid when omitted.
        points_per_width: grid points per standard deviation of the narrowest peak of the weight.
        tail: the range covers every ``z`` whose log-weight is within ``tail`` of the maximum.
        max_points: cap on the grid size (a ``ValueError`` is raised beyond it).

    Returns:
        ``(u, u_x)``, float64 tensors of the shape of ``x``.

    Example (the steady viscous shock is a fixed point):
        >>> xs = torch.linspace(-0.2, 0.2, 5)
        >>> u, ux = hopf_cole(xs, 0.7, 0.05, lambda y: -torch.tanh(y / 0.1))
        >>> bool(torch.allclose(u, viscous_shock(xs, 1.0, 0.05), atol=1e-6))
        True
    """
    if not t > 0 or not nu > 0:
        raise ValueError(f"Expected `t` and `nu` to be positive, but got t={t}, nu={nu}")
    x = _as64(x)
    shape = x.shape
    xf = x.reshape(-1)
    if u_max is None:
        m = 1.0
        for _ in range(3):
            reach = t * m + math.sqrt((t * m) ** 2 + 4 * nu * t * tail) + 1.0
            grid = torch.linspace(float(xf.min()) - reach, float(xf.max()) + reach, 4001, dtype=torch.float64)
            m = max(float(u0(grid).abs().max()), 1e-12)
        u_max = m
        slope = float(torch.diff(u0(grid)).max() / (grid[1] - grid[0]))
    else:
        reach = t * u_max + math.sqrt((t * u_max) ** 2 + 4 * nu * t * tail) + 1.0
        grid = torch.linspace(float(xf.min()) - reach, float(xf.max()) + reach, 4001, dtype=torch.float64)
        slope = float(torch.diff(u0(grid)).max() / (grid[1] - grid[0]))
    zmax = t * u_max + math.sqrt((t * u_max) ** 2 + 4 * nu * t * tail)
    width = math.sqrt(2 * nu / (1.0 / t + max(slope, 0.0)))
    h = width / points_per_width
    n = 2 * math.ceil(zmax / h) + 1
    if n > max_points:
        raise ValueError(
            f"Expected a quadrature grid of at most `max_points`={max_points} points, but needed {n}"
        )
    z = -zmax + h * torch.arange(n, dtype=torch.float64)
    chunk = max(1, 4_000_000 // n)
    us, uxs = [], []
    for s in range(0, xf.numel(), chunk):
        xc = xf[s : s + chunk]
        if potential is None:
            fy, prim = _cumulative_simpson(u0, xc - zmax, h, n)
        else:
            y = xc[:, None] + z
            fy, prim = u0(y), potential(y)
        logw = -(z * z) / (4 * nu * t) - prim / (2 * nu)
        w = torch.softmax(logw, dim=1)
        ez = (w * z).sum(1)
        ef = (w * fy).sum(1)
        cov = (w * (z - ez[:, None]) * (fy - ef[:, None])).sum(1)
        us.append(-ez / t)
        uxs.append(cov / (2 * nu * t))
    return torch.cat(us).reshape(shape), torch.cat(uxs).reshape(shape)


def viscous_shock(x: torch.Tensor, U: float, nu: float, center: float = 0.0) -> torch.Tensor:
    """Steady viscous shock ``u = -U tanh(U (x - center) / (2 nu))``, of slope ``-U^2/(2 nu)`` at the centre.

    Example:
        >>> viscous_shock(torch.tensor([0.0]), 1.0, 0.1).tolist()
        [-0.0]
    """
    return -U * torch.tanh(U * (_as64(x) - center) / (2 * nu))


def _log_erfc(z: torch.Tensor) -> torch.Tensor:
    # erfc(z) = 2 Phi(-z sqrt 2), computed stably in log space.
    return math.log(2.0) + torch.special.log_ndtr(-z * math.sqrt(2.0))


def riemann_step(x: torch.Tensor, t: float, nu: float, u_left: float, u_right: float) -> torch.Tensor:
    """Closed-form viscous solution for the step ``u0 = u_left (x < 0), u_right (x > 0)``.

    ``u = (u_L A_L + u_R A_R) / (A_L + A_R)`` with ``A_L = exp(-u_L (x - u_L t / 2) / (2 nu)) erfc((x - u_L t)
    / sqrt(4 nu t))`` and ``A_R = exp(-u_R (x - u_R t / 2) / (2 nu)) erfc(-(x - u_R t) / sqrt(4 nu t))``
    (Hopf--Cole with the piecewise-linear potential), evaluated in log space. For ``u_L > u_R`` it tends to a
    viscous shock moving at ``(u_L + u_R) / 2``.

    Example:
        >>> round(riemann_step(torch.tensor([0.0]), 1.0, 0.01, 1.0, -1.0).item(), 12)
        0.0
    """
    x = _as64(x)
    r = math.sqrt(4 * nu * t)
    la = -u_left * (x - u_left * t / 2) / (2 * nu) + _log_erfc((x - u_left * t) / r)
    lb = -u_right * (x - u_right * t / 2) / (2 * nu) + _log_erfc(-(x - u_right * t) / r)
    p = torch.sigmoid(la - lb)
    return u_left * p + u_right * (1 - p)


def formation_time(
    u0: Field,
    nu: float,
    level: float,
    x: float = 0.0,
    t_lo: float = 1e-3,
    t_hi: float = 3.0,
    potential: Field | None = None,
    tol: float = 1e-6,
) -> float:
    """First time the exact viscous gradient ``u_x(x, t)`` reaches ``level`` (``< 0``), by bisection.

    ``u_x(x, t)`` is scanned on 201 times in ``[t_lo, t_hi]`` for the first one at or below ``level``, then
    the bracket is bisected to ``tol``; ``inf`` when it is never reached. Used to define the shock-formation
    time ``t_f`` in the tracker's tests: the time the gradient at the shock reaches half the steady
    viscous-shock slope, ``level = -U^2 / (4 nu)``.

    Example:
        >>> round(formation_time(lambda y: -torch.sin(y), 0.05, -5.0, potential=torch.cos, tol=1e-4), 2)
        1.07
    """
    xs = _as64([x])

    def g(tt: float) -> float:
        return float(hopf_cole(xs, tt, nu, u0, potential)[1][0])

    # The gradient at a viscous shock steepens, saturates, then decays as the wave loses amplitude: scan for
    # the first bracket, then bisect inside it.
    grid = torch.linspace(t_lo, t_hi, 201, dtype=torch.float64).tolist()
    prev = grid[0]
    if g(prev) <= level:
        return prev
    for tt in grid[1:]:
        if g(tt) <= level:
            a, b = prev, tt
            while b - a > tol:
                m = 0.5 * (a + b)
                if g(m) <= level:
                    b = m
                else:
                    a = m
            return 0.5 * (a + b)
        prev = tt
    return math.inf
