"""Alert logic of the tracker: the Riccati gate, the hysteresis state machine and the on-device event ring.

All functions are vectorised over the tracker's groups (index 0 is the trajectory view) and never synchronise
with the host. States: ``0`` pre, ``1`` imminent (a forecast within the horizon), ``2`` in-shock.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from shockmon._particles import finite

Tensor = torch.Tensor

PRE, IMMINENT, IN_SHOCK = 0, 1, 2
KIND_FORECAST, KIND_SHOCK, KIND_DIVERGENCE, KIND_INSTABILITY = 0, 1, 2, 3
#: event row layout: step, group, kind, predicted step, strength, then the unit indices
ROW_FIXED = 5


def forecast_trend(ts: Tensor, Ts: Tensor, sds: Tensor, min_points: int) -> tuple[Tensor, Tensor]:
    """Slope and standard error of the forecast shock time ``T`` against time, per group, over a history.

    Args:
        ts, Ts: ``(G, M)`` float64 times and forecasts (non-finite where there was no forecast).
        sds: ``(G, M)`` standard errors of the forecasts (from the significance test's standard errors).
        min_points: fewer finite entries give ``nan``.

    Successive forecasts come from overlapping windows, so their errors are correlated over about one window
    and the scatter about the line understates the slope's uncertainty. The returned standard error is the
    larger of the residual one (which catches misfit: a forecast hopping between particles) and a model-based
    one: forecasts with errors ``sd`` correlated over the history behave like two independent values at its
    ends, so ``SE ~ 1.5 rms(sd) / span``.

    Along Burgers characteristics ``tau = -1/lambda`` shrinks at rate one (``ds/dt = -s^2``), so the forecast
    ``T = t + tau`` stays put: slope 0. A stationary contraction (gradient flow into a minimum, an
    Ornstein--Uhlenbeck pull) has constant ``tau``: the forecast recedes, slope 1. So does a viscous shock
    once formed (the gradient saturates at ``-U^2/(2 nu)``).
    """
    ok = finite(Ts + ts)
    m = ok.double()
    cnt = m.sum(1)
    tT = torch.where(ok, torch.stack([ts, Ts]), 0.0)  # (2, G, M)
    mean = tT.sum(2, keepdim=True) / cnt.clamp_min(1)[:, None]
    d = (tT - mean) * m  # (2, G, M): dt, dT
    prod = d * d[0]  # dt^2, dt dT
    stt, stT = prod.sum(2)
    sTT = (d[1] * d[1]).sum(1)
    b = stT / stt.clamp_min(1e-300)
    se = torch.sqrt((sTT - b * stT).clamp_min(0) / (cnt - 2).clamp_min(1) / stt.clamp_min(1e-300))
    sd0 = torch.where(ok, sds, 0.0)
    rms = torch.sqrt((sd0 * sd0).sum(1) / cnt.clamp_min(1))
    tmax = torch.where(ok, ts, -math.inf).amax(1)
    tmin = torch.where(ok, ts, math.inf).amin(1)
    span = (tmax - tmin).clamp_min(1e-300)
    se = torch.maximum(se, 1.5 * rms / span)
    enough = (cnt >= min_points) & (stt > 0)
    return torch.where(enough, b, math.nan), torch.where(enough, se, math.nan)


def growth_test(
    ring: Tensor, design: tuple[Tensor, Tensor], z: float, log_factor: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Exponential growth of each group's step length: ``(rate, strength, grows)``.

    Args:
        ring: ``(G, m)`` float64 log step lengths, oldest first (``nan`` until filled, or where not measured);
            the test fits the last ``k`` and needs the whole ring filled: growth is measured against a settled
            history (the first updates of a run ramp up: momentum, Adam's early steps).
        design: :func:`growth_design` ``(P, X)``: the least-squares line's coefficients (rate, mean) are
            ``ring[:, -k:] @ P`` and its values ``coefficients @ X``.
        z: one-sided critical value for the slope's t-statistic.
        log_factor: the log of the growth factor the fitted line must rise by across the ``k`` updates.

    A least-squares line through the last ``k`` log step lengths: its slope is the growth rate per update. It
    is *significant* when it is ``z`` standard errors above zero (residual scatter about the line; ``z`` a t
    quantile, :func:`t_critical`), when its rise across the window is ``z`` times what the scatter of the settled
    history before the window would give a line through noise, and when it rises by at least ``log_factor``. A
    run-away oscillation grows like this, smoothly and exponentially; the step lengths of ordinary training wander
    up and down about a level or drift slowly (and the log of a small group's median step is heavy-tailed: one
    window of it can look like a line, the history says how far it wanders).

    Returns:
        ``(rate, strength, grows)``: the slope (``nan`` until the last ``k`` are there), its t-statistic where
        significant (0 elsewhere, capped at 1e6) and the significance mask.
    """
    P, X = design
    k = P.shape[0]
    last = ring[:, -k:]
    coef = last @ P  # (G, 2): rate, mean
    rate = coef[:, 0]
    res = last - coef @ X  # the residuals about the line
    stt = k * (k * k - 1) / 12.0  # sum of the squared centred offsets, on the host
    tstat = rate * math.sqrt((k - 2) * stt) * torch.rsqrt((res * res).sum(1).clamp_min(1e-300))
    hist = ring[:, :-k]
    dev = hist - hist.mean(1, keepdim=True)
    var_hist = (dev * dev).sum(1) / max(hist.shape[1] - 1, 1)  # nan until the whole ring is filled
    # the rise of a line through k values of that scatter has variance var_hist (k - 1)^2 / stt
    above = rate * rate * stt > (z * z) * var_hist
    grows = (tstat > z) & (rate > log_factor / (k - 1)) & above  # nan compares False
    return rate, torch.where(grows, tstat.clamp_max(1e6), 0.0), grows


def t_critical(alpha: float, dof: int) -> float:
    """One-sided critical value of Student's t with ``dof`` degrees of freedom at level ``alpha`` (host arithmetic:
    the Cornish--Fisher expansion about the normal quantile, to 4th order; within 0.5 % of the exact value for
    ``dof >= 6`` and ``alpha >= 1e-4``)."""
    z = NormalDist().inv_cdf(1.0 - alpha)
    n = float(dof)
    return (
        z
        + (z**3 + z) / (4 * n)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * n**4)
    )


def growth_design(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(P, X)``, float64: ``P`` ``(k, 2)`` gives the slope and the mean of a least-squares line through ``k``
    equally spaced values, ``X`` ``(2, k)`` the line's values from them (centred offsets, then ones)."""
    t = torch.arange(k, dtype=torch.float64, device=device) - (k - 1) / 2.0
    P = torch.stack([t / (k * (k * k - 1) / 12.0), torch.full_like(t, 1.0 / k)], 1)
    return P, torch.stack([t, torch.ones_like(t)])


def step_machine(
    st: dict[str, Tensor],
    upd: Tensor | None,
    warm: bool,
    steps_to: Tensor,
    shock_cond: Tensor,
    nonfinite: Tensor,
    cfg: dict[str, float],
    hold: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Advance the hysteresis state machine; return ``(to_forecast, to_shock, to_divergence)``.

    Args:
        st: state tensors ``state, on, off, shk, cool, div`` of shape ``(G,)``; replaced by their next values
            (new tensors: nothing may hold on to the old ones).
        upd: groups updated this call (``(G,)`` bool), ``None`` when every group was (known on the host: nothing
            to mask); warm: past the warm-up gate.
        steps_to: steps to the forecast shock (``inf`` when none, or not Burgers-consistent).
        shock_cond: the shock criterion holds; nonfinite: the input was non-finite.
        cfg: ``h_on, h_off, n_on, n_off, n_shock, cooldown``.
        hold: where the shock is still there (``(G,)`` bool): an in-shock group does not count towards its
            disarm on these updates, so a lasting shock is one episode, not one event per cooldown.

    Arm when ``0 <= steps_to < h_on`` for ``n_on`` updates (outside cooldown); fire ``shock`` when the criterion
    holds ``n_shock`` updates; disarm when the time to shock exceeds ``h_off`` for ``n_off`` updates, then
    cool down for ``cooldown`` updates. At most one transition per group per update.
    """
    state, on, off, shk, cool, div = st["state"], st["on"], st["off"], st["shk"], st["cool"], st["div"]
    if warm:
        arm = (steps_to >= 0) & (steps_to < cfg["h_on"]) & (cool == 0)  # a crossing already past: no
        on_new = (on + 1) * arm
        shk_new = (shk + 1) * shock_cond
    else:  # the warm-up gate (host-known): nothing arms, no shock criterion counts
        on_new, shk_new = torch.zeros_like(on), torch.zeros_like(shk)
    # in-shock disarms like imminent, on the Burgers-consistent forecast: a raw significant compression
    # somewhere in a group of many particles is almost always present, and would hold the state forever
    far = steps_to > cfg["h_off"]
    if hold is not None:
        far = far & ~(hold & (state == IN_SHOCK))
    off_new = (off + 1) * far
    to_shock = (state != IN_SHOCK) & (shk_new >= cfg["n_shock"]) & ((state == IMMINENT) | (cool == 0))
    stay = ~to_shock
    to_arm = (state == PRE) & stay & (on_new >= cfg["n_on"])
    to_pre = (state != PRE) & stay & (off_new >= cfg["n_off"])
    to_div = nonfinite & ~div
    if upd is not None:
        to_shock, to_arm, to_pre, to_div = to_shock & upd, to_arm & upd, to_pre & upd, to_div & upd
    new = {
        "state": torch.where(to_shock, IN_SHOCK, torch.where(to_arm, IMMINENT, torch.where(to_pre, PRE, state))),
        "on": on_new,
        "off": off_new * ~(to_shock | to_arm | to_pre),
        "shk": shk_new * ~to_shock,
        "cool": torch.where(to_pre, int(cfg["cooldown"]), (cool - 1).clamp_min(0)),
        "div": nonfinite,
    }
    if upd is not None:
        new = {k: torch.where(upd, v, st[k]) for k, v in new.items()}
    st.update(new)
    return to_arm, to_shock, to_div


def write_events(buf: Tensor, counter: Tensor, rows: Tensor, flags: Tensor) -> None:
    """Append the flagged ``rows`` to the ring ``buf`` (capacity ``buf.shape[0] - 1``; last row: scratch).

    ``counter`` (0-d int64) counts every event ever written; the slot of the next one is ``counter %
    capacity``. Rows not flagged go to the scratch row, so the write is a fixed-shape ``index_copy_`` with no
    host sync.
    """
    cap = buf.shape[0] - 1
    f = flags.long()
    pos = counter + torch.cumsum(f, 0) - 1
    dest = torch.where(flags, torch.remainder(pos, cap), cap)
    buf.index_copy_(0, dest, rows.to(buf.dtype))
    counter.add_(f.sum())
