"""Pure tensor functions: the invariants of each symmetry family.

Everything here takes tensors and returns tensors, under ``torch.no_grad()``, with no host sync, so it can run every
step on any device. Inputs are expected in the accumulation dtype (float32 or float64); the :class:`~shockmon.Observer`
casts. Functions are written from *partial sums* (squared-weight operators, Gram matrices) so that sharded parameters
can be reduced across ranks before they are finished.

Example (path masses of a two-layer ReLU net are invariant under per-unit rescaling):
    >>> import torch
    >>> f64 = torch.float64
    >>> w1, b1, w2 = torch.randn(5, 3, dtype=f64), torch.randn(5, dtype=f64), torch.randn(2, 5, dtype=f64)
    >>> a = torch.rand(5, dtype=torch.float64) + 0.5
    >>> pi = path_masses([w1.square(), w2.square()], [b1.square(), None])[0][0]
    >>> pi2 = path_masses([(a[:, None] * w1).square(), (w2 / a).square()], [(a * b1).square(), None])[0][0]
    >>> torch.allclose(pi, pi2)
    True
"""

from __future__ import annotations

import functools
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ChainPass",
    "balance_scales",
    "chain_pass",
    "chain_rounds",
    "place",
    "run_local",
    "direction_coherence",
    "gram_pair_norms",
    "gram_pair_singular_values",
    "head_grams",
    "participation_ratio",
    "path_masses",
    "row_norms",
    "squared_operator",
]

_TINY = 1e-30


@functools.lru_cache(maxsize=256)
def _const(shape: tuple[int, ...], value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A constant tensor, made once per shape, value, dtype and device: the chain passes concatenate ones and zeros
    into their vectors at every step, and each fresh ``torch.ones`` is a kernel launch on a GPU. Shared: read only
    (every use here goes into ``torch.cat`` or a product)."""
    return torch.full(shape, value, dtype=dtype, device=device)


@torch.no_grad()
def squared_operator(weight: torch.Tensor, kind: str = "linear", in_blocks: int = 1) -> torch.Tensor:
    """The ``(out, in)`` matrix of squared weights summed over everything a unit owns.

    ``linear``: ``W ⊙ W``; ``conv``: ``(W ⊙ W)`` summed over the kernel; ``diag``: ``diag(γ²)``; with ``in_blocks``
    > 1 the columns of a Linear that reads a flattened ``(C, in_blocks)`` map are summed per channel.
    """
    if kind == "diag":
        return torch.diag(weight.square())
    sq = weight.square()
    if kind == "conv":
        sq = sq.flatten(2).sum(-1)
    if in_blocks > 1:
        sq = sq.view(sq.shape[0], -1, in_blocks).sum(-1)
    return sq


@torch.no_grad()
def _end_weights(h_end: torch.Tensor, h_end_nobias: torch.Tensor, end_norm: str, end_groups: int) -> torch.Tensor:
    if end_norm == "none":
        return torch.ones_like(h_end)
    if end_norm == "row":
        return 1.0 / h_end_nobias.clamp_min(_TINY)
    if end_norm == "tensor":
        return (1.0 / h_end.sum().clamp_min(_TINY)).expand_as(h_end)
    g = h_end.view(end_groups, -1)
    return (1.0 / g.sum(-1, keepdim=True).clamp_min(_TINY)).expand_as(g).reshape(-1)


@torch.no_grad()
def path_masses(
    sq_ops: Sequence[torch.Tensor],
    sq_biases: Sequence[torch.Tensor | None],
    end_norm: str = "none",
    end_groups: int = 1,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-unit path masses of every hidden layer of a rescaling chain, and the squared ℓ2 path norm.

    ``in`` is a forward pass of squared weights from a vector of ones (``h ← S h + b²``), ``out`` a backward pass
    from the chain's output (``o ← Sᵀ o``); the path mass of hidden unit ``i`` of layer ``k`` is ``in_i · out_i``:
    the total squared weight of all input-output paths through it. When the chain's output is normalised
    (``end_norm``), the backward pass starts from the inverse of the normalised group's mass, which makes the masses
    invariant under that scale symmetry too.

    Args:
        sq_ops: ``S_0 ... S_m``, squared-weight operators (see :func:`squared_operator`).
        sq_biases: ``b_k²`` per layer or None.
        end_norm: ``"none"``, ``"row"``, ``"group"`` or ``"tensor"`` (see :class:`~shockmon.symmetry.RescaleChain`).
        end_groups: groups for ``"group"``.

    Returns:
        (masses of hidden layers ``0 ... m-1``, squared path norm of the chain, the backward pass's starting weights
        over the chain's outputs).
    """
    h = torch.ones(sq_ops[0].shape[1], dtype=sq_ops[0].dtype, device=sq_ops[0].device)
    ins: list[torch.Tensor] = []
    h_nobias = h
    for s, b in zip(sq_ops, sq_biases):
        h_nobias = s @ h
        h = h_nobias + b if b is not None else h_nobias
        ins.append(h)
    o = end = _end_weights(h, h_nobias, end_norm, end_groups)
    # before a per-row norm (BatchNorm) the last bias is a pure gauge: any value gives the same function
    path_norm_sq = ((h_nobias if end_norm == "row" else h) * o).sum()
    masses: list[torch.Tensor] = [h] * (len(sq_ops) - 1)
    for k in range(len(sq_ops) - 1, 0, -1):
        o = sq_ops[k].t() @ o
        masses[k - 1] = ins[k - 1] * o
    return masses, path_norm_sq, end


@torch.no_grad()
def balance_scales(
    sq_ops: Sequence[torch.Tensor],
    sq_biases: Sequence[torch.Tensor | None],
    init: Sequence[torch.Tensor] | None = None,
    sweeps: int = 2,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Squared scale factors ``r_k`` that balance every hidden unit (``‖w_in‖ = ‖w_out‖``) of a chain.

    Unit ``i`` of layer ``k`` is rescaled by ``sqrt(r_k,i)``: its incoming squared norm becomes
    ``r_i (S_k r_{k-1}^{-1} + b²)_i`` and its outgoing one ``(S_{k+1}ᵀ r_{k+1})_i / r_i``; they are equal when
    ``r_i² = (S_{k+1}ᵀ r_{k+1})_i / (S_k r_{k-1}^{-1} + b²)_i``. Gauss–Seidel sweeps over the layers converge
    linearly to the unique balanced representative of the orbit (one sweep is exact for one hidden layer); warm-started
    from the previous step's ``r``, one or two sweeps suffice.

    Returns:
        (``r`` per hidden layer, balanced incoming squared norms, balanced outgoing squared norms).
    """
    n_hidden = len(sq_ops) - 1
    dtype, device = sq_ops[0].dtype, sq_ops[0].device
    r = (
        [t.clone() for t in init]
        if init is not None
        else [torch.ones(sq_ops[k].shape[0], dtype=dtype, device=device) for k in range(n_hidden)]
    )

    def incoming(k: int) -> torch.Tensor:
        prev = r[k - 1].reciprocal() if k > 0 else torch.ones(sq_ops[0].shape[1], dtype=dtype, device=device)
        b = sq_biases[k]
        x = sq_ops[k] @ prev
        return x + b if b is not None else x

    def outgoing(k: int) -> torch.Tensor:
        nxt = r[k + 1] if k + 1 < n_hidden else torch.ones(sq_ops[k + 1].shape[0], dtype=dtype, device=device)
        return sq_ops[k + 1].t() @ nxt

    for _ in range(max(sweeps, 1)):
        for k in range(n_hidden):
            a, b = outgoing(k), incoming(k)
            # dead units (a or b zero) keep r = 1: any scale is balanced for them
            ok = (a > _TINY) & (b > _TINY)
            r[k] = torch.where(ok, (a.clamp_min(_TINY) / b.clamp_min(_TINY)).sqrt(), torch.ones_like(a))
    ins = [r[k] * incoming(k) for k in range(n_hidden)]
    outs = [outgoing(k) / r[k] for k in range(n_hidden)]
    return r, ins, outs


@torch.no_grad()
def participation_ratio(x: torch.Tensor) -> torch.Tensor:
    """``(Σx)² / (n Σx²)`` of non-negative values along the last dimension (batched over the others): 1 when all
    equal, ``1/n`` when one dominates (a fraction of units)."""
    s = x.sum(-1)
    return s * s / (x.shape[-1] * x.square().sum(-1)).clamp_min(_TINY)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norms of the rows of ``x`` ``(..., n, d)``, as ``(..., n, 1)`` columns.

    The same as ``x.norm(dim=-1, keepdim=True)``, but a sum of squares: ``norm`` over short or strided rows
    (the per-unit projections are ``(n, 4)`` transposed views) is an order of magnitude slower on CPU.
    """
    return x.square().sum(-1, keepdim=True).sqrt()


@torch.no_grad()
def direction_coherence(u: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine ``‖UᵀU‖²_F / n²`` between the rows of ``u`` ``(..., n, d)`` (normalised here): 1 when
    all rows are parallel, ``≈ 1/d`` when spread. Computed on the smaller Gram side; batched over leading
    dimensions."""
    n = u.shape[-2]
    un = u / row_norms(u).clamp_min(_TINY)
    g = un.mT @ un if un.shape[-1] <= n else un @ un.mT
    return g.square().sum((-2, -1)) / (n * n)


@torch.no_grad()
def head_grams(w: torch.Tensor, num_heads: int, bias: torch.Tensor | None = None, cols: bool = False) -> torch.Tensor:
    """Per-head Gram matrices ``W_h W_hᵀ`` of shape ``(H, d_head, d_head)``.

    ``w`` is ``(H*d_head, d_in)`` with head ``h`` owning rows (``cols=False``, Q/K/V in Linear layout; a bias, if given,
    is appended as a column because it transforms with the head's ``A``/``B``), or ``(d_out, H*d_head)`` owning
    columns (``cols=True``, the output projection: returns ``O_hᵀ O_h``).
    """
    if cols:
        wh = w.view(w.shape[0], num_heads, -1).permute(1, 2, 0)
        return wh @ wh.transpose(1, 2)
    wh = w.reshape(num_heads, -1, w.shape[1])
    g = wh @ wh.transpose(1, 2)
    if bias is not None:
        bh = bias.view(num_heads, -1, 1)
        g = torch.baddbmm(g, bh, bh.transpose(1, 2))
    return g


@torch.no_grad()
def gram_pair_norms(g_a: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    """``‖Aᵀ B‖_F`` per head from ``G_a = A Aᵀ`` and ``G_b = B Bᵀ``: ``⟨G_a, G_b⟩^{1/2}``. Invariant under
    ``A → M A``, ``B → M^{-T} B`` for any invertible ``M``."""
    return (g_a * g_b).sum((-2, -1)).clamp_min(0).sqrt()


@torch.no_grad()
def gram_pair_singular_values(g_a: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    """Singular values of ``Aᵀ B`` per head, descending, from the Grams alone (``d_head × d_head`` eigenproblems).

    The nonzero eigenvalues of ``(AᵀB)ᵀ(AᵀB)`` equal those of ``Lᵀ G_b L`` with ``G_a = L Lᵀ`` (Cholesky; a jitter of
    ``10·eps`` times the mean diagonal keeps a rank-deficient ``G_a`` factorisable without a host-side check). A
    Cholesky and one eigenvalue-only solve cost about a third of two symmetric eigendecompositions.
    """
    d = g_a.shape[-1]
    eye = torch.eye(d, dtype=g_a.dtype, device=g_a.device)
    scale = g_a.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(g_a.dtype).tiny)
    jitter = 10 * torch.finfo(g_a.dtype).eps * scale
    chol, _ = torch.linalg.cholesky_ex(g_a + jitter[..., None, None] * eye)
    sym = chol.transpose(-2, -1) @ g_b @ chol
    sym = 0.5 * (sym + sym.transpose(-2, -1))
    return torch.linalg.eigvalsh(sym).clamp_min(0).sqrt().flip(-1)


@dataclass
class ChainPass:
    """Everything one forward and one backward pass over a rescaling chain's squared weights gives.

    Attributes:
        masses: per hidden layer, per-unit path masses (see :func:`path_masses`).
        path_norm_sq: squared ℓ2 path norm of the chain.
        end_weights: the backward pass's starting weights over the chain's outputs.
        raw_in, raw_out: per hidden layer, the raw squared norms of each unit's incoming (bias included) and outgoing
            weights (their difference is the balancedness).
        in_dirs, out_dirs: per hidden layer, ``(n, q)`` projections of each unit's incoming/outgoing direction (not
            normalised): signed weights towards a side no symmetry acts on, squared-path profiles towards hidden units.
        row_profile: ``(n_out, q)`` squared-path profiles of the last layer's rows (only when its output is
            normalised; None otherwise).
    """

    masses: list[torch.Tensor]
    path_norm_sq: torch.Tensor
    end_weights: torch.Tensor
    raw_in: list[torch.Tensor]
    raw_out: list[torch.Tensor]
    in_dirs: list[torch.Tensor]
    out_dirs: list[torch.Tensor]
    row_profile: torch.Tensor | None


Partials = list[torch.Tensor]
Span = tuple[int, int, int]


def place(t: torch.Tensor, span: Span, dim: int = -1) -> torch.Tensor:
    """Put a block of locally owned rows ``[r0, r1)`` into zeros of the full size ``n`` along ``dim`` (a partial sum
    that an all-reduce completes). The identity when everything is local."""
    r0, r1, n = span
    if r0 == 0 and r1 == n:
        return t
    shape = list(t.shape)
    shape[dim] = n
    out = t.new_zeros(shape)
    out.narrow(dim, r0, r1 - r0).copy_(t)
    return out


def chain_rounds(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    spans: Sequence[Span],
    kinds: Sequence[str],
    in_blocks: Sequence[int],
    p_first: torch.Tensor,
    p_sq_in: torch.Tensor,
    p_last: torch.Tensor,
    p_sq_out: torch.Tensor,
    end_norm: str = "none",
    end_groups: int = 1,
) -> Generator[Partials, Partials, ChainPass]:
    """All per-unit quantities of a rescaling chain, from locally owned rows, in rounds of partial sums.

    A generator: each ``yield`` hands out a list of partial sums; the caller sends back the same list completed
    (all-reduced with SUM across ranks, or unchanged in one process); the return value is a :class:`ChainPass`.
    Rows ``[r0, r1)`` of layer ``k`` (``spans[k] = (r0, r1, n_k)``) are what this rank holds of ``weights[k]``
    (and of ``biases[k]``); with everything local this is the ordinary single-process computation.

    The forward pass over layer ``k`` needs the complete output of layer ``k-1``, the backward pass over layer ``k``
    the complete output-side vector of layer ``k``: layer ``k``'s forward runs in round ``k``, and the backward pass
    runs alongside from round 0 (``end_norm="none"``) or after the forward pass (the end weights need it). A chain
    with one hidden layer and no downstream normalisation takes one round. All vectors are stacked as rows,
    ``(channels, units)``, so every product has a thin left operand (``x @ Sᵀ``, ``z @ S``), which runs 3-4x faster on
    CPU than the column layout.
    """
    m = len(weights) - 1
    q = p_sq_in.shape[1]
    c = 2 + q
    dtype, device = weights[0].dtype, weights[0].device
    sq = [w.square() if k == "diag" else squared_operator(w, k, b) for w, k, b in zip(weights, kinds, in_blocks)]
    sqb = [b.square() if b is not None else None for b in biases]
    d0 = spans[0][2] if kinds[0] == "diag" else sq[0].shape[1]
    if kinds[0] == "diag":
        # a normalisation's channels are permuted together with its units: no fixed input side
        p_sq_in = p_sq_in[:1].expand(d0, -1)

    def forward(k: int, x: torch.Tensor) -> torch.Tensor:
        r0, r1, _ = spans[k]
        y = x[:, r0:r1] * sq[k] if kinds[k] == "diag" else x @ sq[k].t()
        if sqb[k] is not None:
            y[:2] += sqb[k]  # y is this product's own: the bias paths of rows 0 and 1, in place
        return y

    def signed_first() -> torch.Tensor:
        w0 = weights[0]
        if kinds[0] == "diag":
            first = p_first[0][:, None] * w0[None]
        else:
            w0f = w0.flatten(1)
            first = p_first[: w0f.shape[1]].t() @ w0f.t()
        if biases[0] is not None:
            first = first + p_first[-1][:, None] * biases[0][None]
        return first  # (q, local rows)

    def signed_last(e: torch.Tensor) -> torch.Tensor:
        r0, r1, n_out = spans[m]
        wm = weights[m]
        n_in = sq[m].shape[1]
        wv = wm.reshape(wm.shape[0], n_in, -1)  # (local out, n, r): kernel elements or flatten blocks
        pv = (e[r0:r1].sqrt()[:, None] * p_last.view(n_out, -1)[r0:r1]).view(wm.shape[0], wv.shape[2], -1)
        if wv.shape[2] == 1:  # a Linear, or a conv with a 1x1 kernel (a 4-D weight: use its (out, n) view)
            return pv[:, 0, :].t() @ wv[:, :, 0]  # (q, n)
        return torch.einsum("onr,orq->qn", wv, pv)

    def start_backward(e: torch.Tensor) -> torch.Tensor:
        return torch.cat([e[None], _const((1, e.shape[0]), 1.0, e.dtype, e.device), (e[:, None] * p_sq_out).t()])

    need_fwd_m = end_norm != "none"
    n_fwd = m + 1 if need_fwd_m else m
    x = torch.cat([_const((2, d0), 1.0, dtype, device), p_sq_in.t()])
    fwd: list[torch.Tensor] = []
    bwd: dict[int, torch.Tensor] = {}
    first = last = bias_paths = None
    e: torch.Tensor | None = None
    z: torch.Tensor | None = None
    bk = 0
    if not need_fwd_m:
        e = _const((spans[m][2],), 1.0, dtype, device)
        z, bk = start_backward(e), m
    while len(fwd) < n_fwd or bk >= 1:
        parts: Partials = []
        tags: list[str] = []
        k = len(fwd)
        if k < n_fwd:
            y = forward(k, x)
            if k == 0:
                y = torch.cat([y, signed_first()])
            if k == m:  # the last layer's squared bias, to separate it from the path mass (row end norm)
                b = sqb[m] if sqb[m] is not None else torch.zeros(y.shape[1], dtype=dtype, device=device)
                y = torch.cat([y, b[None]])
            parts.append(place(y, spans[k]))
            tags.append("f")
        if bk >= 1:
            r0, r1, _ = spans[bk]
            zz = z[:, r0:r1] @ sq[bk]  # type: ignore[index]
            if bk == m:
                zz = torch.cat([zz, signed_last(e)])  # type: ignore[arg-type]
                parts.append(  # the last bias's paths; before a per-row norm that bias is a pure gauge: none
                    (sqb[m] * e[r0:r1]).sum()[None]
                    if sqb[m] is not None and end_norm != "row"  # type: ignore[index]
                    else torch.zeros(1, dtype=dtype, device=device)
                )
                tags.append("bias_paths")
            parts.append(zz)
            tags.append("b")
        got = yield parts
        for tag, t in zip(tags, got):
            if tag == "f":
                if k == 0:
                    t, first = t[:c], t[c:]
                fwd.append(t)
                x = torch.cat([t[:1], _const(tuple(t[:1].shape), 1.0, t.dtype, t.device), t[2:c]])
                if len(fwd) == n_fwd and need_fwd_m:
                    h = fwd[m][0]
                    e = _end_weights(h, h - fwd[m][c], end_norm, end_groups)
                    z, bk = start_backward(e), m
            elif tag == "bias_paths":
                bias_paths = t[0]
            else:
                if bk == m:
                    t, last = t[:c], t[c:]
                bwd[bk] = t
                z = torch.cat([t[:1], _const(tuple(t[:1].shape), 1.0, t.dtype, t.device), t[2:]])
                bk -= 1
    assert e is not None and first is not None and last is not None and bias_paths is not None
    masses = [fwd[k][0] * bwd[k + 1][0] for k in range(m)]
    path_norm_sq = (fwd[m - 1][0] * bwd[m][0]).sum() + bias_paths
    in_dirs = [first.t()] + [fwd[k][2:c].t() for k in range(1, m)]
    out_dirs = [bwd[k + 1][2:].t() for k in range(m - 1)] + [last.t()]
    row_profile = fwd[m][2:c].t() if need_fwd_m else None
    return ChainPass(
        masses,
        path_norm_sq,
        e,
        [fwd[k][1] for k in range(m)],
        [bwd[k + 1][1] for k in range(m)],
        in_dirs,
        out_dirs,
        row_profile,
    )


def run_local(gen: Generator[Partials, Partials, Any]) -> Any:
    """Drive a rounds generator in one process (every partial sum is already complete)."""
    try:
        parts = next(gen)
        while True:
            parts = gen.send(parts)
    except StopIteration as stop:
        return stop.value


def chain_pass(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    kinds: Sequence[str],
    in_blocks: Sequence[int],
    p_first: torch.Tensor,
    p_sq_in: torch.Tensor,
    p_last: torch.Tensor,
    p_sq_out: torch.Tensor,
    end_norm: str = "none",
    end_groups: int = 1,
) -> ChainPass:
    """:func:`chain_rounds` for full (unsharded) weights, in one process."""
    spans = [(0, w.shape[0], w.shape[0]) for w in weights]
    with torch.no_grad():
        return run_local(
            chain_rounds(
                weights, biases, spans, kinds, in_blocks, p_first, p_sq_in, p_last, p_sq_out, end_norm, end_groups
            )
        )
