"""Property-based invariance: random architectures from the supported families, random group elements."""

from __future__ import annotations

import copy
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from symmetry_models import attention_gauge, rand_scales, rescale_units
from torch import nn

from shockmon import Observer

settings.register_profile("ci", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SHOCKMON_HYPOTHESIS_PROFILE", "ci"))

ACTS = [nn.ReLU, lambda: nn.LeakyReLU(0.2), nn.Identity, lambda: nn.PReLU(1, 0.1)]


@st.composite
def mlp_and_action(draw):  # type: ignore[no-untyped-def]
    widths = draw(st.lists(st.integers(1, 9), min_size=3, max_size=5))
    bias = draw(st.lists(st.booleans(), min_size=len(widths) - 1, max_size=len(widths) - 1))
    acts = draw(st.lists(st.integers(0, len(ACTS) - 1), min_size=len(widths) - 2, max_size=len(widths) - 2))
    seed = draw(st.integers(0, 2**31 - 1))
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias[i]))
        if i < len(widths) - 2:
            layers.append(ACTS[acts[i]]())
    return nn.Sequential(*layers).double(), widths, seed


@given(mlp_and_action())
def test_property_mlp_quotient_invariant(case) -> None:  # type: ignore[no-untyped-def]
    model, widths, seed = case
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.7)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, widths[0], dtype=torch.float64, generator=g)
    y = model(x)
    before = Observer(model).compute()
    moved = copy.deepcopy(model)
    linears = [m for m in moved if isinstance(m, nn.Linear)]
    for a, b in zip(linears[:-1], linears[1:]):
        n = a.out_features
        rescale_units(a, b, rand_scales(n, g), torch.randperm(n, generator=g))
    torch.testing.assert_close(moved(x), y, rtol=1e-7, atol=1e-9)
    after = Observer(moved).compute()
    for k, v in before.items():
        if k.startswith("quotient/"):
            torch.testing.assert_close(after[k], v, rtol=1e-6, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


PERMUTE_ACTS = [nn.GELU, nn.Tanh, nn.SiLU, nn.Sigmoid, nn.ReLU]  # the last: a rescaling link among them


@given(
    st.lists(st.integers(1, 9), min_size=3, max_size=5),
    st.lists(st.integers(0, len(PERMUTE_ACTS) - 1), min_size=3, max_size=3),
    st.integers(0, 2**31 - 1),
)
def test_property_permutation_quotient_invariant(widths, acts, seed) -> None:  # type: ignore[no-untyped-def]
    """GELU/Tanh/SiLU/Sigmoid hidden units (``permute``) are permuted, ReLU ones also rescaled, in one chain: every
    quotient value stays and the units move with their permutation."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(PERMUTE_ACTS[acts[i]]())
    model = nn.Sequential(*layers).double()
    for p in model.parameters():
        nn.init.normal_(p, std=0.7)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, widths[0], dtype=torch.float64, generator=g)
    y = model(x)
    obs = Observer(model)
    before, units = obs.compute(), obs.units()
    moved = copy.deepcopy(model)
    linears = [m for m in moved if isinstance(m, nn.Linear)]
    perms = {}
    for k, (a, b) in enumerate(zip(linears[:-1], linears[1:])):
        n = a.out_features
        relu = isinstance(moved[2 * k + 1], nn.ReLU)
        perms[2 * k] = perm = torch.randperm(n, generator=g)
        rescale_units(a, b, rand_scales(n, g) if relu else torch.ones(n, dtype=torch.float64), perm)
    torch.testing.assert_close(moved(x), y, rtol=1e-7, atol=1e-9)
    obs_m = Observer(moved)
    after, units_m = obs_m.compute(), obs_m.units()
    for k, v in before.items():
        if k.startswith("quotient/"):
            torch.testing.assert_close(after[k], v, rtol=1e-6, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
    # one group per hidden layer, of the family its activation allows, and its units move with the permutation
    want = {f"{'rescale' if PERMUTE_ACTS[acts[i]] is nn.ReLU else 'permute'}/{2 * i}" for i in range(len(widths) - 2)}
    assert set(units) == set(units_m) == want
    for k, u in units.items():
        torch.testing.assert_close(units_m[k], u[perms[int(k.split("/")[1])]], rtol=1e-6, atol=1e-9)


@given(st.integers(1, 4), st.integers(1, 4), st.booleans(), st.integers(0, 2**31 - 1))
def test_property_attention_quotient_invariant(heads: int, d_head: int, bias: bool, seed: int) -> None:
    torch.manual_seed(seed)
    e = heads * d_head
    a = nn.MultiheadAttention(e, heads, bias=bias, batch_first=True).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, e, dtype=torch.float64, generator=g)
    y = a(x, x, x, need_weights=False)[0]
    before = Observer(a).compute()
    moved = copy.deepcopy(a)
    w = moved.in_proj_weight.data
    b = moved.in_proj_bias.data if bias else None
    attention_gauge(
        w[:e],
        w[e : 2 * e],
        w[2 * e :],
        moved.out_proj.weight.data,
        heads,
        g,
        None if b is None else b[:e],
        None if b is None else b[e : 2 * e],
        None if b is None else b[2 * e :],
        perm=torch.randperm(heads, generator=g),
    )
    torch.testing.assert_close(moved(x, x, x, need_weights=False)[0], y, rtol=1e-6, atol=1e-9)
    after = Observer(moved).compute()
    for k, v in before.items():
        if k.startswith("quotient/"):
            torch.testing.assert_close(after[k], v, rtol=1e-6, atol=1e-10, msg=lambda m, k=k: f"{k}: {m}")
