"""The observer: every observable of a model, each step, batched, on the parameters' device, without a host sync.

Keys of :meth:`Observer.compute`:

``quotient/rescale/<layer>/...``
    per hidden layer of a rescaling chain: ``path_mass/sorted`` (per-unit path masses, ascending), ``path_mass_total``,
    ``path_mass_max``, ``path_mass_median``, ``path_mass_participation`` (``(Σπ)²/(nΣπ²)``), ``direction_coherence``
    (mean squared cosine between the units' balanced directions, from their projections), and per chain
    ``path_norm`` (ℓ2 path norm).
``quotient/attention_qk/<module>/...``, ``quotient/attention_vo/<module>/...``
    per attention block: ``head_norms/sorted`` (``‖W_Q,h W_K,hᵀ‖_F`` per head, ascending), ``norm`` (root sum of
    squares over heads), ``max_head``, ``singular_values/sorted`` (all heads' singular values, ascending),
    ``top_singular``.
``quotient/normscale/<module>/direction_coherence``
    for weights read through a normalisation: mean squared cosine between row directions (rows, groups) or, for a
    whole-tensor scale, between the tensor's rows after the common scale is removed.
``raw/<parameter>``
    Frobenius norm of every trainable parameter; ``raw/<module>/{q,k,v,o}`` for attention projections (slices of fused
    weights included); ``raw/<layer>/balancedness`` (``‖(‖w_in,i‖² − ‖w_out,i‖²)_i‖``, not an invariant).
``dynamics/...``
    values that need the previous observation: ``dynamics/rescale/<layer>/balancedness_drift`` (change of the
    balancedness vector since the last call: zero under gradient flow, so it measures optimizer noise and weight
    decay); ``dynamics/normscale/<module>/effective_lr`` (``lr / ‖w‖²``, when ``lr`` is passed); with
    ``angular_step=True``, ``dynamics/normscale/<module>/angular_step`` (radians). NaN on the first call.

Every ``quotient/`` value is invariant under the whole group it names, permutations included (vectors come sorted).
:meth:`Observer.units` gives per-unit coordinates in module order (rescale-invariant, permutation-equivariant) for the
tracker.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from shockmon import observables as O
from shockmon.symmetry import (
    AttentionSpec,
    ChainLayer,
    Declaration,
    NormScaleSpec,
    RescaleChain,
    SymmetryReport,
    discover,
)

__all__ = ["Observer"]

_STATE_VERSION = 1


def _seed_for(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _gaussian(shape: tuple[int, ...], name: str, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed_for(name, seed))
    return (torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(shape[-1])).to(dtype=dtype, device=device)


class Observer:
    """Computes quotient, raw and dynamics observables of a model.

    Args:
        model: the network (any ``nn.Module`` with parameters).
        report: a :class:`~shockmon.SymmetryReport` from :func:`~shockmon.discover`; discovered here when omitted.
        extra: declarations passed to :func:`~shockmon.discover` when ``report`` is omitted.
        dtype: accumulation dtype (``torch.float32`` or ``torch.float64``); default float32, or float64 when the model
            is float64. bf16/fp16 parameters are cast, never accumulated in low precision.
        proj_dim: each per-unit direction is randomly projected to this many dimensions (fixed Gaussian projections,
            seeded): rescaling units get ``D = 1 + 2 * proj_dim`` coordinates (a log-size coordinate, the incoming and
            the outgoing direction), norm-scaled rows ``D = proj_dim``.
        balance_sweeps: Gauss–Seidel sweeps towards the balanced representative per call (warm-started from the last
            call; one sweep is exact for a single hidden layer).
        angular_step: also report the angle between consecutive directions of norm-scaled weights. This keeps the
            previous direction of those weights (memory the size of those weights), so it is off by default.
        seed: seed of the fixed random projections.

    Example:
        >>> import torch, torch.nn as nn
        >>> _ = torch.manual_seed(0)
        >>> obs = Observer(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> values = obs.compute()
        >>> values["quotient/rescale/0/path_mass/sorted"].shape
        torch.Size([8])
        >>> obs.units()["rescale/0"].shape
        torch.Size([8, 9])
    """

    def __init__(
        self,
        model: nn.Module,
        report: SymmetryReport | None = None,
        *,
        extra: list[Declaration] | str | None = None,
        dtype: torch.dtype | None = None,
        proj_dim: int = 4,
        balance_sweeps: int = 2,
        angular_step: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected argument `model` to be a torch.nn.Module, but got {type(model).__name__}")
        if report is not None and not isinstance(report, SymmetryReport):
            raise TypeError(f"Expected argument `report` to be a SymmetryReport, but got {type(report).__name__}")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Expected argument `dtype` to be torch.float32 or torch.float64, but got {dtype}")
        for arg, val, lo in (("proj_dim", proj_dim, 1), ("balance_sweeps", balance_sweeps, 1)):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"Expected argument `{arg}` to be an integer >= {lo}, but got {val!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Expected argument `seed` to be an integer, but got {seed!r}")
        self.model = model
        self.report = report if report is not None else discover(model, extra=extra)
        self.proj_dim = proj_dim
        self.balance_sweeps = balance_sweeps
        self.angular_step = bool(angular_step)
        self.seed = seed
        self._params: dict[str, torch.Tensor] = dict(model.named_parameters())
        if dtype is None:
            dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params.values()) else torch.float32
        self.dtype = dtype
        self._raw_names = [n for n in self.report.parameters if n in self._params]
        # state across calls: O(units)
        self._r: dict[str, list[torch.Tensor]] = {}
        self._balancedness: dict[str, torch.Tensor] = {}
        self._prev_dir: dict[str, torch.Tensor] = {}
        self._proj: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._units: dict[str, torch.Tensor] = {}
        self._row_profiles: dict[str, torch.Tensor] = {}
        self._trajectory_keys: list[str] | None = None

    # ------------------------------------------------------------------ helpers
    def _get(self, ref: Any) -> torch.Tensor:
        return ref.get(self._params).detach().to(self.dtype)

    def _device(self) -> torch.device:
        return next(iter(self._params.values())).device

    def _projection(self, key: str, d_in: int, d_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        p = self._proj.get(key)
        if p is None or p[0].shape[0] != d_in or p[1].shape[0] != d_out or p[0].device != device:
            k = self.proj_dim
            full = _gaussian((d_in + d_out, k), key, self.seed, self.dtype, device)
            p = (full[:d_in], full[d_in:])
            self._proj[key] = p
        return p

    # ------------------------------------------------------------------ families
    def _chain(self, chain: RescaleChain, out: dict[str, torch.Tensor]) -> None:
        ws = [self._get(lay.weight) for lay in chain.layers]
        bs = [self._get(lay.bias) if lay.bias is not None else None for lay in chain.layers]
        first, last = chain.layers[0], chain.layers[-1]
        d_first = (1 if first.kind == "diag" else ws[0][0].numel()) + (1 if bs[0] is not None else 0)
        d_in = ws[0].shape[0] if first.kind == "diag" else ws[0].shape[1] // first.in_blocks
        p_first, p_sq_in = self._projection(f"rescale-in/{chain.name}", d_first, d_in, ws[0].device)
        p_last, p_sq_out = self._projection(f"rescale-out/{chain.name}", ws[-1].shape[0] * (ws[-1][0].numel()
                                            // (ws[-1].shape[1] // last.in_blocks)), ws[-1].shape[0], ws[0].device)
        cp = O.chain_pass(ws, bs, [lay.kind for lay in chain.layers], [lay.in_blocks for lay in chain.layers],
                          p_first, p_sq_in, p_last, p_sq_out, chain.end_norm, chain.end_groups)
        out[f"quotient/rescale/{chain.name}/path_norm"] = cp.path_norm_sq.sqrt()
        self._row_profiles[last.path] = cp.row_profile
        for k, group in enumerate(chain.groups()):
            g = group.name
            pi = cp.masses[k]
            srt = pi.sort().values
            n = srt.numel()
            pre = f"quotient/rescale/{g}"
            out[f"{pre}/path_mass/sorted"] = srt
            out[f"{pre}/path_mass_total"] = srt.sum()
            out[f"{pre}/path_mass_max"] = srt[-1]
            out[f"{pre}/path_mass_median"] = srt[(n - 1) // 2]
            out[f"{pre}/path_mass_participation"] = O.participation_ratio(srt)
            # raw-side: balancedness of the raw parameters
            bal = cp.raw_in[k] - cp.raw_out[k]
            out[f"raw/{g}/balancedness"] = bal.norm()
            prev = self._balancedness.get(g)
            if prev is not None and prev.shape == bal.shape:
                out[f"dynamics/rescale/{g}/balancedness_drift"] = (bal - prev).norm()
            else:
                out[f"dynamics/rescale/{g}/balancedness_drift"] = torch.full((), math.nan, dtype=self.dtype,
                                                                            device=bal.device)
            self._balancedness[g] = bal
            dirs = torch.cat([cp.in_dirs[k], cp.out_dirs[k]], dim=1)
            n_in = cp.in_dirs[k].norm(dim=1, keepdim=True).clamp_min(1e-30)
            n_out = cp.out_dirs[k].norm(dim=1, keepdim=True).clamp_min(1e-30)
            q = cp.in_dirs[k].shape[1]
            dirs = torch.cat([dirs[:, :q] / n_in, dirs[:, q:] / n_out], dim=1)
            # coordinates: [¼ log π (the log balanced norm for one hidden layer), incoming dir, outgoing dir]
            self._units[f"rescale/{g}"] = torch.cat([0.25 * pi.clamp_min(1e-30).log()[:, None], dirs], dim=1)
            out[f"{pre}/direction_coherence"] = O.direction_coherence(dirs)

    @torch.no_grad()
    def balanced(self) -> dict[str, dict[str, torch.Tensor]]:
        """The canonical balanced representative of every rescaling chain.

        Returns ``group -> {"scale": s, "in_sq": ‖w̃_in‖², "out_sq": ‖w̃_out‖²}`` where unit ``i`` is rescaled by
        ``s_i`` (``w_in → s w_in``, ``w_out → w_out / s``) so that ``‖w̃_in,i‖ = ‖w̃_out,i‖`` for every unit at once.
        Sweeps are warm-started from the previous call (``balance_sweeps`` per call; exact in one sweep for a single
        hidden layer). A downstream normalisation's scale is divided out first, so the result is invariant under it.
        """
        res: dict[str, dict[str, torch.Tensor]] = {}
        for chain in self.report.chains:
            ws = [self._get(lay.weight) for lay in chain.layers]
            sq = [O.squared_operator(w, lay.kind, lay.in_blocks) for w, lay in zip(ws, chain.layers)]
            sqb = [self._get(lay.bias).square() if lay.bias is not None else None for lay in chain.layers]
            _, _, end_w = O.path_masses(sq, sqb, chain.end_norm, chain.end_groups)
            sq_bal = sq[:-1] + [sq[-1] * end_w[:, None]]
            init = self._r.get(chain.name)
            if init is not None and [t.shape for t in init] != [s.shape[0:1] for s in sq[:-1]]:
                init = None
            r, ins, outs = O.balance_scales(sq_bal, sqb, init, self.balance_sweeps)
            self._r[chain.name] = r
            for k, group in enumerate(chain.groups()):
                res[group.name] = {"scale": r[k].sqrt(), "in_sq": ins[k], "out_sq": outs[k]}
        return res

    def _attention(self, spec: AttentionSpec, out: dict[str, torch.Tensor], spectra: bool) -> None:
        h = spec.num_heads
        q, k, v, o = (self._get(r) for r in (spec.q, spec.k, spec.v, spec.o))
        qb = self._get(spec.q_bias) if spec.q_bias is not None else None
        vb = self._get(spec.v_bias) if spec.v_bias is not None else None
        gq = O.head_grams(q, h, qb)
        gk = O.head_grams(k, h)  # the key bias is a gauge: left out
        gv = O.head_grams(v, h, vb)
        go = O.head_grams(o, h, cols=True)
        units = []
        for fam, ga, gb in (("attention_qk", gq, gk), ("attention_vo", gv, go)):
            # M = G_a G_b has the squared singular values of the head's product as eigenvalues:
            # tr M = Σσ², tr M² = Σσ⁴ -- invariants without an eigensolver
            mm = ga @ gb
            s2 = mm.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0)
            s4 = (mm * mm.transpose(-2, -1)).sum((-2, -1)).clamp_min(1e-30)
            norms = s2.sqrt()
            pre = f"quotient/{fam}/{spec.name}"
            out[f"{pre}/head_norms/sorted"] = norms.sort().values
            out[f"{pre}/norm"] = s2.sum().sqrt()
            out[f"{pre}/max_head"] = norms.max()
            out[f"{pre}/effective_rank"] = (s2.square() / s4).mean()
            if spectra:
                sv = O.gram_pair_singular_values(ga, gb)
                out[f"{pre}/singular_values/sorted"] = sv.flatten().sort().values
                out[f"{pre}/top_singular"] = sv[:, 0].max()
            units.append(torch.stack([0.5 * s2.clamp_min(1e-30).log(), 0.25 * s4.log()], dim=1))
        self._units[f"attention/{spec.name}"] = torch.cat(units, dim=1)
        for name, g in (("q", gq), ("k", gk), ("v", gv), ("o", go)):
            out[f"raw/{spec.name}/{name}"] = g.diagonal(dim1=-2, dim2=-1).sum().sqrt()

    def _normscale(self, spec: NormScaleSpec, out: dict[str, torch.Tensor], lr: Any) -> None:
        w = self._get(spec.weight)
        w = w.flatten(1) if w.dim() > 1 else w[:, None]
        if spec.per != "row" and spec.bias is not None:
            w = torch.cat([w, self._get(spec.bias)[:, None]], 1)
        pre = f"quotient/normscale/{spec.name}"
        if spec.per == "row":
            d = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
        elif spec.per == "group":
            wg = w.reshape(spec.groups, -1)
            d = (wg / wg.norm(dim=1, keepdim=True).clamp_min(1e-30)).reshape_as(w)
        else:
            d = w / w.norm().clamp_min(1e-30)
        # rows that read hidden units of a rescaling chain move under those units' rescaling: their invariant
        # directions are the squared-path profiles computed with the chain
        rows = self._row_profiles.get(spec.name)
        if rows is None:
            rows = d
        out[f"{pre}/direction_coherence"] = O.direction_coherence(rows)
        sq_norm = w.square().sum()
        if lr is not None:
            out[f"dynamics/normscale/{spec.name}/effective_lr"] = lr / sq_norm.clamp_min(1e-30)
        if self.angular_step:
            prev = self._prev_dir.get(spec.name)
            if spec.per == "tensor":
                cos = (d * prev).sum() if prev is not None and prev.shape == d.shape else None
            else:
                rows = d.reshape(spec.groups, -1) if spec.per == "group" else d
                cos = ((rows * prev.reshape_as(rows)).sum(1).mean() if prev is not None and prev.shape == d.shape
                       else None)
            if cos is None:
                out[f"dynamics/normscale/{spec.name}/angular_step"] = torch.full((), math.nan, dtype=self.dtype,
                                                                                 device=d.device)
            else:
                out[f"dynamics/normscale/{spec.name}/angular_step"] = cos.clamp(-1, 1).acos()
            self._prev_dir[spec.name] = d.clone()
        if spec.per == "row":
            p_in, _ = self._projection(f"normscale/{spec.name}", rows.shape[1], 0, d.device)
            proj = rows @ p_in
            self._units[f"normscale/{spec.name}"] = proj / proj.norm(dim=1, keepdim=True).clamp_min(1e-30)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def compute(self, lr: float | torch.Tensor | None = None, *, spectra: bool = True) -> dict[str, torch.Tensor]:
        """All observables now, as device tensors (0-d scalars; 1-D for sorted per-unit multisets).

        Args:
            lr: the current learning rate, for ``dynamics/.../effective_lr`` (omitted when None).
            spectra: also compute the attention singular-value spectra (``singular_values/sorted``, ``top_singular``:
                small batched eigenproblems, about a sixth of the cost). A per-step caller that logs only every few
                steps passes ``spectra=False`` between log steps; every other key is always present.
        """
        out: dict[str, torch.Tensor] = {}
        if self._raw_names:
            tensors = [self._params[n].detach() for n in self._raw_names]
            norms = torch._foreach_norm(tensors, 2, dtype=self.dtype)
            for n, v in zip(self._raw_names, norms):
                out[f"raw/{n}"] = v
        self._units, self._row_profiles = {}, {}
        for chain in self.report.chains:
            self._chain(chain, out)
        for att in self.report.attentions:
            self._attention(att, out, spectra)
        for ns in self.report.norm_scales:
            self._normscale(ns, out, lr)
        return out

    @torch.no_grad()
    def units(self) -> dict[str, torch.Tensor]:
        """Per-unit coordinates in module order, ``group -> (n, D)``: the tracker's particles.

        Groups: ``rescale/<layer>`` (``[¼ log π_i, incoming direction, outgoing direction]``, π the path mass, so the
        first coordinate is the log balanced norm for a single hidden layer; see ``_profiles`` for the directions),
        ``attention/<module>`` (per head ``[½ log Σσ², ¼ log Σσ⁴]`` of ``W_Q W_Kᵀ`` and of ``W_V W_O``, σ the
        singular values),
        ``normscale/<module>`` for per-row normalised weights (projected row directions). Invariant under the
        continuous symmetries, equivariant under permutations. Uses the last :meth:`compute` when there was one since
        the parameters last changed; call :meth:`compute` first for fresh values.
        """
        if not self._units:
            self.compute()
        return dict(self._units)

    @torch.no_grad()
    def grad_observables(self) -> dict[str, torch.Tensor]:
        """Quotient gradient norms per group from ``p.grad`` (call before the optimizer step).

        Keys ``quotient/<family>/<group>/grad_norm``: ``‖w ⊙ g‖`` over a rescaling group's layer (elementwise
        invariant under any positive diagonal rescaling), ``‖w‖·‖g‖`` per normalised scale unit (rows combined in
        quadrature), and ``(Σ_h ⟨W_hW_hᵀ, G_hG_hᵀ⟩)^{1/2}`` over a head's Q, K (resp. V, O) for attention (invariant
        under GL(d_head)). Groups with a missing gradient are skipped.
        """
        out: dict[str, torch.Tensor] = {}
        p = self._params

        def grad(ref: Any) -> torch.Tensor | None:
            g = p[ref.name].grad
            if g is None:
                return None
            return (g if ref.start is None and ref.stop is None else g[ref.start : ref.stop]).detach().to(self.dtype)

        for chain in self.report.chains:
            for group in chain.groups():
                lay: ChainLayer = chain.layers[group.index]
                parts = [(lay.weight, grad(lay.weight))]
                if lay.bias is not None:
                    parts.append((lay.bias, grad(lay.bias)))
                if any(g is None for _, g in parts):
                    continue
                tot = sum((self._get(r) * g).square().sum() for r, g in parts)
                out[f"quotient/rescale/{group.name}/grad_norm"] = torch.as_tensor(tot).sqrt()
        for ns in self.report.norm_scales:
            g = grad(ns.weight)
            if g is None:
                continue
            w = self._get(ns.weight)
            if ns.per == "tensor":
                v = w.norm() * g.norm()
            else:
                rows = ns.groups if ns.per == "group" else w.shape[0]
                v = (w.reshape(rows, -1).norm(dim=1) * g.reshape(rows, -1).norm(dim=1)).norm()
            out[f"quotient/normscale/{ns.name}/grad_norm"] = v
        for att in self.report.attentions:
            gs = [grad(r) for r in (att.q, att.k, att.v, att.o)]
            if any(g is None for g in gs):
                continue
            h = att.num_heads
            q, k, v, o = (self._get(r) for r in (att.q, att.k, att.v, att.o))
            qk = (O.head_grams(q, h) * O.head_grams(gs[0], h)).sum() + (O.head_grams(k, h) * O.head_grams(gs[1], h)).sum()
            vo = (O.head_grams(v, h) * O.head_grams(gs[2], h)).sum() + (
                O.head_grams(o, h, cols=True) * O.head_grams(gs[3], h, cols=True)).sum()
            out[f"quotient/attention_qk/{att.name}/grad_norm"] = qk.clamp_min(0).sqrt()
            out[f"quotient/attention_vo/{att.name}/grad_norm"] = vo.clamp_min(0).sqrt()
        return out

    def trajectory(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The trajectory on the quotient: log of every scalar ``quotient/`` value, in a fixed key order.

        The key order is fixed at the first call (sorted keys); later calls use the same order. Keys that only
        ``compute(spectra=True)`` gives are left out, so the vector has the same length at every step.
        """
        if self._trajectory_keys is None:
            self._trajectory_keys = sorted(
                k for k, v in values.items()
                if k.startswith("quotient/") and v.dim() == 0 and not k.endswith(("grad_norm", "top_singular"))
            )
        if not self._trajectory_keys:
            return torch.zeros(0, dtype=self.dtype, device=self._device())
        return torch.stack([values[k].to(self.dtype) for k in self._trajectory_keys]).clamp_min(1e-30).log()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Warm-start scales and previous-step values (O(units)); round-trips with :meth:`load_state_dict`."""
        return {
            "version": _STATE_VERSION,
            "r": {k: [t.detach().cpu() for t in v] for k, v in self._r.items()},
            "balancedness": {k: v.detach().cpu() for k, v in self._balancedness.items()},
            "prev_dir": {k: v.detach().cpu() for k, v in self._prev_dir.items()},
            "trajectory_keys": self._trajectory_keys,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (tensors moved to the parameters' device)."""
        if not isinstance(state, Mapping) or "version" not in state:
            raise ValueError("Expected an Observer state dict with a `version` field, but got "
                             f"{type(state).__name__} without one")
        if state["version"] > _STATE_VERSION:
            raise ValueError(f"Observer state version {state['version']} is newer than this shockmon "
                             f"(supports up to {_STATE_VERSION})")
        dev = self._device()
        self._r = {k: [t.to(dev, self.dtype) for t in v] for k, v in state.get("r", {}).items()}
        self._balancedness = {k: v.to(dev, self.dtype) for k, v in state.get("balancedness", {}).items()}
        self._prev_dir = {k: v.to(dev, self.dtype) for k, v in state.get("prev_dir", {}).items()}
        self._trajectory_keys = state.get("trajectory_keys")
