"""Exact Burgers reference solutions (``shockmon.burgers``) against closed forms and published values."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import shockmon.burgers as burgers
from shockmon.burgers import (
    breaking_time,
    characteristics,
    formation_time,
    hopf_cole,
    inviscid_solution,
    riemann_step,
    viscous_shock,
)

torch.set_num_threads(1)


def sine(x: torch.Tensor) -> torch.Tensor:
    return -torch.sin(x)


def sine_potential(x: torch.Tensor) -> torch.Tensor:
    return torch.cos(x)  # a primitive of -sin x


@pytest.mark.parametrize(
    ("u0", "expected"),
    [
        (lambda x: -torch.sin(x), 1.0),
        (lambda x: torch.exp(-x * x), math.sqrt(math.e / 2)),
        (lambda x: -torch.tanh(x), 1.0),
        (lambda x: torch.tanh(x), math.inf),  # rarefaction: never breaks
    ],
    ids=["sine", "gaussian", "smooth-step", "rarefaction"],
)
def test_burgers_breaking_time(u0, expected):
    t = breaking_time(u0, torch.linspace(-4, 4, 801))
    assert t == pytest.approx(expected, rel=1e-9) if math.isfinite(expected) else t == math.inf


def test_burgers_characteristics_carry_velocity_and_riccati_gradient():
    x0 = torch.linspace(-1, 1, 21, dtype=torch.float64)
    t = 0.6
    x = characteristics(x0, t, sine)
    u = inviscid_solution(x, t, sine, -4.0, 4.0)
    assert torch.allclose(u, sine(x0), atol=1e-12)
    # u_x along a characteristic follows the Riccati law: u0'/(1 + t u0')
    h = 1e-6
    ux = (inviscid_solution(x + h, t, sine, -4.0, 4.0) - inviscid_solution(x - h, t, sine, -4.0, 4.0)) / (
        2 * h
    )
    du0 = -torch.cos(x0)
    assert torch.allclose(ux, du0 / (1 + t * du0), atol=1e-6)


def test_burgers_hopf_cole_keeps_the_steady_viscous_shock():
    nu, U = 0.05, 1.0
    x = torch.linspace(-0.5, 0.5, 41, dtype=torch.float64)
    for t in (0.3, 2.0):
        u, ux = hopf_cole(
            x,
            t,
            nu,
            lambda y: viscous_shock(y, U, nu),
            lambda y: -2 * nu * torch.log(torch.cosh(y / (2 * nu))),
        )
        assert torch.allclose(u, viscous_shock(x, U, nu), atol=1e-9)
        exact_ux = -(U**2) / (2 * nu) / torch.cosh(U * x / (2 * nu)) ** 2
        assert torch.allclose(ux, exact_ux, atol=1e-7)


@pytest.mark.parametrize(
    ("ul", "ur"), [(1.0, -1.0), (0.5, -1.0), (-1.0, 1.0)], ids=["shock", "moving", "rarefaction"]
)
def test_burgers_hopf_cole_matches_closed_form_riemann_step(ul, ur):
    nu, t = 0.02, 0.5
    x = torch.linspace(-1, 1, 81, dtype=torch.float64)

    def u0(y: torch.Tensor) -> torch.Tensor:
        return torch.where(y < 0, ul, ur) * torch.ones_like(y)

    def pot(y: torch.Tensor) -> torch.Tensor:
        return torch.where(y < 0, ul * y, ur * y)

    u, _ = hopf_cole(x, t, nu, u0, pot)
    # the weight has a kink where the potential does (y = 0): trapezoid quadrature is second order there
    assert torch.allclose(u, riemann_step(x, t, nu, ul, ur), atol=3e-5)
    if ul > ur:  # a viscous shock moving at the Rankine-Hugoniot speed
        centre = float(x[torch.argmin((riemann_step(x, 4.0, nu, ul, ur) - 0.5 * (ul + ur)).abs())])
        assert centre == pytest.approx(4.0 * 0.5 * (ul + ur), abs=0.03)


def test_burgers_basdevant_benchmark():
    """Basdevant et al. (1986): u0 = -sin(pi x), nu = 0.01/pi, steepest gradient at t = 1.6037/pi."""
    u0 = lambda x: -torch.sin(math.pi * x)  # noqa: E731
    pot = lambda x: (torch.cos(math.pi * x) - 1) / math.pi  # noqa: E731
    t = 1.6037 / math.pi
    _, ux = hopf_cole(torch.zeros(1), t, 0.01 / math.pi, u0, pot)
    assert float(ux) == pytest.approx(-152.00516, rel=2e-6)
    _, ux_num = hopf_cole(torch.zeros(1), t, 0.01 / math.pi, u0)  # numerically integrated potential
    assert float(ux_num) == pytest.approx(-152.00516, rel=1e-5)


def test_burgers_hopf_cole_gradient_is_the_derivative():
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    h = 1e-5
    u, ux = hopf_cole(x, 0.8, 0.03, sine, sine_potential)
    up, _ = hopf_cole(x + h, 0.8, 0.03, sine, sine_potential)
    um, _ = hopf_cole(x - h, 0.8, 0.03, sine, sine_potential)
    assert torch.allclose(ux, (up - um) / (2 * h), rtol=1e-5, atol=1e-6)


def test_burgers_vanishing_viscosity_limit_is_inviscid():
    x0 = torch.linspace(-1, 1, 11, dtype=torch.float64)
    t = 0.5
    x = characteristics(x0, t, sine)
    u, ux = hopf_cole(x, t, 1e-4, sine, sine_potential)
    assert torch.allclose(u, sine(x0), atol=1e-3)
    du0 = -torch.cos(x0)
    assert torch.allclose(ux, du0 / (1 + t * du0), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(("nu", "t_f"), [(0.05, 1.07), (0.01, 1.15)])
def test_burgers_formation_time_of_the_viscous_sine_shock(nu, t_f):
    """The gradient at the shock reaches half the steady slope -U^2/(4 nu) (U = 1) at t_f."""
    t = formation_time(sine, nu, -1.0 / (4 * nu), potential=sine_potential, tol=1e-4)
    assert t == pytest.approx(t_f, abs=0.01)


def test_burgers_bad_arguments():
    with pytest.raises(ValueError, match="`t` and `nu` to be positive"):
        hopf_cole(torch.zeros(1), 0.0, 0.1, sine)
    with pytest.raises(ValueError, match="`max_points`"):
        hopf_cole(torch.zeros(1), 1.0, 1e-9, sine, max_points=1000)


def test_burgers_doctests():
    result = doctest.testmod(burgers)
    assert result.failed == 0 and result.attempted > 5
