"""The observer: every observable of a model, each step, batched, on the parameters' device, without a host sync.

Keys of :meth:`Observer.compute`:

``quotient/rescale/<layer>/...``
    per hidden layer of a rescaling chain: ``path_mass/sorted`` (per-unit path masses, ascending), ``path_mass_total``,
    ``path_mass_max``, ``path_mass_median``, ``path_mass_participation`` (``(Σπ)²/(nΣπ²)``), ``direction_coherence``
    (mean squared cosine between the units' balanced directions, from their projections), and per chain
    ``path_norm`` (ℓ2 path norm; for a chain whose output feeds a normalisation, normalised by it like the masses,
    which leaves it constant: the square root of the number of normalised rows or groups, as that norm's scale
    symmetry allows nothing else; before a per-row norm the last bias, a pure gauge, is left out).
``quotient/permute/<layer>/...``
    the same for the hidden layers reached through an activation without a rescaling symmetry (GELU, SiLU, Tanh, ...):
    invariant under permutations of their units (and under the rescaling of any ``rescale`` layer of the same chain);
    there ``dynamics/permute/<layer>/balancedness_drift`` is not zero under gradient flow (no rescaling, no
    conservation law): it is just the change of ``‖w_in,i‖² − ‖w_out,i‖²``.
``quotient/attention_qk/<module>/...``, ``quotient/attention_vo/<module>/...``
    per attention block: ``head_norms/sorted`` (``‖W_Q,h W_K,hᵀ‖_F`` per head, ascending), ``norm`` (root sum of
    squares over heads), ``max_head``, ``singular_values/sorted`` (all heads' singular values, ascending),
    ``top_singular``.
``quotient/normscale/<module>/direction_coherence``
    for weights read through a normalisation: mean squared cosine between the (randomly projected) directions of its
    rows; rows that read hidden units of a rescaling chain are taken through their squared-path profiles, which do
    not move under those units' rescaling.
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

Sharded parameters (FSDP2 ``fully_shard``: DTensor ``Shard(0)``) are handled without gathering them: every family is
computed from the rows a rank holds as partial sums that one SUM all-reduce of a flat buffer completes, per round
(one round unless a rescaling chain has more than one hidden layer or feeds a normalisation: see
:func:`shockmon.observables.chain_rounds`). :attr:`Observer.rows` counts the bytes and rounds.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Generator, Mapping
from typing import Any

import torch
from torch import nn

from shockmon import observables as O
from shockmon._device import to_device
from shockmon.shards import ParamRows, Reducer
from shockmon.symmetry import (
    AttentionSpec,
    Declaration,
    NormScaleSpec,
    RescaleChain,
    SymmetryReport,
    discover,
)

__all__ = ["Observer"]

_STATE_VERSION = 1
_TINY = 1e-30
Gen = Generator[list[torch.Tensor], list[torch.Tensor], Any]


def _seed_for(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _gaussian(shape: tuple[int, ...], name: str, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed_for(name, seed))
    return to_device((torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(shape[-1])).to(dtype), device)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / O.row_norms(x).clamp_min(_TINY)


def _stacked_by_shape(items: list[tuple[torch.Tensor, ...]]) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Items (tuples of tensors, one per layer) grouped by their tensors' shapes, dtypes and devices: per group the
    items' indices and, for each tuple position, their tensors stacked along a new first dimension. The observer
    finishes each group's layers with one set of batched kernels (layers of a model spread over devices, or of
    other shapes, fall into groups of their own)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, parts in enumerate(items):
        groups.setdefault(tuple((t.shape, t.dtype, t.device) for t in parts), []).append(i)
    return [
        (idx, [torch.stack([items[i][p] for i in idx]) for p in range(len(items[idx[0]]))])
        for idx in groups.values()
    ]


def _nan(like: torch.Tensor) -> torch.Tensor:
    return torch.full((), math.nan, dtype=like.dtype, device=like.device)


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
        balance_sweeps: Gauss–Seidel sweeps towards the balanced representative per :meth:`balanced` call
            (warm-started from the last call; one sweep is exact for a single hidden layer).
        angular_step: also report the angle between consecutive directions of norm-scaled weights. This keeps the
            previous value of those weights (the rows this rank holds), so it is off by default.
        seed: seed of the fixed random projections.
        reduce: completes partial sums across ranks in place (a SUM all-reduce of one flat tensor). Default: the
            shards' process group when parameters are sharded DTensors, nothing otherwise.

    Raises:
        TypeError, ValueError: bad arguments (named in the message); a sharding that splits an attention head's rows
            across ranks.

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
        reduce: Reducer | None = None,
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
        if not isinstance(angular_step, bool):
            raise TypeError(f"Expected argument `angular_step` to be a bool, but got {angular_step!r}")
        if reduce is not None and not callable(reduce):
            raise TypeError(f"Expected argument `reduce` to be callable, but got {type(reduce).__name__}")
        self.model = model
        self.report = report if report is not None else discover(model, extra=extra)
        self.proj_dim = proj_dim
        self.balance_sweeps = balance_sweeps
        self.angular_step = bool(angular_step)
        self.seed = seed
        self._params: dict[str, torch.Tensor] = dict(model.named_parameters())
        #: row access to the parameters, local shards included; counts the bytes all-reduced (``rows.bytes``)
        self.rows = ParamRows(self._params, reduce)
        if dtype is None:
            dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params.values()) else torch.float32
        self.dtype = dtype
        self._raw_names = [n for n in self.report.parameters if n in self._params]
        self._check_heads()
        # state across calls: O(units)
        self._r: dict[str, list[torch.Tensor]] = {}
        self._balancedness: dict[str, torch.Tensor] = {}
        self._prev_w: dict[str, torch.Tensor] = {}
        self._proj: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._units: dict[str, torch.Tensor] = {}
        self._trajectory_keys: list[str] | None = None

    # ------------------------------------------------------------------ helpers
    def _check_heads(self) -> None:
        for att in self.report.attentions:
            for arg in ("q", "k", "v"):
                ref = getattr(att, arg)
                _, (lo, hi, n) = self.rows.rows(ref, self.dtype)
                dh = n // att.num_heads
                if hi > lo and (lo % dh or (hi % dh and hi != n)):
                    raise ValueError(
                        f"the shards of {ref} split an attention head of {att.name!r} (rows [{lo}, {hi}) held here, "
                        f"d_head={dh}): shard so that {att.num_heads} heads fall on whole row blocks (e.g. a world "
                        "size "
                        "dividing the number of heads) or declare the projections separately"
                    )

    def _device(self) -> torch.device:
        return self.rows.local(next(iter(self._params))).device

    def _projection(
        self, key: str, d_in: int, d_out: int, device: torch.device, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.proj_dim if k is None else k
        p = self._proj.get(key)
        if p is None or p[0].shape != (d_in, k) or p[1].shape[0] != d_out or p[0].device != device:
            full = _gaussian((d_in + d_out, k), key, self.seed, self.dtype, device)
            p = (full[:d_in], full[d_in:])
            self._proj[key] = p
        return p

    def _drive(self, gens: dict[str, Gen]) -> dict[str, Any]:
        """Run generators of partial sums round by round, one reduce per round for all of them."""
        pending: dict[str, tuple[Gen, list[torch.Tensor]]] = {}
        done: dict[str, Any] = {}
        for key, gen in gens.items():
            try:
                pending[key] = (gen, next(gen))
            except StopIteration as stop:
                done[key] = stop.value
        while pending:
            keys = list(pending)
            reduced = self.rows.reduce([t for k in keys for t in pending[k][1]])
            i = 0
            for key in keys:
                gen, parts = pending[key]
                got, i = reduced[i : i + len(parts)], i + len(parts)
                try:
                    pending[key] = (gen, gen.send(got))
                except StopIteration as stop:
                    done[key] = stop.value
                    del pending[key]
        return done

    # ------------------------------------------------------------------ partial sums, family by family
    def _raw_gen(self) -> Gen:
        tensors = [self.rows.local(n) for n in self._raw_names]
        if not tensors:  # every parameter frozen: no raw norms (the quotients of frozen layers remain)
            return []
        if self.dtype == torch.float32 and any(t.dtype == torch.float64 for t in tensors):
            # float64 parameters under a float32 accumulator (e.g. model.double() after construction):
            # _foreach_norm refuses to narrow, so take the norms in float64 and cast them
            norms = [v.to(self.dtype) for v in torch._foreach_norm(tensors, 2, dtype=torch.float64)]
        else:
            norms = torch._foreach_norm(tensors, 2, dtype=self.dtype)
        if not self.rows.sharded:
            return list(norms)
        (sq,) = yield [torch.stack(norms).square()]
        return list(sq.sqrt())

    def _chain_gen(self, chain: RescaleChain) -> Gen:
        ws, bs, spans = [], [], []
        for lay in chain.layers:
            w, span = self.rows.rows(lay.weight, self.dtype)
            ws.append(w)
            spans.append(span)
            bs.append(self.rows.rows(lay.bias, self.dtype)[0] if lay.bias is not None else None)
        first, last = chain.layers[0], chain.layers[-1]
        row_size = [math.prod(w.shape[1:]) for w in ws]
        d_first = (1 if first.kind == "diag" else row_size[0]) + (1 if bs[0] is not None else 0)
        d_in = spans[0][2] if first.kind == "diag" else ws[0].shape[1] // first.in_blocks
        n_in_last = ws[-1].shape[1] // last.in_blocks if last.kind == "linear" else ws[-1].shape[1]
        dev = ws[0].device
        p_first, p_sq_in = self._projection(f"rescale-in/{chain.name}", d_first, d_in, dev)
        p_last, p_sq_out = self._projection(
            f"rescale-out/{chain.name}", spans[-1][2] * row_size[-1] // n_in_last, spans[-1][2], dev
        )
        return (
            yield from O.chain_rounds(
                ws,
                bs,
                spans,
                [lay.kind for lay in chain.layers],
                [lay.in_blocks for lay in chain.layers],
                p_first,
                p_sq_in,
                p_last,
                p_sq_out,
                chain.end_norm,
                chain.end_groups,
            )
        )

    def _weight_grams(self, ref: Any, w: torch.Tensor, heads: int, cols: bool = False) -> torch.Tensor:
        """``O.head_grams(w, heads, cols=cols)`` of the local rows ``w`` of ``ref``.

        Not cached across calls: a tensor's version counter does not see every write (``p.data.copy_(...)``, FSDP2's
        sharded updates), and a stale Gram would be a silently wrong number; recomputing costs one d_head-wide
        product per projection.
        """
        return O.head_grams(w, heads, cols=cols)

    def _head_gram(self, ref: Any, heads: int) -> torch.Tensor:
        w, (lo, hi, n) = self.rows.rows(ref, self.dtype)
        dh = n // heads
        if hi <= lo:
            return w.new_zeros(heads, dh, dh)
        return O.place(self._weight_grams(ref, w, (hi - lo) // dh), (lo // dh, hi // dh, heads), dim=0)

    def _placed(self, ref: Any) -> torch.Tensor:
        b, span = self.rows.rows(ref, self.dtype)
        return O.place(b, span, dim=0)

    def _attention_gen(self, spec: AttentionSpec) -> Gen:
        h = spec.num_heads
        grams = [self._head_gram(r, h) for r in (spec.q, spec.k, spec.v)]
        o, _ = self.rows.rows(spec.o, self.dtype)
        grams.append(self._weight_grams(spec.o, o, h, cols=True))  # rows of O: output features, summed over
        biases = [self._placed(r) for r in (spec.q_bias, spec.v_bias) if r is not None]
        got = yield grams + biases
        gq, gk, gv, go = got[:4]
        rest = list(got[4:])
        if spec.q_bias is not None:
            bq = rest.pop(0).view(h, -1, 1)
            gq = gq + bq @ bq.transpose(1, 2)
        if spec.v_bias is not None:
            bv = rest.pop(0).view(h, -1, 1)
            gv = gv + bv @ bv.transpose(1, 2)
        return gq, gk, gv, go

    def _normscale_gen(self, spec: NormScaleSpec, profiled: bool) -> Gen:
        w, (r0, r1, n) = self.rows.rows(spec.weight, self.dtype)
        w = w.flatten(1) if w.dim() > 1 else w[:, None]
        if spec.per != "row" and spec.bias is not None:
            w = torch.cat([w, self.rows.rows(spec.bias, self.dtype)[0][:, None]], 1)
        parts: list[torch.Tensor] = [w.square().sum()[None]]
        if not profiled:
            p, _ = self._projection(f"normscale/{spec.name}", w.shape[1], 0, w.device, max(16, self.proj_dim))
            parts.append(O.place(_unit_rows(w) @ p, (r0, r1, n), dim=0))
        prev = self._prev_w.get(spec.name) if self.angular_step else None
        ang = self.angular_step and prev is not None and prev.shape == w.shape
        if ang:
            if spec.per == "row":
                norms = O.row_norms(w) * O.row_norms(prev)  # type: ignore[arg-type]
                cos = (w * prev).sum(1) / norms[:, 0].clamp_min(_TINY)  # type: ignore[operator]
                parts.append(cos.sum()[None])
            else:
                groups = spec.groups if spec.per == "group" else 1
                idx = (torch.arange(r0, r1, device=w.device) * groups) // max(n, 1)
                stats = torch.stack([(w * prev).sum(1), w.square().sum(1), prev.square().sum(1)])  # type: ignore[union-attr]
                parts.append(torch.zeros(3, groups, dtype=w.dtype, device=w.device).index_add_(1, idx, stats))
        if self.angular_step:
            self._prev_w[spec.name] = w.clone()
        got = yield parts
        res: dict[str, Any] = {"sq_norm": got[0][0]}
        if not profiled:
            res["proj"] = got[1]
        if ang:
            g = got[-1]
            res["cos"] = g[0] / n if spec.per == "row" else (g[0] / (g[1] * g[2]).sqrt().clamp_min(_TINY)).mean()
        return res

    # ------------------------------------------------------------------ finishing (complete values, no more comm)
    def _finish_chains(
        self, chains: list[RescaleChain], passes: list[O.ChainPass], out: dict[str, torch.Tensor]
    ) -> None:
        """Finish every rescaling chain's values. Hidden layers of the same shape (the MLP blocks of a Transformer)
        are finished together, stacked: one set of batched kernels for all of them instead of one per layer (what a
        GPU pays for in launches). Values come out per layer as views, in model order, as if each were finished
        alone."""
        if not chains:
            return
        norms: dict[int, torch.Tensor] = {}
        for idx, (sq,) in _stacked_by_shape([(cp.path_norm_sq,) for cp in passes]):
            norms.update(zip(idx, sq.clamp_min(0).sqrt().unbind()))
        items = [
            (ci, k, f"{group.family}/{group.name}")
            for ci, chain in enumerate(chains)
            for k, group in enumerate(chain.groups())
        ]
        fields = ("masses", "raw_in", "raw_out", "in_dirs", "out_dirs")
        parts = [tuple(getattr(passes[ci], f)[k] for f in fields) for ci, k, _ in items]
        done: dict[int, dict[str, torch.Tensor]] = {}
        for idx, stacked in _stacked_by_shape(parts):
            done.update(zip(idx, self._rescale_values([items[j][2] for j in idx], *stacked)))
        j = 0
        for ci, (chain, cp) in enumerate(zip(chains, passes)):
            out[f"quotient/{chain.family}/{chain.name}/path_norm"] = norms[ci]
            if cp.row_profile is not None:
                self._row_profiles[chain.layers[-1].path] = cp.row_profile
            for group in chain.groups():
                vals = done[j]
                j += 1
                self._units[f"{group.family}/{group.name}"] = vals.pop("units")
                out.update(vals)

    def _rescale_values(
        self, names: list[str], pi: torch.Tensor, raw_in: torch.Tensor, raw_out: torch.Tensor, in_dirs: torch.Tensor,
        out_dirs: torch.Tensor,
    ) -> list[dict[str, torch.Tensor]]:
        """The values of ``A`` hidden layers of ``n`` units from their stacked path masses ``(A, n)``, raw squared
        norms ``(A, n)`` and direction projections ``(A, n, q)``: one dict per layer (and ``"units"``). ``names``:
        ``<family>/<group>``."""
        A, n = pi.shape
        srt = pi.sort(-1).values
        total = srt.sum(-1)
        participation = O.participation_ratio(srt)
        bal = raw_in - raw_out  # raw-side: balancedness of the raw parameters
        bal_norm = torch.linalg.vector_norm(bal, dim=-1)
        groups = [nm.split("/", 1)[1] for nm in names]
        prev = [self._balancedness.get(g) for g in groups]
        if all(p is not None and p.shape == bal.shape[1:] for p in prev):
            drift = torch.linalg.vector_norm(bal - torch.stack(prev), dim=-1)  # type: ignore[arg-type]
        else:  # a first step (or a layer that changed shape): the drift of those layers is not defined yet
            drift = torch.stack([
                torch.linalg.vector_norm(bal[a] - p) if p is not None and p.shape == bal.shape[1:] else _nan(bal)
                for a, p in enumerate(prev)
            ])
        dirs = torch.cat([_unit_rows(in_dirs), _unit_rows(out_dirs)], dim=-1)  # (A, n, 2q)
        # coordinates: [¼ log π (the log balanced norm for one hidden layer), incoming dir, outgoing dir]
        units = torch.cat([0.25 * pi.clamp_min(_TINY).log()[..., None], dirs], dim=-1)
        coherence = O.direction_coherence(dirs)
        res = []
        for a, (g, fg) in enumerate(zip(groups, names)):
            self._balancedness[g] = bal[a]
            pre = f"quotient/{fg}"
            res.append({
                f"{pre}/path_mass/sorted": srt[a],
                f"{pre}/path_mass_total": total[a],
                f"{pre}/path_mass_max": srt[a, -1],
                f"{pre}/path_mass_median": srt[a, (n - 1) // 2],
                f"{pre}/path_mass_participation": participation[a],
                f"raw/{g}/balancedness": bal_norm[a],
                f"dynamics/{fg}/balancedness_drift": drift[a],
                f"{pre}/direction_coherence": coherence[a],
                "units": units[a],
            })
        return res

    def _finish_attentions(
        self, specs: list[AttentionSpec], grams: list[tuple[torch.Tensor, ...]], spectra: bool,
        out: dict[str, torch.Tensor],
    ) -> None:
        """Finish every attention module's values. Modules whose per-head Grams have the same shapes (the blocks
        of a Transformer) are finished together, stacked: one set of batched kernels for all of them instead of
        one per module (a 12-block model: ~50 kernels instead of ~640 per step, what a GPU pays for in launches).
        Values come out per module as views, in module order, as if each were finished alone."""
        done: dict[int, dict[str, torch.Tensor]] = {}
        for idx, stacked in _stacked_by_shape(grams):
            done.update(zip(idx, self._attention_values(stacked, spectra)))
        for i, spec in enumerate(specs):
            vals = done[i]
            self._units[f"attention/{spec.name}"] = vals.pop("units")
            for key, v in vals.items():
                out[key.replace("<name>", spec.name)] = v

    @staticmethod
    def _attention_values(grams: list[torch.Tensor], spectra: bool) -> list[dict[str, torch.Tensor]]:
        """The values of ``A`` attention modules from their stacked per-head Grams ``(A, heads, d_head, d_head)``
        (keys with ``<name>`` for the module's name, and ``"units"``), one dict per module."""
        gq, gk, gv, go = grams
        A = gq.shape[0]
        fams = []
        units = []
        for fam, ga, gb in (("attention_qk", gq, gk), ("attention_vo", gv, go)):
            # M = G_a G_b has the squared singular values of the head's product as eigenvalues:
            # tr M = Σσ², tr M² = Σσ⁴ -- invariants without an eigensolver
            mm = ga @ gb
            s2 = mm.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0)  # (A, heads)
            s4 = (mm * mm.transpose(-2, -1)).sum((-2, -1)).clamp_min(_TINY)
            norms = s2.sqrt()
            vals = {
                "head_norms/sorted": norms.sort(-1).values,
                "norm": s2.sum(-1).sqrt(),
                "max_head": norms.amax(-1),
                "effective_rank": (s2.square() / s4).mean(-1),
            }
            if spectra:
                sv = O.gram_pair_singular_values(ga, gb)  # (A, heads, d_head), descending
                vals["singular_values/sorted"] = sv.flatten(1).sort(-1).values
                vals["top_singular"] = sv[..., 0].amax(-1)
            fams.append((fam, vals))
            units.append(torch.stack([0.5 * s2.clamp_min(_TINY).log(), 0.25 * s4.log()], dim=-1))
        unit_all = torch.cat(units, dim=-1)  # (A, heads, 4)
        raw = torch.stack(grams).diagonal(dim1=-2, dim2=-1).sum((-2, -1)).clamp_min(0).sqrt()  # (4, A)
        res = []
        for a in range(A):
            d = {f"quotient/{fam}/<name>/{k}": v[a] for fam, vals in fams for k, v in vals.items()}
            d["units"] = unit_all[a]
            for r, name in enumerate("qkvo"):
                d[f"raw/<name>/{name}"] = raw[r, a]
            res.append(d)
        return res

    def _finish_normscale(
        self, spec: NormScaleSpec, res: dict[str, Any], lr: Any, out: dict[str, torch.Tensor]
    ) -> None:
        # rows that read hidden units of a rescaling chain move under those units' rescaling: their invariant
        # directions are the squared-path profiles computed with the chain
        rows = self._row_profiles.get(spec.name, res.get("proj"))
        pre = f"quotient/normscale/{spec.name}"
        out[f"{pre}/direction_coherence"] = O.direction_coherence(rows)
        if lr is not None:
            out[f"dynamics/normscale/{spec.name}/effective_lr"] = lr / res["sq_norm"].clamp_min(_TINY)
        if self.angular_step:
            cos = res.get("cos")
            out[f"dynamics/normscale/{spec.name}/angular_step"] = (
                cos.clamp(-1, 1).acos() if cos is not None else _nan(res["sq_norm"])
            )
        if spec.per == "row":
            self._units[f"normscale/{spec.name}"] = _unit_rows(rows[:, : self.proj_dim])

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def compute(
        self, lr: float | torch.Tensor | None = None, *, spectra: bool = True, raw: bool = True
    ) -> dict[str, torch.Tensor]:
        """All observables now, as device tensors (0-d scalars; 1-D for sorted per-unit multisets).

        Args:
            lr: the current learning rate, for ``dynamics/.../effective_lr`` (omitted when None).
            spectra: also compute the attention singular-value spectra (``singular_values/sorted``, ``top_singular``:
                small batched eigenproblems, about a sixth of the cost; on a GPU ``torch.linalg.eigvalsh`` checks
                for failure on the host, a sync). A per-step caller that logs only every few steps passes
                ``spectra=False`` between log steps; every other key is always present.
            raw: also the ``raw/<parameter>`` norms (a read of every parameter, which nothing else needs: no
                trajectory or unit coordinate uses them). A per-step caller passes ``raw=False`` between log steps;
                the raw values that the families give for free (``raw/<layer>/balancedness``, ``raw/<module>/q``...)
                are always present.
        """
        gens: dict[str, Gen] = {"raw": self._raw_gen()} if raw else {}
        profiled = {c.layers[-1].path for c in self.report.chains if c.end_norm != "none"}
        for i, c in enumerate(self.report.chains):
            gens[f"c{i}"] = self._chain_gen(c)
        for i, a in enumerate(self.report.attentions):
            gens[f"a{i}"] = self._attention_gen(a)
        for i, ns in enumerate(self.report.norm_scales):
            gens[f"n{i}"] = self._normscale_gen(ns, ns.name in profiled)
        res = self._drive(gens)
        out: dict[str, torch.Tensor] = {f"raw/{n}": v for n, v in zip(self._raw_names, res.get("raw", ()))}
        self._units, self._row_profiles = {}, {}
        chains = self.report.chains
        self._finish_chains(list(chains), [res[f"c{i}"] for i in range(len(chains))], out)
        attentions = self.report.attentions
        if attentions:
            self._finish_attentions(list(attentions), [res[f"a{i}"] for i in range(len(attentions))], spectra, out)
        for i, ns in enumerate(self.report.norm_scales):
            self._finish_normscale(ns, res[f"n{i}"], lr, out)
        return out

    @torch.no_grad()
    def units(self) -> dict[str, torch.Tensor]:
        """Per-unit coordinates in module order, ``group -> (n, D)``: the tracker's particles.

        Groups: ``rescale/<layer>`` and ``permute/<layer>`` (``[¼ log π_i, incoming direction, outgoing direction]``,
        π the path mass, so the
        first coordinate is the log balanced norm for a single hidden layer; the directions are the unit's signed
        weights towards a side no symmetry acts on and its squared-path profile towards hidden units, projected to
        ``proj_dim`` and normalised), ``attention/<module>`` (per head ``[½ log Σσ², ¼ log Σσ⁴]`` of ``W_Q W_Kᵀ`` and
        of ``W_V W_O``, σ the singular values), ``normscale/<module>`` for per-row normalised weights (projected row
        directions). Invariant under the continuous symmetries, equivariant under permutations. Uses the last
        :meth:`compute`; calls it when there was none.
        """
        if not self._units:
            self.compute(spectra=False)
        return dict(self._units)

    @torch.no_grad()
    def balanced(self) -> dict[str, dict[str, torch.Tensor]]:
        """The canonical balanced representative of every rescaling chain (unsharded parameters).

        Returns ``group -> {"scale": s, "in_sq": ‖w̃_in‖², "out_sq": ‖w̃_out‖²}`` where unit ``i`` is rescaled by
        ``s_i`` (``w_in → s w_in``, ``w_out → w_out / s``) so that ``‖w̃_in,i‖ = ‖w̃_out,i‖`` for every unit at once.
        Sweeps are warm-started from the previous call (``balance_sweeps`` per call; exact in one sweep for a single
        hidden layer). A downstream normalisation's scale is divided out first, so the result is invariant under it.
        Chains with a ``permute`` layer (GELU, Tanh, ...: no rescaling there, no balanced representative) are left out.
        """
        if self.rows.sharded:
            raise NotImplementedError("Observer.balanced() needs unsharded parameters")
        res: dict[str, dict[str, torch.Tensor]] = {}
        for chain in self.report.chains:
            if chain.family != "rescale":
                continue
            ws = [self.rows.rows(lay.weight, self.dtype)[0] for lay in chain.layers]
            sq = [O.squared_operator(w, lay.kind, lay.in_blocks) for w, lay in zip(ws, chain.layers)]
            sqb = [
                self.rows.rows(lay.bias, self.dtype)[0].square() if lay.bias is not None else None
                for lay in chain.layers
            ]
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

    @torch.no_grad()
    def grads_finite(self) -> torch.Tensor | None:
        """Whether every gradient is finite, as a 0-d bool device tensor (``None`` when no parameter has one).

        One read of the gradients and no host sync: a per-step check much cheaper than :meth:`grad_observables`
        (on a 10M-parameter GPT-like model about a third of it). A gradient whose norm overflows counts as
        non-finite, as it would in the observables. Sharded: one all-reduce of one value, so every rank agrees
        (``grad_observables(check_finite=True)`` gives the same flag within its own round).
        """
        flag = self._grads_finite_local()
        if flag is not None and (self.rows.sharded or self.rows._reduce is not None):
            (bad,) = self.rows.reduce([(~flag).to(self.dtype)[None]])
            flag = bad[0] == 0
        return flag

    def _grads_finite_local(self) -> torch.Tensor | None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self._params.values():
            g = p.grad
            if g is None:
                continue
            to_local = getattr(g, "to_local", None)
            g = (to_local() if to_local is not None else g).detach()
            if g.is_sparse:
                g = g._values()
            by_dtype.setdefault(g.dtype, []).append(g)
        if not by_dtype:
            return None
        ok = [torch.isfinite(torch.stack(torch._foreach_norm(gs))).all() for gs in by_dtype.values()]
        return ok[0] if len(ok) == 1 else torch.stack(ok).all()

    @torch.no_grad()
    def grad_observables(self, *, check_finite: bool = False) -> dict[str, torch.Tensor]:
        """Quotient gradient norms per group from ``p.grad`` (call before the optimizer step).

        Keys ``quotient/<family>/<group>/grad_norm``: ``‖w ⊙ g‖`` over a rescaling group's layer (elementwise
        invariant under any positive diagonal rescaling), ``‖w‖·‖g‖`` per normalised scale unit (rows combined in
        quadrature), and ``(Σ_h ⟨W_hW_hᵀ, G_hG_hᵀ⟩)^{1/2}`` over a head's Q, K (resp. V, O) for attention (invariant
        under GL(d_head)). Groups with a missing gradient are skipped. Sharded: one all-reduce of O(groups + heads).
        With ``check_finite``, also ``"grads:finite"``: :meth:`grads_finite`, completed in the same round.
        """
        dt, rows = self.dtype, self.rows
        gens: dict[str, Gen] = {}
        finite = self._grads_finite_local() if check_finite else None

        def pair(ref: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
            g = rows.grad_rows(ref, dt)
            return None if g is None else (rows.rows(ref, dt)[0], g)

        def one(parts: list[torch.Tensor]) -> Gen:
            return (yield parts)

        for chain in self.report.chains:
            for group in chain.groups():
                lay = chain.layers[group.index]
                ps = [pair(lay.weight)] + ([pair(lay.bias)] if lay.bias is not None else [])
                if all(p is not None for p in ps):
                    tot = torch.stack([torch.linalg.vector_norm(w * g).square() for w, g in ps])  # type: ignore[misc]
                    gens[f"quotient/{group.family}/{group.name}/grad_norm"] = one([tot.sum()[None]])
        for ns in self.report.norm_scales:
            p = pair(ns.weight)
            if p is None:
                continue
            w, g = (t.flatten(1) if t.dim() > 1 else t[:, None] for t in p)
            if ns.per == "row":
                gens[f"quotient/normscale/{ns.name}/grad_norm"] = one(
                    [(w.square().sum(1) * g.square().sum(1)).sum()[None]]
                )
            else:
                groups = ns.groups if ns.per == "group" else 1
                r0, r1, n = rows.rows(ns.weight, dt)[1]
                idx = (torch.arange(r0, r1, device=w.device) * groups) // max(n, 1)
                stats = torch.stack([w.square().sum(1), g.square().sum(1)])
                gens[f"quotient/normscale/{ns.name}/grad_norm"] = one(
                    [torch.zeros(2, groups, dtype=dt, device=w.device).index_add_(1, idx, stats)]
                )
        for att in self.report.attentions:
            ps = [pair(r) for r in (att.q, att.k, att.v, att.o)]
            if any(p is None for p in ps):
                continue
            h = att.num_heads
            (q, gq), (k, gk), (v, gv), (o, go) = ps  # type: ignore[misc]
            dh = rows.rows(att.q, dt)[1][2] // h

            def local_heads(ref: Any, w: torch.Tensor, g: torch.Tensor, dh: int = dh) -> torch.Tensor:
                nh = w.shape[0] // dh
                return (self._weight_grams(ref, w, nh) * O.head_grams(g, nh)).sum() if nh else w.new_zeros(())

            qk = (local_heads(att.q, q, gq) + local_heads(att.k, k, gk))[None]
            gens[f"quotient/attention_qk/{att.name}/grad_norm"] = one([qk])
            gens[f"quotient/attention_vo/{att.name}/grad_norm"] = one(
                [
                    local_heads(att.v, v, gv)[None],
                    self._weight_grams(att.o, o, h, cols=True),
                    O.head_grams(go, h, cols=True),
                ]
            )
        if finite is not None:
            gens["grads:finite"] = one([(~finite).to(dt)[None]])
        res = self._drive(gens)
        out: dict[str, torch.Tensor] = {}
        for key, got in res.items():
            if key == "grads:finite":
                out[key] = got[0][0] == 0
                continue
            if "/attention_vo/" in key:
                val = got[0][0] + (got[1] * got[2]).sum()
            elif "/normscale/" in key and got[0].dim() == 2:
                val = (got[0][0] * got[0][1]).sum()
            else:
                val = got[0][0]
            out[key] = val.clamp_min(0).sqrt()
        return out

    def trajectory(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The trajectory on the quotient: log of every scalar ``quotient/`` value, in a fixed key order.

        The key order is fixed at the first call (sorted keys); later calls use the same order. Keys that only
        ``compute(spectra=True)`` gives are left out, so the vector has the same length at every step.
        """
        if self._trajectory_keys is None:
            self._trajectory_keys = sorted(
                k
                for k, v in values.items()
                if k.startswith("quotient/") and v.dim() == 0 and not k.endswith(("grad_norm", "top_singular"))
            )
        if not self._trajectory_keys:
            return torch.zeros(0, dtype=self.dtype, device=self._device())
        dt = self.dtype
        vals = [values[k] for k in self._trajectory_keys]
        return torch.stack([v if v.dtype == dt else v.to(dt) for v in vals]).clamp_min(1e-30).log()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Warm-start scales and previous-step values (O(units)); round-trips with :meth:`load_state_dict`."""
        return {
            "version": _STATE_VERSION,
            "r": {k: [t.detach().cpu() for t in v] for k, v in self._r.items()},
            # clones: the values are views of the layers' stacked tensors, which a save would write out whole
            "balancedness": {k: v.detach().cpu().clone() for k, v in self._balancedness.items()},
            "prev_w": {k: v.detach().cpu() for k, v in self._prev_w.items()},
            "trajectory_keys": self._trajectory_keys,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (tensors moved to the parameters' device)."""
        if not isinstance(state, Mapping) or "version" not in state:
            raise ValueError(
                f"Expected an Observer state dict with a `version` field, but got {type(state).__name__} without one"
            )
        if state["version"] > _STATE_VERSION:
            raise ValueError(
                f"Observer state version {state['version']} is newer than this shockmon "
                f"(supports up to {_STATE_VERSION})"
            )
        dev = self._device()
        self._r = {k: [t.to(dev, self.dtype) for t in v] for k, v in state.get("r", {}).items()}
        self._balancedness = {k: v.to(dev, self.dtype) for k, v in state.get("balancedness", {}).items()}
        self._prev_w = {k: v.to(dev, self.dtype) for k, v in state.get("prev_w", {}).items()}
        self._trajectory_keys = state.get("trajectory_keys")
