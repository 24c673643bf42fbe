"""Symmetry discovery: which parameter-space symmetries a model has, found once.

:func:`discover` walks a model and returns a :class:`SymmetryReport` of specs, one per symmetry group:

- :class:`RescaleChain` — Linear/Conv layers joined by positively homogeneous maps (ReLU, LeakyReLU, PReLU with one
  slope, Identity, Dropout, Flatten, pooling over space: after a conv or a 2-D/3-D norm, not after a Linear, whose
  units it would pool across): each hidden unit can be rescaled by ``a > 0`` on its incoming weights
  and bias and by ``1/a`` on its outgoing weights. Found along the model's dataflow and in the feed-forward block
  of ``nn.TransformerEncoderLayer``/``DecoderLayer``.
- :class:`NormScaleSpec` — a weight whose output feeds a normalisation layer (directly or through positively
  homogeneous maps) only matters through its direction: per row before BatchNorm/InstanceNorm, per channel group
  before GroupNorm, as a whole (bias included) before LayerNorm/RMSNorm.
- :class:`AttentionSpec` — per head, ``W_Q -> A W_Q``, ``W_K -> A^-T W_K`` and ``W_V -> B W_V``,
  ``W_O -> W_O B^-1`` with ``A, B`` in GL(d_head), plus permutation of heads: ``nn.MultiheadAttention`` (packed or
  separate projections) and the attention of ``nn.Transformer*Layer``.

**The dataflow.** Chains and norm scales are found on the straight paths of a ``torch.fx`` trace of the model
(:mod:`shockmon._dataflow`): each output read by one consumer only, which reads nothing else. So a custom block
written with attributes and functional activations (ResNet's ``relu(bn1(conv1(x)))``, nanoGPT's
``c_proj(gelu(c_fc(ln(x))))``) is found as an ``nn.Sequential`` is, and a residual sum or a weight also read outside
its module ends the path there. A module called more than once (weights shared across depth) keeps a symmetry only
if every call of it is in the same chain. A module that does not trace (control flow on a tensor
value) is searched child by child; an ``nn.Sequential`` that does not trace is walked in its order. Forward hooks are
off while it traces, so FSDP2-sharded blocks read as the unsharded model. A subclass of a ``torch.nn`` layer that
overrides ``forward`` (a LoRA Linear) is not taken for its base class.

A parameter tied to another module (an unembedding sharing the token embedding) takes part in no symmetry found:
acting on it would change the other module's function too. It gets raw observables, and a warning names it. What a
declaration covers is not also found: declarations take precedence.

Custom modules are declared with :class:`Rescaling`, :class:`AttentionHeads` and :class:`NormScale`, in Python or
YAML (see ``configs/``). Parameters may be named with a row slice, ``"blocks.0.qkv.weight[0:64]"``.

Example:
    >>> import torch.nn as nn
    >>> from shockmon import discover
    >>> report = discover(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> [g.name for g in report.chains[0].groups()]
    ['0']
    >>> report.uncovered
    []
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from shockmon import _dataflow

__all__ = [
    "AttentionHeads",
    "AttentionSpec",
    "ChainLayer",
    "NormScale",
    "NormScaleSpec",
    "ParamRef",
    "RescaleChain",
    "Rescaling",
    "SymmetryReport",
    "discover",
    "load_declarations",
]

_POS_HOMOGENEOUS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)  # not ReLU6/GELU/SiLU/Tanh: they saturate or curve, so no positive rescaling passes through them
#: elementwise activations with no rescaling symmetry: the hidden units between two layers can still be permuted
#: (their incoming rows, biases and outgoing columns together), which is the ``permute`` family
_ELEMENTWISE = (
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Mish,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Softshrink,
    nn.Hardshrink,
)
_ELEMENTWISE_FN = (
    torch.nn.functional.gelu,
    torch.nn.functional.silu,
    torch.nn.functional.tanh,
    torch.tanh,
    torch.sigmoid,
    torch.nn.functional.elu,
    torch.nn.functional.mish,
)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOLING = tuple(c for c in _POS_HOMOGENEOUS if "Pool" in c.__name__)
_SPATIAL_NORMS = (nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_ROWSLICE = re.compile(r"^(?P<name>[^\[\]]+?)(\[(?P<a>\d*):(?P<b>\d*)\])?$")

_SEARCHED = (
    "positive rescaling (Linear/Conv -> ReLU-like -> Linear/Conv along the model's dataflow, traced by torch.fx or in "
    "nn.Sequential order, and in ReLU Transformer feed-forward blocks), permutation of hidden units (the same with "
    "GELU/SiLU/Tanh/... activations), normalisation scale (weights feeding BatchNorm/GroupNorm/LayerNorm/RMSNorm), "
    "attention heads (nn.MultiheadAttention, nn.TransformerEncoderLayer/DecoderLayer)"
)


# --------------------------------------------------------------------------------------------------- references


@dataclass(frozen=True)
class ParamRef:
    """A parameter of the model, or a contiguous row slice ``[start:stop)`` of one (dimension 0)."""

    name: str
    start: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, text: str, argument: str = "param") -> ParamRef:
        """Parse ``"path.weight"`` or ``"path.weight[a:b]"``."""
        if not isinstance(text, str):
            raise TypeError(
                f"Expected argument `{argument}` to be a parameter name (str), but got {type(text).__name__}"
            )
        m = _ROWSLICE.match(text.strip())
        if m is None:
            raise ValueError(
                f"Expected argument `{argument}` to be 'module.param' or 'module.param[start:stop]', but got {text!r}"
            )
        a, b = m.group("a"), m.group("b")
        return cls(m.group("name"), int(a) if a else None, int(b) if b else None)

    def __str__(self) -> str:
        if self.start is None and self.stop is None:
            return self.name
        return f"{self.name}[{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}]"

    def get(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The referenced tensor (a view for slices)."""
        t = params[self.name]
        if self.start is None and self.stop is None:
            return t
        return t[self.start : self.stop]

    def validate(self, params: Mapping[str, torch.Tensor], argument: str) -> torch.Size:
        """Check the reference against the model; return the referenced shape."""
        if self.name not in params:
            close = [n for n in params if n.split(".")[-1] == self.name.split(".")[-1]][:5]
            hint = f"; parameters with that leaf name: {close}" if close else ""
            raise ValueError(
                f"Expected argument `{argument}` to name a parameter of the model, but got {self.name!r}{hint}"
            )
        t = params[self.name]
        if self.start is not None or self.stop is not None:
            rows = t.shape[0] if t.dim() else 0
            a = 0 if self.start is None else self.start
            b = rows if self.stop is None else self.stop
            if not (0 <= a < b <= rows):
                raise ValueError(
                    f"Expected argument `{argument}` to slice rows within [0, {rows}) of {self.name!r} "
                    f"(shape {tuple(t.shape)}), but got [{a}:{b}]"
                )
        return self.get(params).shape


def _ref(module_path: str, attr: str) -> ParamRef:
    return ParamRef(f"{module_path}.{attr}" if module_path else attr)


# --------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ChainLayer:
    """One weight layer of a rescaling chain.

    ``kind`` is ``"linear"`` (weight ``(out, in)``), ``"conv"`` (weight ``(out, in, *kernel)``) or ``"diag"``
    (the per-channel affine of a normalisation layer: weight and bias of shape ``(C,)``; its input is normalised).
    ``in_blocks`` > 1 means the layer reads a flattened ``(C, in_blocks)`` feature map: channel ``c`` owns columns
    ``c*in_blocks : (c+1)*in_blocks``.
    """

    path: str
    weight: ParamRef
    bias: ParamRef | None
    kind: Literal["linear", "conv", "diag"] = "linear"
    in_blocks: int = 1


@dataclass(frozen=True)
class RescaleGroup:
    """The hidden units at the output of ``chain.layers[index]``; ``family`` ``"rescale"`` (a positively homogeneous
    activation: each unit can be rescaled) or ``"permute"`` (GELU, Tanh, ...: the units can only be permuted)."""

    name: str
    chain: str
    index: int
    family: str = "rescale"


@dataclass(frozen=True)
class RescaleChain:
    """Layers ``L_0 ... L_m`` joined by positively homogeneous maps; the outputs of ``L_0 ... L_{m-1}`` are hidden
    units with a positive rescaling symmetry each.

    ``families``: per hidden layer, ``"rescale"`` or ``"permute"`` (empty: all ``"rescale"``). A ``"permute"`` layer
    is reached through an elementwise activation that no rescaling passes through (GELU, SiLU, Tanh, ...): its units
    have only the permutation symmetry. The same per-unit quantities are computed for every hidden layer (path masses,
    directions); being products along paths they stay invariant under the rescaling of the chain's ``"rescale"``
    layers, and they are permutation-equivariant: quotient observables of whatever group acts.

    ``end_norm`` says how the output of ``L_m`` is normalised downstream: ``"none"``, ``"row"`` (BatchNorm: each
    output channel separately, the last bias a pure gauge), ``"group"`` (GroupNorm with ``end_groups`` groups) or
    ``"tensor"`` (LayerNorm/RMSNorm: one scale for the whole output, bias included). It makes the path mass invariant
    under that extra scale symmetry too.
    """

    name: str
    layers: tuple[ChainLayer, ...]
    end_norm: Literal["none", "row", "group", "tensor"] = "none"
    end_groups: int = 1
    declared: bool = False
    families: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """``"rescale"`` when every hidden layer has the rescaling symmetry, else ``"permute"`` (chain-level values
        such as the path norm are then quotients of the permutations and the remaining rescalings)."""
        return "permute" if "permute" in self.families else "rescale"

    def groups(self) -> list[RescaleGroup]:
        """One group per hidden layer, named after the layer whose outputs the units are."""
        fams = self.families or ("rescale",) * (len(self.layers) - 1)
        return [RescaleGroup(lay.path, self.name, k, fams[k]) for k, lay in enumerate(self.layers[:-1])]


@dataclass(frozen=True)
class NormScaleSpec:
    """A weight (and bias) read only through a normalisation: ``w -> c w`` leaves the function unchanged.

    ``per`` is ``"row"`` (one scale per output row/channel; the bias is a gauge and not included), ``"group"``
    (``groups`` contiguous row groups, bias included) or ``"tensor"`` (one scale, bias included).
    """

    name: str
    weight: ParamRef
    bias: ParamRef | None
    per: Literal["row", "group", "tensor"] = "tensor"
    groups: int = 1
    norm: str = ""
    declared: bool = False


@dataclass(frozen=True)
class AttentionSpec:
    """Multi-head attention with per-head GL(d_head) symmetries and head permutation.

    ``q``, ``k``, ``v`` reference ``(num_heads * d_head, d_in)`` blocks in Linear layout (head ``h`` owns rows
    ``h*d_head:(h+1)*d_head``); ``o`` references the output projection ``(d_out, num_heads * d_head)`` (head ``h``
    owns columns). ``q_bias``/``v_bias`` enter the invariants (they transform with ``A``/``B``); the key bias is a
    pure gauge (softmax ignores it) and is left out.
    """

    name: str
    q: ParamRef
    k: ParamRef
    v: ParamRef
    o: ParamRef
    num_heads: int
    q_bias: ParamRef | None = None
    k_bias: ParamRef | None = None
    v_bias: ParamRef | None = None
    declared: bool = False


# --------------------------------------------------------------------------------------------------- declarations


def _check_name(value: Any, argument: str, optional: bool = False) -> ParamRef | None:
    if value is None and optional:
        return None
    return ParamRef.parse(value, argument)


@dataclass(frozen=True)
class Rescaling:
    """Declare a positive-rescaling symmetry between two layers joined by a ReLU-like map.

    Args:
        inp: the incoming weight, ``(hidden, in)`` (Linear layout), optionally a row slice ``"fc.weight[0:64]"``.
        out: the outgoing weight, ``(out, hidden)``: hidden unit ``i`` owns column ``i``.
        inp_bias: the incoming bias, if any.
        name: the group's name in keys (default: ``inp``'s module path).

    Example:
        >>> Rescaling(inp="mlp.fc.weight", out="mlp.proj.weight", inp_bias="mlp.fc.bias").name
        'mlp.fc'
    """

    inp: str
    out: str
    inp_bias: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.inp, "inp")
        _check_name(self.out, "out")
        _check_name(self.inp_bias, "inp_bias", optional=True)
        if self.name is None:
            object.__setattr__(self, "name", ParamRef.parse(self.inp).name.rsplit(".", 1)[0])

    def to_spec(self, params: Mapping[str, torch.Tensor]) -> RescaleChain:
        inp, out = ParamRef.parse(self.inp, "inp"), ParamRef.parse(self.out, "out")
        bias = ParamRef.parse(self.inp_bias, "inp_bias") if self.inp_bias else None
        si = inp.validate(params, "inp")
        so = out.validate(params, "out")
        if len(si) != 2 or len(so) != 2:
            raise ValueError(
                f"Expected arguments `inp` and `out` of Rescaling to be 2-D (Linear layout), but got shapes "
                f"{tuple(si)} "
                f"and {tuple(so)}"
            )
        if so[1] != si[0]:
            raise ValueError(
                f"Expected `out` ({out}) to have one column per hidden unit of `inp` ({inp}: {si[0]} units), "
                f"but got {so[1]} columns"
            )
        if bias is not None:
            sb = bias.validate(params, "inp_bias")
            if tuple(sb) != (si[0],):
                raise ValueError(f"Expected `inp_bias` ({bias}) to have shape ({si[0]},), but got {tuple(sb)}")
        name = str(self.name)
        return RescaleChain(
            name,
            (ChainLayer(name, inp, bias, "linear"), ChainLayer(name + ":out", out, None, "linear")),
            declared=True,
        )


@dataclass(frozen=True)
class AttentionHeads:
    """Declare multi-head attention whose projections discovery cannot see (e.g. fused QKV).

    Args:
        q, k, v: query/key/value weights in Linear layout ``(num_heads*d_head, d_in)``, each a parameter or a row slice
            of one (``"attn.qkv.weight[0:256]"``).
        o: the output projection weight ``(d_out, num_heads*d_head)``.
        num_heads: number of heads; must divide the width of ``q``, ``k``, ``v``.
        q_bias, k_bias, v_bias: the biases, if any (``k_bias`` is a gauge and is not used in invariants).
        name: the group's name in keys (default: ``q``'s module path).

    Example:
        >>> AttentionHeads(q="attn.qkv.weight[0:64]", k="attn.qkv.weight[64:128]", v="attn.qkv.weight[128:192]",
        ...                o="attn.proj.weight", num_heads=4).name
        'attn.qkv'
    """

    q: str
    k: str
    v: str
    o: str
    num_heads: int
    q_bias: str | None = None
    k_bias: str | None = None
    v_bias: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        for arg in ("q", "k", "v", "o"):
            _check_name(getattr(self, arg), arg)
        for arg in ("q_bias", "k_bias", "v_bias"):
            _check_name(getattr(self, arg), arg, optional=True)
        if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"Expected argument `num_heads` to be a positive integer, but got {self.num_heads!r}")
        if self.name is None:
            object.__setattr__(self, "name", ParamRef.parse(self.q).name.rsplit(".", 1)[0])

    def to_spec(self, params: Mapping[str, torch.Tensor]) -> AttentionSpec:
        refs = {a: ParamRef.parse(getattr(self, a), a) for a in ("q", "k", "v", "o")}
        shapes = {a: r.validate(params, a) for a, r in refs.items()}
        for a, s in shapes.items():
            if len(s) != 2:
                raise ValueError(f"Expected argument `{a}` ({refs[a]}) to be 2-D, but got shape {tuple(s)}")
        width = shapes["q"][0]
        for a in ("k", "v"):
            if shapes[a][0] != width:
                raise ValueError(f"Expected `{a}` ({refs[a]}) to have {width} rows like `q`, but got {shapes[a][0]}")
        if shapes["q"][1] != shapes["k"][1]:
            raise ValueError(
                f"Expected `q` and `k` to read the same input width, but got {shapes['q'][1]} and {shapes['k'][1]}"
            )
        if shapes["o"][1] != width:
            raise ValueError(
                f"Expected `o` ({refs['o']}) to have {width} columns (num_heads*d_head), but got {shapes['o'][1]}"
            )
        if width % self.num_heads:
            raise ValueError(
                f"Expected argument `num_heads` to divide the attention width {width}, but got "
                f"num_heads={self.num_heads}"
            )
        biases: dict[str, ParamRef | None] = {}
        for a in ("q_bias", "k_bias", "v_bias"):
            value = getattr(self, a)
            if value is None:
                biases[a] = None
                continue
            r = ParamRef.parse(value, a)
            s = r.validate(params, a)
            if tuple(s) != (width,):
                raise ValueError(f"Expected `{a}` ({r}) to have shape ({width},), but got {tuple(s)}")
            biases[a] = r
        return AttentionSpec(
            str(self.name), refs["q"], refs["k"], refs["v"], refs["o"], self.num_heads, declared=True, **biases
        )


@dataclass(frozen=True)
class NormScale:
    """Declare a weight that is read only through a normalisation (``w -> c w`` is a symmetry).

    Args:
        weight: the weight (or a row slice of it).
        bias: its bias, if any (ignored when ``per="row"``, where the normalisation makes it a gauge).
        per: ``"tensor"`` (one scale, like LayerNorm), ``"row"`` (one per output row, like BatchNorm) or ``"group"``.
        groups: number of row groups for ``per="group"``.
        name: the group's name in keys (default: the weight's module path).
    """

    weight: str
    bias: str | None = None
    per: str = "tensor"
    groups: int = 1
    name: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.weight, "weight")
        _check_name(self.bias, "bias", optional=True)
        if self.per not in ("tensor", "row", "group"):
            raise ValueError(f"Expected argument `per` to be one of 'tensor', 'row', 'group', but got {self.per!r}")
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"Expected argument `groups` to be a positive integer, but got {self.groups!r}")
        if self.name is None:
            object.__setattr__(self, "name", ParamRef.parse(self.weight).name.rsplit(".", 1)[0])

    def to_spec(self, params: Mapping[str, torch.Tensor]) -> NormScaleSpec:
        w = ParamRef.parse(self.weight, "weight")
        s = w.validate(params, "weight")
        if len(s) < 1:
            raise ValueError(f"Expected argument `weight` ({w}) to have at least one dimension, but got a scalar")
        b = ParamRef.parse(self.bias, "bias") if self.bias else None
        if b is not None:
            sb = b.validate(params, "bias")
            if tuple(sb) != (s[0],):
                raise ValueError(f"Expected `bias` ({b}) to have shape ({s[0]},), but got {tuple(sb)}")
        if self.per == "group" and s[0] % self.groups:
            raise ValueError(f"Expected argument `groups` to divide the {s[0]} rows of {w}, but got {self.groups}")
        return NormScaleSpec(str(self.name), w, b, self.per, self.groups, "declared", declared=True)  # type: ignore[arg-type]


Declaration = Rescaling | AttentionHeads | NormScale
_DECL_TYPES: dict[str, type] = {"rescaling": Rescaling, "attention_heads": AttentionHeads, "norm_scale": NormScale}


def load_declarations(source: str | Path | Sequence[Mapping[str, Any]]) -> list[Declaration]:
    """Read declarations from a YAML file (or an already-parsed list of dicts).

    Each entry is a mapping with ``type`` one of ``rescaling``, ``attention_heads``, ``norm_scale`` and the keyword
    arguments of :class:`Rescaling`, :class:`AttentionHeads` or :class:`NormScale`.

    Example:
        >>> load_declarations([{"type": "rescaling", "inp": "fc.weight", "out": "proj.weight"}])[0].name
        'fc'
    """
    if isinstance(source, (str, Path)):
        import yaml

        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"Expected argument `source` to be a YAML file of declarations, but {str(path)!r} does not exist"
            )
        data = yaml.safe_load(path.read_text())
        if isinstance(data, Mapping):
            data = data.get("symmetries", data.get("declarations"))
    else:
        data = source
    if not isinstance(data, (list, tuple)):
        raise ValueError(
            "Expected declarations to be a list of mappings (or a mapping with a `symmetries` list), "
            f"but got {type(data).__name__}"
        )
    out: list[Declaration] = []
    for i, entry in enumerate(data):
        if not isinstance(entry, Mapping) or "type" not in entry:
            raise ValueError(f"Expected declaration {i} to be a mapping with a `type` key, but got {entry!r}")
        kind = entry["type"]
        if kind not in _DECL_TYPES:
            raise ValueError(f"Expected declaration {i} `type` to be one of {sorted(_DECL_TYPES)}, but got {kind!r}")
        kwargs = {k: v for k, v in entry.items() if k != "type"}
        try:
            out.append(_DECL_TYPES[kind](**kwargs))
        except TypeError as err:
            raise ValueError(f"Declaration {i} ({kind}): {err}") from None
    return out


# --------------------------------------------------------------------------------------------------- the report


@dataclass
class SymmetryReport:
    """What :func:`discover` found. ``str(report)`` is a readable table.

    Attributes:
        chains: chains of layers joined by elementwise activations; their hidden layers are the groups, with a
            positive rescaling symmetry each (``rescale``) or only the permutation one (``permute``).
        norm_scales: weights read through a normalisation.
        attentions: multi-head attention blocks.
        parameters: names of all trainable parameters, in model order.
        covered: parameter name -> the families that cover it.
        warnings: the messages emitted: parameters tied between modules and modules with a parametrization, left
            raw; nothing found.
    """

    chains: list[RescaleChain] = field(default_factory=list)
    norm_scales: list[NormScaleSpec] = field(default_factory=list)
    attentions: list[AttentionSpec] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    covered: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    model_name: str = ""

    @property
    def uncovered(self) -> list[str]:
        """Trainable parameters that no symmetry covers (they get raw observables only)."""
        return [p for p in self.parameters if p not in self.covered]

    @property
    def is_empty(self) -> bool:
        """True when no symmetry was found."""
        return not (self.chains or self.norm_scales or self.attentions)

    def rescale_groups(self) -> list[RescaleGroup]:
        return [g for c in self.chains for g in c.groups()]

    def rows(self) -> list[tuple[str, str, str, str]]:
        """Table rows: (family, group, units, parameters)."""
        rows: list[tuple[str, str, str, str]] = []
        for c in self.chains:
            for g in c.groups():
                lay, nxt = c.layers[g.index], c.layers[g.index + 1]
                src = "declared" if c.declared else "found"
                rows.append((g.family, g.name, src, f"{lay.weight} -> {nxt.weight}"))
        for a in self.attentions:
            src = "declared" if a.declared else "found"
            rows.append(("attention", a.name, f"{a.num_heads} heads, {src}", f"q={a.q} k={a.k} v={a.v} o={a.o}"))
        for n in self.norm_scales:
            rows.append(("normscale", n.name, f"per {n.per} ({n.norm})", str(n.weight)))
        return rows

    def __str__(self) -> str:
        head = ("family", "group", "what", "parameters")
        rows = self.rows()
        widths = [max([len(head[i])] + [len(r[i]) for r in rows]) for i in range(4)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [
            f"shockmon symmetry summary: {self.model_name}",
            fmt.format(*head),
            fmt.format(*("-" * w for w in widths)),
        ]
        lines += [fmt.format(*r) for r in rows]
        if not rows:
            lines.append("(no symmetry found; searched for " + _SEARCHED + ")")
        unc = self.uncovered
        n_cov = len(self.parameters) - len(unc)
        lines.append(
            f"{n_cov} of {len(self.parameters)} parameters covered by a symmetry; raw only: "
            + (", ".join(unc[:12]) + (f", ... (+{len(unc) - 12})" if len(unc) > 12 else "") if unc else "none")
        )
        return "\n".join(lines)

    def _cover(self, ref: ParamRef | None, family: str) -> None:
        if ref is not None and family not in self.covered.setdefault(ref.name, []):
            self.covered[ref.name].append(family)


# --------------------------------------------------------------------------------------------------- discovery


def _is_pos_homogeneous(m: nn.Module) -> bool:
    if isinstance(m, nn.PReLU):
        return m.num_parameters == 1
    return isinstance(m, _POS_HOMOGENEOUS) or isinstance(m, nn.Flatten)


def _is_layer(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, _CONV) and m.groups == 1 and getattr(m, "padding_mode", "zeros") == "zeros"


def _leaves(prefix: str, seq: nn.Sequential) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, child in seq.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            out.extend(_leaves(path, child))
        else:
            out.append((path, child))
    return out


class _ChainBuilder:
    """Walks the leaves of one (flattened) nn.Sequential and emits chains and norm-scale specs."""

    def __init__(
        self, report: SymmetryReport, tied: Mapping[str, list[str]] | None = None, reserved: set[str] | None = None
    ) -> None:
        self.report = report
        self.tied = tied or {}  # parameter name -> the names it also has in other modules
        self.reserved = reserved or set()  # parameters a declaration acts on: what is declared is not also found
        self.dropped: list[str] = []  # tied parameters a layer or a norm's affine was left out of chains for
        self.parametrized: list[str] = []  # modules left out because a parametrization computes their weights
        self.layers: list[ChainLayer] = []
        self.last_channels = 0  # output channels of the last layer
        # whether the units of the last layer sit in dimension 1 before spatial ones (conv, BatchNorm2d, ...): pooling
        # then runs over space; after a Linear (units in the last dimension) it would pool across units
        self.spatial = False
        self.flattened = False
        self.open = False  # only elementwise maps since the last layer
        self.links: list[str] = []  # the family of each hidden layer so far
        self.link = "rescale"  # since the last layer: "permute" once a non-homogeneous activation was seen

    def close(self, end_norm: str = "none", end_groups: int = 1) -> None:
        if len(self.layers) >= 2:
            links = tuple(self.links) if "permute" in self.links else ()
            chain = RescaleChain(
                self.layers[0].path, tuple(self.layers), end_norm, end_groups, families=links  # type: ignore[arg-type]
            )
            self.report.chains.append(chain)
            for k, lay in enumerate(self.layers):  # a layer's families: of the units it reads and of those it feeds
                for fam in dict.fromkeys(self.links[max(k - 1, 0) : k + 1]):
                    self.report._cover(lay.weight, fam)
                    self.report._cover(lay.bias, fam)
        self.layers, self.open, self.flattened = [], False, False
        self.links, self.link = [], "rescale"

    def _shared(self, path: str, m: nn.Module) -> bool:
        """Whether ``m``'s weight or bias is also a parameter of another module (tied): a rescaling or a norm scale
        acting on it would change that module's function too, so ``m`` takes no part in a symmetry."""
        names = [_ref(path, a).name for a in ("weight", "bias") if isinstance(getattr(m, a, None), nn.Parameter)]
        return _left_out(names, self.tied, self.reserved, self.dropped)

    def layer(self, path: str, m: nn.Module) -> None:
        if self._shared(path, m):  # a tied layer ends the chain before it and starts none
            self.close()
            return
        kind = "conv" if isinstance(m, _CONV) else "linear"
        in_blocks = 1
        if self.open and self.layers:
            prev = self.layers[-1]
            ok = True
            if kind == "linear" and prev.kind == "conv":
                # a conv channel maps to a block of columns after Flatten (pooling keeps channels)
                ok = self.flattened and m.in_features % self.last_channels == 0
                in_blocks = m.in_features // self.last_channels if ok else 1
            elif kind == "conv" and prev.kind == "linear":
                ok = False
            elif kind == "linear" and prev.kind in ("linear", "diag"):
                ok = m.in_features == self.last_channels
            elif kind == "conv":
                ok = m.in_channels == self.last_channels
            if not ok:
                self.close()
            else:
                self.links.append(self.link)
        else:
            self.close()
        bias = _ref(path, "bias") if getattr(m, "bias", None) is not None else None
        self.layers.append(ChainLayer(path, _ref(path, "weight"), bias, kind, in_blocks))  # type: ignore[arg-type]
        self.last_channels = m.out_channels if kind == "conv" else m.out_features
        self.spatial = kind == "conv"
        self.open, self.flattened = True, False
        self.link = "rescale"

    def norm(self, path: str, m: nn.Module) -> None:
        per, groups, n_features = self._norm_kind(m)
        # only positively homogeneous maps may stand between the layer and the norm: a scale does not pass a GELU
        through = self.link == "rescale"
        if self.open and self.layers and per is not None and n_features == self.last_channels and through:
            last = self.layers[-1]
            if last.kind != "diag" and not (per == "tensor" and last.kind == "conv"):
                spec = NormScaleSpec(
                    last.path,
                    last.weight,
                    None if per == "row" else last.bias,
                    per,  # type: ignore[arg-type]
                    groups,
                    (_dataflow.torch_class(m) or type(m)).__name__,  # FSDP wraps BatchNorm2d as FSDPBatchNorm2d
                )
                self.report.norm_scales.append(spec)
                self.report._cover(spec.weight, "normscale")
                if per == "row":
                    self.report._cover(last.bias, "normscale (gauge)")
                else:
                    self.report._cover(spec.bias, "normscale")
                self.close(per, groups)
            else:
                self.close()
        else:
            self.close()
        # the norm's own per-channel affine starts a new chain
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1 and n_features and not self._shared(path, m):
            b = getattr(m, "bias", None)
            bias = _ref(path, "bias") if isinstance(b, torch.Tensor) else None
            self.layers = [ChainLayer(path, _ref(path, "weight"), bias, "diag")]
            self.last_channels = w.shape[0]
            # BatchNorm1d and GroupNorm may read (N, C) as well as (N, C, L): only the 2-D and 3-D norms are
            # surely spatial
            self.spatial = isinstance(m, _SPATIAL_NORMS)
            self.open, self.flattened = True, False
            self.links, self.link = [], "rescale"

    @staticmethod
    def _norm_kind(m: nn.Module) -> tuple[str | None, int, int]:
        if isinstance(m, _BATCHNORM):
            return "row", 1, m.num_features
        if isinstance(m, nn.GroupNorm):
            return "group", m.num_groups, m.num_channels
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            shape = tuple(m.normalized_shape)
            return ("tensor", 1, shape[0]) if len(shape) == 1 else (None, 1, 0)
        return None, 1, 0

    def walk(self, leaves: Iterable[tuple[str, nn.Module]]) -> None:
        for path, m in leaves:
            if parametrize.is_parametrized(m):  # weight_norm, spectral_norm, ...: `weight` is not a parameter
                self.parametrized.append(path)
                self.close()
            elif not _dataflow.plain(m):  # not a torch.nn module, or one whose forward is overridden
                self.close()
            elif _is_layer(m):
                self.layer(path, m)
            elif isinstance(m, (*_BATCHNORM, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)):
                self.norm(path, m)
            elif isinstance(m, _POOLING) and self.open and not self.spatial:
                self.close()  # pooling over the last dimension mixes a Linear's units (max over neighbours)
            elif _is_pos_homogeneous(m):
                if isinstance(m, nn.Flatten):
                    self.flattened = True
            elif isinstance(m, _ELEMENTWISE) and self.open:
                self.link = "permute"
            else:
                self.close()
        self.close()


def _mha_spec(path: str, m: nn.MultiheadAttention) -> AttentionSpec:
    e = m.embed_dim
    if m.in_proj_weight is not None:
        w = _ref(path, "in_proj_weight")
        q, k, v = (ParamRef(w.name, i * e, (i + 1) * e) for i in range(3))
    else:
        q, k, v = _ref(path, "q_proj_weight"), _ref(path, "k_proj_weight"), _ref(path, "v_proj_weight")
    qb = kb = vb = None
    if m.in_proj_bias is not None:
        b = _ref(path, "in_proj_bias")
        qb, kb, vb = (ParamRef(b.name, i * e, (i + 1) * e) for i in range(3))
    # a root-level attention module gets the name "model" (keys never contain an empty path segment)
    return AttentionSpec(path or "model", q, k, v, _ref(path, "out_proj.weight"), m.num_heads, qb, kb, vb)


def _ffn_family(layer: nn.Module) -> str | None:
    """The family of a Transformer layer's feed-forward hidden units: ``"rescale"`` (ReLU-like activation),
    ``"permute"`` (another elementwise one: GELU, SiLU, ...), ``None`` (an activation not known to be elementwise)."""
    act = getattr(layer, "activation", None)
    if act is torch.nn.functional.relu or (isinstance(act, nn.Module) and _is_pos_homogeneous(act)):
        return "rescale"
    if isinstance(act, _ELEMENTWISE) or any(act is f for f in _ELEMENTWISE_FN):
        return "permute"
    return None


def discover(model: nn.Module, extra: Sequence[Declaration] | str | Path | None = None) -> SymmetryReport:
    """Find the symmetry groups of ``model``.

    Args:
        model: the network.
        extra: explicit declarations (:class:`Rescaling`, :class:`AttentionHeads`, :class:`NormScale`), or a path to a
            YAML file of them, for what discovery cannot see: fused QKV attention heads, blocks in a forward that
            does not trace. They take precedence over what is found on the same parameters.

    Returns:
        A :class:`SymmetryReport`. When nothing is found, one warning says what was searched for; the model still gets
        raw observables.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or a declaration has the wrong type.
        ValueError: the model has no parameters, or a declaration names a missing parameter or has inconsistent
            shapes (e.g. ``num_heads`` not dividing the width).

    Example:
        >>> import torch.nn as nn
        >>> report = discover(nn.TransformerEncoderLayer(16, 4, 32))
        >>> sorted({row[0] for row in report.rows()})
        ['attention', 'rescale']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected argument `model` to be a torch.nn.Module, but got {type(model).__name__}")
    named = dict(model.named_parameters())
    if not named:
        raise ValueError(
            f"Expected argument `model` to have at least one parameter, but {type(model).__name__} has none"
        )
    report = SymmetryReport(model_name=type(model).__name__)
    report.parameters = [n for n, p in named.items() if p.requires_grad]
    tied = _tied(model)
    dropped: list[str] = []
    parametrized: list[str] = []

    def shared(refs: Iterable[ParamRef | None]) -> bool:
        return _left_out([r.name for r in refs if r is not None], tied, reserved, dropped)

    # explicit declarations: parsed first, they take precedence over what discovery finds on the same parameters
    declared: list[RescaleChain | AttentionSpec | NormScaleSpec] = []
    if extra is not None:
        if not isinstance(extra, (str, Path, Sequence)):
            raise TypeError(
                "Expected argument `extra` to be a list of declarations, a YAML path or None, but got "
                f"{type(extra).__name__}"
            )
        decls = load_declarations(extra) if isinstance(extra, (str, Path)) else list(extra)
        for i, d in enumerate(decls):
            if not isinstance(d, (Rescaling, AttentionHeads, NormScale)):
                raise TypeError(
                    f"Expected argument `extra[{i}]` to be a Rescaling, AttentionHeads or NormScale declaration, "
                    f"but got {type(d).__name__}"
                )
            declared.append(d.to_spec(named))
    reserved = {r.name for spec in declared for r in _spec_refs(spec)}

    # Transformer layers and attention
    for path, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            if parametrize.is_parametrized(m) or parametrize.is_parametrized(m.out_proj):
                parametrized.append(path or "model")
                continue
            spec = _mha_spec(path, m)
            if shared((spec.q, spec.k, spec.v, spec.o, spec.q_bias, spec.k_bias, spec.v_bias)):
                continue
            report.attentions.append(spec)
            for ref in (spec.q, spec.k, spec.v, spec.o, spec.q_bias, spec.v_bias):
                report._cover(ref, "attention")
            report._cover(spec.k_bias, "attention (gauge)")
        ffn = _ffn_family(m) if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) else None
        if ffn is not None:
            p1, p2 = f"{path}.linear1" if path else "linear1", f"{path}.linear2" if path else "linear2"
            l1 = ChainLayer(p1, _ref(p1, "weight"), _ref(p1, "bias") if m.linear1.bias is not None else None)
            l2 = ChainLayer(p2, _ref(p2, "weight"), _ref(p2, "bias") if m.linear2.bias is not None else None)
            if parametrize.is_parametrized(m.linear1) or parametrize.is_parametrized(m.linear2):
                parametrized.append(p1)
                continue
            if shared((l1.weight, l1.bias, l2.weight, l2.bias)):
                continue
            report.chains.append(RescaleChain(p1, (l1, l2), families=(ffn,) if ffn == "permute" else ()))
            for ref in (l1.weight, l1.bias, l2.weight):
                report._cover(ref, ffn)

    # chains and norm scales along the dataflow: straight paths of a torch.fx trace; a module that does not trace
    # is split into its children, and an nn.Sequential among them that does not trace either is walked in its order
    def walk(leaves: Iterable[tuple[str, nn.Module]], into: SymmetryReport = report) -> None:
        builder = _ChainBuilder(into, tied, reserved)
        builder.walk(leaves)
        if into is report:
            dropped.extend(builder.dropped)
            parametrized.extend(builder.parametrized)

    def walk_paths(paths: list[_dataflow.Leaves]) -> None:
        """The paths of one trace. A module called more than once (weights shared across depth) keeps a symmetry
        only if every one of its calls is in the same chain (or norm scale): found once per call, identical."""
        calls = Counter(p for leaves in paths for p, m in leaves if not isinstance(m, _dataflow.Opaque))
        bad: set[str] = set()

        def walk_all(into: SymmetryReport) -> None:
            for leaves in paths:
                walk([(p, _dataflow.OPAQUE if p in bad else m) for p, m in leaves], into)

        while True:  # each round can only shorten chains: it ends
            trial = SymmetryReport()
            walk_all(trial)
            found = Counter([*trial.chains, *trial.norm_scales])
            wrong = {p for spec, n in found.items() for p in _spec_layers(spec) if calls[p] != n} - bad
            if not wrong:
                break
            bad |= wrong
        before = (len(report.chains), len(report.norm_scales))
        walk_all(report)
        # the same spec found at each call of a shared module: kept once
        report.chains[before[0] :] = list(dict.fromkeys(report.chains[before[0] :]))
        report.norm_scales[before[1] :] = list(dict.fromkeys(report.norm_scales[before[1] :]))

    def visit(module: nn.Module, path: str) -> None:
        paths = _dataflow.straight_paths(module, path)
        if paths is not None:
            walk_paths(paths)
            return
        if isinstance(module, nn.Sequential):
            children = _leaves(path, module)
            walk(children)
        else:
            children = [(f"{path}.{n}" if path else n, m) for n, m in module.named_children()]
        for p, m in children:
            if not _dataflow.is_leaf(m):
                visit(m, p)

    visit(model, "")

    for spec in declared:
        if isinstance(spec, RescaleChain):
            report.chains.append(spec)
            for lay in spec.layers:
                report._cover(lay.weight, "rescale")
                report._cover(lay.bias, "rescale")
        elif isinstance(spec, AttentionSpec):
            report.attentions.append(spec)
            for ref in (spec.q, spec.k, spec.v, spec.o, spec.q_bias, spec.v_bias):
                report._cover(ref, "attention")
            report._cover(spec.k_bias, "attention (gauge)")
        else:
            report.norm_scales.append(spec)
            report._cover(spec.weight, "normscale")
            report._cover(spec.bias, "normscale")

    _check_unique(report)
    if dropped:
        pairs = ", ".join(f"{n} (also {', '.join(tied[n])})" for n in dict.fromkeys(dropped))
        msg = (
            f"shockmon: parameters shared between modules get raw observables only: {pairs}. A symmetry of one "
            "module acting on a tied parameter would change the other's function; if it holds for both, declare it "
            "with shockmon.discover(model, extra=[...])."
        )
        report.warnings.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    if parametrized:
        msg = (
            "shockmon: modules with a parametrization (weight_norm, spectral_norm, ...) get raw observables only: "
            f"{', '.join(parametrized)}. Their weight is computed from other parameters, on which a rescaling or a "
            "norm scale acts differently."
        )
        report.warnings.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    if report.is_empty:
        msg = (
            f"shockmon: no symmetry found in {report.model_name}: searched for {_SEARCHED}. Only raw observables will "
            "be computed; declare custom symmetries with shockmon.discover(model, extra=[...])."
        )
        report.warnings.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    return report


def _left_out(names: Iterable[str], tied: Mapping[str, list[str]], reserved: set[str], dropped: list[str]) -> bool:
    """Whether a found spec on these parameters must be left out: one is tied to another module (recorded in
    ``dropped``, for the warning), or a declaration acts on it."""
    names = list(names)
    hit = [n for n in names if n in tied]
    dropped.extend(hit)
    return bool(hit) or any(n in reserved for n in names)


def _spec_layers(spec: RescaleChain | NormScaleSpec) -> list[str]:
    """The module paths of the layers a found spec acts on."""
    return [lay.path for lay in spec.layers] if isinstance(spec, RescaleChain) else [spec.name]


def _spec_refs(spec: RescaleChain | AttentionSpec | NormScaleSpec) -> list[ParamRef]:
    """Every parameter reference of a spec."""
    if isinstance(spec, RescaleChain):
        refs = [r for lay in spec.layers for r in (lay.weight, lay.bias)]
    elif isinstance(spec, AttentionSpec):
        refs = [spec.q, spec.k, spec.v, spec.o, spec.q_bias, spec.k_bias, spec.v_bias]
    else:
        refs = [spec.weight, spec.bias]
    return [r for r in refs if r is not None]


def _tied(model: nn.Module) -> dict[str, list[str]]:
    """Parameters held by more than one module (weight tying), by each of their names -> their other names.

    A module used twice (the same object at two paths) shares its parameters with itself: that is not a tie, and
    its names are not listed.
    """
    owners: dict[int, set[int]] = {}
    names: dict[int, list[str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(mod))
                names.setdefault(id(p), []).append(f"{path}.{attr}" if path else attr)
    out: dict[str, list[str]] = {}
    for pid, ns in names.items():
        if len(owners[pid]) > 1:
            for n in ns:
                out[n] = [o for o in ns if o != n]
    return out


def _check_unique(report: SymmetryReport) -> None:
    names: dict[str, str] = {}
    for fam, items in (
        ("rescale", [g.name for g in report.rescale_groups()]),  # rescale and permute: one name space (units)
        ("attention", [a.name for a in report.attentions]),
        ("normscale", [n.name for n in report.norm_scales]),
    ):
        for n in items:
            key = f"{fam}/{n}"
            if key in names:
                raise ValueError(f"Two {fam} symmetry groups are both named {n!r}: give declarations distinct `name`s")
            names[key] = fam
