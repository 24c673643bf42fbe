"""Small real models and random group elements acting on them, shared by the tests."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 12),
        nn.ReLU(),
        nn.Sequential(nn.Linear(12, 10), nn.LeakyReLU(0.1)),
        nn.Dropout(0.0),
        nn.Linear(10, 4),
    )


def cnn() -> nn.Module:
    """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> MaxPool -> Conv -> ReLU -> AvgPool -> Flatten -> Linear."""
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(5 * 4, 3),
    )
    for mod in m:
        if isinstance(mod, nn.BatchNorm2d):
            mod.eps = 1e-12  # the scale symmetry is exact only while eps is negligible
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return m


def transformer_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True)


class FusedBlock(nn.Module):
    """GPT-style block with fused QKV (discovery cannot see its heads) and a ReLU MLP outside nn.Sequential."""

    def __init__(self, d: int = 16, heads: int = 4, d_mlp: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, d_mlp)
        self.out = nn.Linear(d_mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.relu(self.fc(x)))

    @staticmethod
    def declarations(prefix: str = "") -> list:
        from shockmon import AttentionHeads, Rescaling

        d = 16
        return [
            AttentionHeads(
                q=f"{prefix}qkv.weight[0:{d}]",
                k=f"{prefix}qkv.weight[{d}:{2 * d}]",
                v=f"{prefix}qkv.weight[{2 * d}:{3 * d}]",
                o=f"{prefix}proj.weight",
                num_heads=4,
                q_bias=f"{prefix}qkv.bias[0:{d}]",
                k_bias=f"{prefix}qkv.bias[{d}:{2 * d}]",
                v_bias=f"{prefix}qkv.bias[{2 * d}:{3 * d}]",
                name=f"{prefix}attn",
            ),
            Rescaling(inp=f"{prefix}fc.weight", out=f"{prefix}out.weight", inp_bias=f"{prefix}fc.bias"),
        ]


# ----------------------------------------------------------------------------------------- group elements


def rand_scales(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-1.2, 1.2, generator=g))


def rand_gl(d: int, g: torch.Generator) -> torch.Tensor:
    """A random well-conditioned matrix (singular values in [0.5, 2])."""
    q1, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    s = torch.exp(torch.empty(d, dtype=torch.float64).uniform_(math.log(0.5), math.log(2.0), generator=g))
    return q1 @ torch.diag(s) @ q2


@torch.no_grad()
def rescale_units(
    w_in: nn.Module, w_out: nn.Module, a: torch.Tensor, perm: torch.Tensor | None = None, in_blocks: int = 1
) -> None:
    """Hidden units between two layers: incoming rows (and bias) × a, outgoing columns / a, then permute."""
    shape = (-1,) + (1,) * (w_in.weight.dim() - 1)
    w_in.weight.mul_(a.view(shape))
    if w_in.bias is not None:
        w_in.bias.mul_(a)
    wo = w_out.weight
    if isinstance(w_out, nn.Linear) and in_blocks > 1:
        v = wo.view(wo.shape[0], -1, in_blocks)
        v.div_(a.view(1, -1, 1))
        if perm is not None:
            v.copy_(v[:, perm].clone())
    else:
        shape = (1, -1) + (1,) * (wo.dim() - 2)
        wo.div_(a.view(shape))
        if perm is not None:
            wo.copy_(wo[:, perm].clone())
    if perm is not None:
        w_in.weight.copy_(w_in.weight[perm].clone())
        if w_in.bias is not None:
            w_in.bias.copy_(w_in.bias[perm].clone())
        if isinstance(w_in, nn.BatchNorm2d):
            w_in.running_mean.copy_(w_in.running_mean[perm].clone())
            w_in.running_var.copy_(w_in.running_var[perm].clone())


@torch.no_grad()
def scale_rows(layer: nn.Module, c: torch.Tensor) -> None:
    layer.weight.mul_(c.view((-1,) + (1,) * (layer.weight.dim() - 1)))
    if layer.bias is not None:
        layer.bias.mul_(c)


@torch.no_grad()
def attention_gauge(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    heads: int,
    g: torch.Generator,
    qb: torch.Tensor | None = None,
    kb: torch.Tensor | None = None,
    vb: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
) -> None:
    """In place: per head Q -> A Q, K -> A^-T K, V -> B V, O -> O B^-1; then permute heads."""
    dh = q.shape[0] // heads
    for h in range(heads):
        rows = slice(h * dh, (h + 1) * dh)
        a, b = rand_gl(dh, g).to(q.dtype), rand_gl(dh, g).to(q.dtype)
        a_it = torch.linalg.inv(a).t()
        q[rows] = a @ q[rows]
        k[rows] = a_it @ k[rows]
        v[rows] = b @ v[rows]
        o[:, rows] = o[:, rows] @ torch.linalg.inv(b)
        if qb is not None:
            qb[rows] = a @ qb[rows]
        if kb is not None:
            kb[rows] = a_it @ kb[rows]
        if vb is not None:
            vb[rows] = b @ vb[rows]
    if perm is not None:
        idx = torch.cat([torch.arange(p * dh, (p + 1) * dh) for p in perm.tolist()])
        for t in (q, k, v) + tuple(x for x in (qb, kb, vb) if x is not None):
            t.copy_(t[idx].clone())
        o.copy_(o[:, idx].clone())


@torch.no_grad()
def act_on_report(model: nn.Module, report, g: torch.Generator) -> None:  # type: ignore[no-untyped-def]
    """Apply, in place, a random element of every symmetry group that ``report`` claims for ``model``.

    Parameters are resolved by their module path (``get_parameter``), so a weight tied to another module is changed
    wherever it is used: a claim that ignores the tie changes the function, which is what the tests look for.
    """

    def get(ref):  # type: ignore[no-untyped-def]
        t = model.get_parameter(ref.name)
        return t if ref.start is None and ref.stop is None else t[ref.start : ref.stop]

    for chain in report.chains:
        for grp in chain.groups():
            lay, nxt = chain.layers[grp.index], chain.layers[grp.index + 1]
            w_in, w_out = get(lay.weight), get(nxt.weight)
            n = w_in.shape[0]
            a = rand_scales(n, g).to(w_in.dtype) if grp.family == "rescale" else torch.ones(n, dtype=w_in.dtype)
            # a norm's affine reads its own normalised channel: its units can be rescaled, not permuted
            perm = torch.arange(n) if lay.kind == "diag" else torch.randperm(n, generator=g)
            rows = [w_in] + ([get(lay.bias)] if lay.bias is not None else [])
            for t in rows:
                t.mul_(a.view((-1,) + (1,) * (t.dim() - 1)))
                t.copy_(t[perm].clone())
            cols = w_out.view(w_out.shape[0], n, nxt.in_blocks, *w_out.shape[2:])
            cols.div_(a.view((1, -1) + (1,) * (cols.dim() - 2)))
            cols.copy_(cols[:, perm].clone())
    for spec in report.norm_scales:
        w = get(spec.weight)
        parts = w.shape[0] if spec.per == "row" else spec.groups if spec.per == "group" else 1
        c = rand_scales(parts, g).to(w.dtype).repeat_interleave(w.shape[0] // parts)
        for t in [w] + ([get(spec.bias)] if spec.bias is not None else []):
            t.mul_(c.view((-1,) + (1,) * (t.dim() - 1)))
    for att in report.attentions:
        refs = (att.q_bias, att.k_bias, att.v_bias)
        attention_gauge(
            get(att.q), get(att.k), get(att.v), get(att.o), att.num_heads, g,
            *(get(r) if r is not None else None for r in refs),
            perm=torch.randperm(att.num_heads, generator=g),
        )  # fmt: skip


class RandomDataflow(nn.Module):
    """A random computation over width-``d`` features, for fuzzing discovery: Linear layers, norms, module and
    functional activations, residual sums, products, concatenations, a Linear called twice, a weight read outside
    its module, shape reads. Each op reads the previous value most of the time; the output sums the values nothing
    else read, so every claimed group acts on something the output depends on.
    """

    KINDS = ("lin", "lin", "lin", "ln", "relu", "frelu", "gelu", "tanh", "add", "mul", "cat", "reuse", "size", "drop",
             "wread")  # fmt: skip

    def __init__(self, seed: int, d: int = 6) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.ops: list[tuple[str, int, int, int]] = []
        self.mods = nn.ModuleDict()
        for i in range(rng.randint(3, 12)):
            kind = rng.choice(self.KINDS)
            a = i if rng.random() < 0.7 else rng.randrange(i + 1)  # input value (0: the model's input)
            b = rng.randrange(i + 1)
            if kind == "lin":
                self.mods[f"l{i}"] = nn.Linear(d, d, bias=rng.random() < 0.6)
            elif kind == "ln":
                self.mods[f"n{i}"] = nn.LayerNorm(d, eps=1e-12) if rng.random() < 0.5 else nn.RMSNorm(d, eps=1e-12)
            elif kind == "relu":
                self.mods[f"r{i}"] = nn.ReLU()
            elif kind == "cat":
                self.mods[f"c{i}"] = nn.Linear(2 * d, d)
            self.ops.append((kind, a, b, i))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals = [x]
        lins = [k for k in self.mods if k.startswith("l")]
        for kind, a, b, i in self.ops:
            va, vb = vals[a], vals[b]
            if kind == "lin":
                v = self.mods[f"l{i}"](va)
            elif kind in ("ln", "relu"):
                v = self.mods[f"{'n' if kind == 'ln' else 'r'}{i}"](va)
            elif kind == "frelu":
                v = F.relu(va) if i % 2 else va.relu()
            elif kind == "gelu":
                v = F.gelu(va)
            elif kind == "tanh":
                v = torch.tanh(va)
            elif kind == "add":
                v = va + vb
            elif kind == "mul":
                v = va * vb
            elif kind == "cat":
                v = self.mods[f"c{i}"](torch.cat([va, vb], -1))
            elif kind == "reuse":
                v = self.mods[lins[i % len(lins)]](va) if lins else va
            elif kind == "size":
                v = va.view(va.size(0), -1)
            elif kind == "drop":
                v = F.dropout(va, 0.0, self.training)
            else:  # "wread"
                v = va + self.mods[lins[i % len(lins)]].weight.sum() if lins else va
            vals.append(v)
        used = {a for _, a, _, _ in self.ops} | {b for k, _, b, _ in self.ops if k in ("add", "mul", "cat")}
        return sum(v.sum(-1) for j, v in enumerate(vals) if j not in used)
