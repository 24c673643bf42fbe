"""Invariance of every quotient observable under random group elements applied to real modules."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from symmetry_models import (
    FusedBlock,
    attention_gauge,
    cnn,
    mlp,
    rand_scales,
    rescale_units,
    scale_rows,
    transformer_layer,
)
from torch import nn

from shockmon import Observer, discover
from shockmon.observables import direction_coherence

torch.set_num_threads(1)


def _mlp_action(m: nn.Module, g: torch.Generator) -> None:
    rescale_units(m[0], m[2][0], rand_scales(12, g), torch.randperm(12, generator=g))
    rescale_units(m[2][0], m[4], rand_scales(10, g), torch.randperm(10, generator=g))


def _cnn_action(m: nn.Module, g: torch.Generator) -> None:
    # conv rows before BatchNorm: per-channel scale (normalisation symmetry)
    scale_rows(m[0], rand_scales(6, g))
    scale_rows(m[3], rand_scales(8, g))
    # BN affine -> ReLU -> conv: positive rescaling + permutation of channels (through pooling for the second)
    p1 = torch.randperm(6, generator=g)
    rescale_units(m[1], m[3], rand_scales(6, g), p1)
    with torch.no_grad():  # permuting BN1's channels means permuting conv0's rows too
        m[0].weight.copy_(m[0].weight[p1].clone())
        m[0].bias.copy_(m[0].bias[p1].clone())
    rescale_units(m[4], m[7], rand_scales(8, g))
    # conv -> ReLU -> AdaptiveAvgPool -> Flatten -> Linear: a channel owns a block of 4 columns
    rescale_units(m[7], m[11], rand_scales(5, g), torch.randperm(5, generator=g), in_blocks=4)


def _transformer_action(m: nn.Module, g: torch.Generator) -> None:
    a = m.self_attn
    e = a.embed_dim
    w, b = a.in_proj_weight.data, a.in_proj_bias.data
    attention_gauge(
        w[:e],
        w[e : 2 * e],
        w[2 * e :],
        a.out_proj.weight.data,
        a.num_heads,
        g,
        b[:e],
        b[e : 2 * e],
        b[2 * e :],
        perm=torch.randperm(a.num_heads, generator=g),
    )
    rescale_units(
        m.linear1,
        m.linear2,
        rand_scales(m.linear1.out_features, g),
        torch.randperm(m.linear1.out_features, generator=g),
    )


def _fused_action(m: nn.Module, g: torch.Generator) -> None:
    w, b = m.qkv.weight.data, m.qkv.bias.data
    attention_gauge(
        w[:16],
        w[16:32],
        w[32:],
        m.proj.weight.data,
        4,
        g,
        b[:16],
        b[16:32],
        b[32:],
        perm=torch.randperm(4, generator=g),
    )
    rescale_units(m.fc, m.out, rand_scales(32, g), torch.randperm(32, generator=g))


CASES: dict[
    str, tuple[Callable[[], nn.Module], Callable[[nn.Module, torch.Generator], None], tuple[int, ...], list | None]
] = {
    "mlp": (mlp, _mlp_action, (17, 6), None),
    "cnn_batchnorm_pooled": (cnn, _cnn_action, (9, 3, 8, 8), None),
    "transformer_layer": (transformer_layer, _transformer_action, (3, 5, 16), None),
    "fused_qkv_declared": (FusedBlock, _fused_action, (3, 5, 16), FusedBlock.declarations()),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_observer_quotient_invariant_raw_not(case: str, seed: int) -> None:
    build, act, in_shape, extra = CASES[case]
    torch.manual_seed(seed)
    model = build().double()
    x = torch.randn(*in_shape, dtype=torch.float64)
    y0 = model(x)
    before = Observer(model, discover(model, extra=extra)).compute()
    moved = copy.deepcopy(model)
    act(moved, torch.Generator().manual_seed(100 + seed))
    torch.testing.assert_close(moved(x), y0, rtol=1e-6, atol=1e-8)  # the function is unchanged
    after = Observer(moved, discover(moved, extra=extra)).compute()
    assert before.keys() == after.keys()
    quotient = [k for k in before if k.startswith("quotient/")]
    assert len(quotient) >= 8
    for k in quotient:
        torch.testing.assert_close(after[k], before[k], rtol=1e-6, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
    # the raw counterparts of the parameters the group moved changed by more than 10 %
    raw = {k: (after[k] - before[k]).abs() / before[k].abs().clamp_min(1e-12) for k in before if k.startswith("raw/")}
    moved_weights = [k for k, r in raw.items() if k.endswith("weight") and r > 0.10]
    assert len(moved_weights) >= 2, raw


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_observer_units_equivariant(case: str) -> None:
    build, act, _, extra = CASES[case]
    torch.manual_seed(3)
    model = build().double()
    u0 = Observer(model, discover(model, extra=extra)).units()
    moved = copy.deepcopy(model)
    act(moved, torch.Generator().manual_seed(7))
    u1 = Observer(moved, discover(moved, extra=extra)).units()
    assert u0.keys() == u1.keys() and u0
    for k in u0:
        assert u0[k].shape == u1[k].shape and u0[k].dim() == 2
        # equivariant: the same rows, possibly permuted -> compare row-sorted by first then all coordinates
        a = u0[k][torch.argsort(u0[k][:, 0])]
        b = u1[k][torch.argsort(u1[k][:, 0])]
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")


def test_observer_units_follow_permutation_in_module_order() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    u0 = Observer(model).units()["rescale/0"]
    perm = torch.randperm(6)
    rescale_units(model[0], model[2], torch.ones(6, dtype=torch.float64), perm)
    u1 = Observer(model).units()["rescale/0"]
    torch.testing.assert_close(u1, u0[perm])


def test_observer_path_mass_deep_chain_not_naive_product() -> None:
    """The naive per-unit product ‖w_in‖·‖w_out‖ moves under a neighbour's rescaling; the path mass does not."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    naive = (m[2].weight.norm(dim=1) * m[4].weight.norm(dim=0)).clone()
    pm = Observer(m).compute()["quotient/rescale/2/path_mass/sorted"]
    rescale_units(m[0], m[2], rand_scales(7, torch.Generator().manual_seed(1)))
    naive2 = m[2].weight.norm(dim=1) * m[4].weight.norm(dim=0)
    assert (naive2 - naive).abs().max() / naive.abs().max() > 0.1
    torch.testing.assert_close(Observer(m).compute()["quotient/rescale/2/path_mass/sorted"], pm)


def test_observer_path_norm_matches_bruteforce() -> None:
    """Squared ℓ2 path norm = sum over all input->output paths of the product of squared weights (+ bias paths)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False)).double()
    w1, b1, w2 = m[0].weight, m[0].bias, m[2].weight
    brute = sum(w2[j, i] ** 2 * (sum(w1[i, c] ** 2 for c in range(3)) + b1[i] ** 2) for j in range(2) for i in range(4))
    got = Observer(m).compute()["quotient/rescale/0/path_norm"]
    torch.testing.assert_close(got**2, brute.detach())


def test_observer_attention_matches_dense_product() -> None:
    """Per-head ‖W_Q,h W_K,hᵀ‖ and singular values from Grams equal the dense d_model×d_model computation."""
    torch.manual_seed(0)
    a = nn.MultiheadAttention(12, 3, bias=False).double()
    vals = Observer(a).compute()
    e, dh = 12, 4
    q, k = a.in_proj_weight[:e], a.in_proj_weight[e : 2 * e]
    dense = torch.stack([(q[h * dh : (h + 1) * dh].t() @ k[h * dh : (h + 1) * dh]) for h in range(3)])
    norms = dense.flatten(1).norm(dim=1).sort().values
    torch.testing.assert_close(vals["quotient/attention_qk/model/head_norms/sorted"], norms.detach())
    sv = torch.linalg.svdvals(dense)[:, :dh].flatten().sort().values
    torch.testing.assert_close(
        vals["quotient/attention_qk/model/singular_values/sorted"], sv.detach(), rtol=1e-6, atol=1e-8
    )
    s = torch.linalg.svdvals(dense)
    eff = (s.square().sum(1).square() / s.pow(4).sum(1)).mean()
    torch.testing.assert_close(vals["quotient/attention_qk/model/effective_rank"], eff.detach())
    # without spectra: the same keys less the two spectral ones, and the same trajectory length
    obs = Observer(a)
    cheap = obs.compute(spectra=False)
    assert set(vals) - set(cheap) == {
        f"quotient/{f}/model/{k}"
        for f in ("attention_qk", "attention_vo")
        for k in ("singular_values/sorted", "top_singular")
    }
    assert obs.trajectory(cheap).shape == obs.trajectory(obs.compute()).shape


def test_observer_grad_observables_invariant() -> None:
    torch.manual_seed(0)
    model = transformer_layer().double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    moved = copy.deepcopy(model)
    _transformer_action(moved, torch.Generator().manual_seed(5))
    res = []
    for m in (model, moved):
        m.zero_grad()
        m(x).square().sum().backward()
        res.append(Observer(m).grad_observables())
    assert {"quotient/attention_qk/self_attn/grad_norm", "quotient/rescale/linear1/grad_norm"} <= res[0].keys()
    for k in res[0]:
        torch.testing.assert_close(res[1][k], res[0][k], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["mlp", "transformer_layer", "cnn_batchnorm_pooled"])
def test_observer_low_precision_within_one_percent(case: str, dtype: torch.dtype) -> None:
    build, _, _, extra = CASES[case]
    torch.manual_seed(0)
    model = build()
    ref = Observer(model).compute()
    low = copy.deepcopy(model).to(dtype)
    ref_low = {k: v for k, v in Observer(copy.deepcopy(low).float()).compute().items()}
    got = Observer(low).compute()
    assert all(v.dtype == torch.float32 for v in got.values())
    for k, v in got.items():
        if k.startswith("dynamics/"):
            continue
        # accumulation in fp32 from the low-precision weights: equal to fp32 math on those same weights
        torch.testing.assert_close(v, ref_low[k], rtol=1e-4, atol=1e-6)
        # and within 1 % of the fp32 model (rounding of the weights themselves)
        if k.startswith("quotient/") and v.dim() == 0:
            assert abs(v - ref[k]) <= 0.01 * abs(ref[k]) + 1e-6, (k, v, ref[k])


class _NoSync(Exception):
    pass


def test_observer_compute_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(cnn(), nn.ReLU())
    blocks = nn.ModuleList([transformer_layer(), FusedBlock()])
    obs = [Observer(model), Observer(blocks, extra=FusedBlock.declarations("1."))]
    for o in obs:
        o.compute()  # first call may set up projections on host

    def boom(*a: object, **k: object) -> None:
        raise _NoSync("host sync")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for o in obs:
        vals = o.compute(lr=0.1)
        o.units()
        o.trajectory(vals)
    monkeypatch.undo()
    assert vals


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_observer_compute_no_sync_cuda() -> None:
    model = nn.ModuleList([transformer_layer(), FusedBlock()]).cuda()
    o = Observer(model, extra=FusedBlock.declarations("1."))
    o.compute()
    torch.cuda.set_sync_debug_mode("error")
    try:  # the per-step call: the spectra (log steps only) solve eigenproblems, which synchronise
        o.trajectory(o.compute(spectra=False, raw=False))
        o.units()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_observer_dynamics_and_state_roundtrip() -> None:
    torch.manual_seed(0)
    model = cnn()
    o = Observer(model, angular_step=True)
    first = o.compute(lr=0.1)
    assert torch.isnan(first["dynamics/normscale/0/angular_step"])
    with torch.no_grad():
        model[0].weight.add_(0.01 * torch.randn_like(model[0].weight))
    o2 = Observer(model, angular_step=True)
    o2.load_state_dict(o.state_dict())
    second = o.compute(lr=0.1)
    second2 = o2.compute(lr=0.1)
    step = second["dynamics/normscale/0/angular_step"]
    assert 0 < step < 0.5
    for k in second:
        torch.testing.assert_close(second2[k], second[k], equal_nan=True)
    torch.testing.assert_close(
        second["dynamics/normscale/0/effective_lr"], 0.1 / model[0].weight.detach().square().sum()
    )


def test_observer_trajectory_fixed_order() -> None:
    torch.manual_seed(0)
    o = Observer(mlp())
    v = o.compute()
    t = o.trajectory(v)
    assert t.dim() == 1 and t.numel() == sum(1 for k, x in v.items() if k.startswith("quotient/") and x.dim() == 0)
    torch.testing.assert_close(o.trajectory(o.compute()), t)


def test_observer_bad_arguments() -> None:
    with pytest.raises(TypeError, match="`model` to be a torch.nn.Module"):
        Observer("not a model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`proj_dim`"):
        Observer(mlp(), proj_dim=0)
    with pytest.raises(ValueError, match="`dtype`"):
        Observer(mlp(), dtype=torch.float16)
    with pytest.raises(TypeError, match="`report`"):
        Observer(mlp(), report={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`version`"):
        Observer(mlp()).load_state_dict({})


def test_observer_balanced_representative_converges_and_is_invariant() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    o = Observer(m, balance_sweeps=1)
    for _ in range(60):  # warm-started sweeps accumulate across calls
        b = o.balanced()
    for g in ("0", "2"):
        torch.testing.assert_close(b[g]["in_sq"], b[g]["out_sq"], rtol=1e-8, atol=0)
    # one hidden layer: exact after one sweep
    one = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 2)).double()
    b1 = Observer(one, balance_sweeps=1).balanced()["0"]
    torch.testing.assert_close(b1["in_sq"], b1["out_sq"])
    # invariant: the balanced norms do not move under a random rescaling (module order: follow the permutation)
    moved = copy.deepcopy(m)
    perm = torch.randperm(7)
    rescale_units(moved[0], moved[2], rand_scales(7, torch.Generator().manual_seed(2)), perm)
    b2 = Observer(moved, balance_sweeps=200).balanced()
    torch.testing.assert_close(b2["0"]["in_sq"], b["0"]["in_sq"][perm], rtol=1e-7, atol=0)
    torch.testing.assert_close(b2["2"]["in_sq"], b["2"]["in_sq"], rtol=1e-7, atol=0)
    # warm start after a small training-like perturbation: 2 sweeps balance to < 1 %, better than a cold start
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    o.balance_sweeps = 2
    b3 = o.balanced()
    cold = Observer(m, balance_sweeps=2).balanced()
    for g in ("0", "2"):
        rel = ((b3[g]["in_sq"] - b3[g]["out_sq"]).abs() / b3[g]["in_sq"]).max()
        rel_cold = ((cold[g]["in_sq"] - cold[g]["out_sq"]).abs() / cold[g]["in_sq"]).max()
        assert rel < 1e-2 and rel <= rel_cold + 1e-12, (g, rel, rel_cold)


def test_observer_never_reuses_stale_values_after_untracked_writes() -> None:
    """Writes through ``.data`` do not bump a tensor's version: nothing may be cached on it across calls."""
    torch.manual_seed(0)
    model = transformer_layer().double()
    obs = Observer(model)
    obs.compute()
    with torch.no_grad():
        for p in model.parameters():
            p.data.copy_(p.data * 1.3 + 0.01)
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    model(x).square().sum().backward()
    fresh = Observer(model)
    for k, v in fresh.grad_observables().items():
        torch.testing.assert_close(obs.grad_observables()[k], v)
    for k, v in fresh.compute().items():
        if not k.startswith("dynamics/"):
            torch.testing.assert_close(obs.compute()[k], v, msg=lambda m, k=k: f"{k}: {m}")


def test_observer_blocks_finished_together_equal_each_finished_alone() -> None:
    """Blocks of the same shape are finished stacked (one set of batched kernels for all of them): every value and
    unit coordinate of each block equals an observer's of that block alone, over two steps (the balancedness drift
    needs the previous one), with one block of another shape in the middle (a bucket of its own)."""
    torch.manual_seed(0)

    def layer(ff: int) -> nn.Module:
        return nn.TransformerEncoderLayer(16, 4, dim_feedforward=ff, dropout=0.0, batch_first=True)

    blocks = [layer(32), layer(32), layer(48), layer(32)]
    full = Observer(nn.Sequential(*blocks))
    alone = [Observer(b) for b in blocks]
    for step in range(2):
        values = full.compute(lr=0.1)
        units = full.units()
        names = [("rescale", "linear1"), ("attention", "self_attn")]
        assert units.keys() == {f"{fam}/{i}.{m}" for i in range(4) for fam, m in names}
        for i, obs in enumerate(alone):
            own = obs.compute(lr=0.1)
            assert len(own) * 4 == len(values)
            for key, v in own.items():
                parts = key.split("/")  # <kind>/<family>/<module>/... or raw/<module>...: the module gets "i."
                at = 1 if parts[0] == "raw" else 2
                mine = "/".join([*parts[:at], f"{i}.{parts[at]}", *parts[at + 1 :]])
                if key.endswith("direction_coherence"):  # directions are random projections seeded by the name
                    continue
                torch.testing.assert_close(values[mine], v, rtol=1e-5, atol=1e-6, equal_nan=True, msg=mine)
            for key, u in obs.units().items():
                fam, name = key.split("/", 1)
                cols = slice(None) if fam == "attention" else slice(0, 1)  # rescale: the log mass (not projected)
                torch.testing.assert_close(units[f"{fam}/{i}.{name}"][:, cols], u[:, cols], rtol=1e-5, atol=1e-6)
            # the directions (units' columns 1:) give the layer's coherence, batched as alone
            coherence = direction_coherence(units[f"rescale/{i}.linear1"][:, 1:])
            torch.testing.assert_close(values[f"quotient/rescale/{i}.linear1/direction_coherence"], coherence)
        assert torch.isfinite(values["dynamics/rescale/0.linear1/balancedness_drift"]) == (step == 1)
        with torch.no_grad():
            for b in blocks:
                b.linear1.weight.mul_(1.01)
