"""Straight dataflow paths of a model, read from a ``torch.fx`` trace, for symmetry discovery.

A rescaling passes from one layer to the next only along a path that nothing else reads or writes: each step's
output goes to one consumer, which reads nothing else (reading its shape, ``x.size()``, does not count).
:func:`straight_paths` traces a module symbolically (no tensor is computed; forward hooks are off while it does)
and returns those paths as ``(module path, module)`` sequences, the form the chain
builder of :mod:`shockmon.symmetry` walks for an ``nn.Sequential``: a Linear's output that also feeds a residual
sum, or a weight read outside its module, ends a path there (a module called more than once is on one path per
call: :func:`shockmon.symmetry.discover` keeps its symmetry only if all its calls agree). Functional activations
(``F.relu``, ``x.relu()``, ``torch.flatten(x, 1)``, ...) are stood in for by their module form.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Leaves = list[tuple[str, nn.Module]]


class Opaque(nn.Module):
    """Stands for a node no symmetry passes: the chain builder closes its chain there."""


OPAQUE = Opaque()

# functions and tensor methods with a module form the chain builder knows (their other arguments are constants)
_FUNCTIONS: dict[Any, type[nn.Module]] = {
    F.relu: nn.ReLU,
    torch.relu: nn.ReLU,
    F.relu_: nn.ReLU,
    F.leaky_relu: nn.LeakyReLU,
    F.dropout: nn.Dropout,
    F.gelu: nn.GELU,
    F.silu: nn.SiLU,
    F.tanh: nn.Tanh,
    torch.tanh: nn.Tanh,
    F.sigmoid: nn.Sigmoid,
    torch.sigmoid: nn.Sigmoid,
    F.elu: nn.ELU,
    F.softplus: nn.Softplus,
    F.mish: nn.Mish,
}
_METHODS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu_": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


class _Tracer(torch.fx.Tracer):
    """``torch.fx``'s tracer, with every module of a ``torch.nn`` class a leaf (also a wrapped subclass: FSDP's
    ``FSDPLinear`` is a Linear whose class lives elsewhere)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.Sequential):
            return False
        return torch_class(m) is not None or super().is_leaf_module(m, module_qualified_name)


def torch_class(m: nn.Module) -> type | None:
    """The first ``torch.nn`` class (other than ``nn.Module``) that ``m``'s class derives from, or ``None``."""
    for c in type(m).__mro__:
        if c is nn.Module:
            return None
        if c.__module__.startswith("torch.nn."):
            return c
    return None


def plain(m: nn.Module) -> bool:
    """Whether ``m`` computes what its ``torch.nn`` class computes: a subclass that overrides ``forward`` (a LoRA
    Linear adding a low-rank path) does something else, which no symmetry of the base class covers."""
    base = torch_class(m)
    return base is not None and type(m).forward is base.forward


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def is_leaf(m: nn.Module) -> bool:
    """Whether ``m`` is one node of a trace (a ``torch.nn`` module other than a container), not searched inside."""
    return not isinstance(m, _CONTAINERS) and _LEAVES.is_leaf_module(m, "")


_LEAVES = _Tracer()  # only asked which modules are leaves: it never traces


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]:
    """Every module's attributes, with the contents of its containers: tracing runs ``forward`` in Python, and one
    that stores what it computed (a cache, a counter) would be left holding a symbolic proxy."""
    out = []
    for m in model.modules():
        attrs = dict(vars(m))
        contents = {k: copy.copy(v) for k, v in attrs.items() if isinstance(v, (list, dict, set))}
        out.append((m, attrs, contents))
    return out


def _changed(now: Any, saved: Any) -> bool:
    if isinstance(now, dict):
        return len(now) != len(saved) or any(k not in saved or saved[k] is not v for k, v in now.items())
    if isinstance(now, list):
        return len(now) != len(saved) or any(a is not b for a, b in zip(now, saved))
    return now != saved  # a set: of hashable items


def _restore(snapshot: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]) -> None:
    """Undo what tracing changed, in place: the same objects (hooks, parameter dicts, ... that others hold references
    to) stay bound, and a container is refilled only if its contents changed."""
    for m, attrs, contents in snapshot:
        d = vars(m)
        for k in [k for k in d if k not in attrs]:
            del d[k]
        for k, v in attrs.items():
            if d.get(k, OPAQUE) is not v:
                d[k] = v
            if k in contents and _changed(v, contents[k]):
                v.clear()
                v.update(contents[k]) if not isinstance(v, list) else v.extend(contents[k])


_HOOKS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


@contextlib.contextmanager
def _hooks_off(model: nn.Module) -> Iterator[None]:
    """Forward hooks (a module's and the global ones) emptied, then refilled in place: tracing runs them for every
    module it traces through, and one that acts (FSDP's pre-forward unshards, initialises its state) must not see
    symbolic values. The dicts stay the same objects, so the hooks' handles stay valid."""
    from torch.nn.modules import module as mod

    saved: list[tuple[dict[Any, Any], dict[Any, Any]]] = []
    holders = [vars(m) for m in model.modules()] + [vars(mod)]
    for d in holders:
        for name in (*_HOOKS, *(f"_global{n}" for n in _HOOKS)):
            hooks = d.get(name)
            if isinstance(hooks, dict) and hooks:
                saved.append((hooks, dict(hooks)))
                hooks.clear()
    try:
        yield
    finally:
        for hooks, items in saved:
            hooks.clear()
            hooks.update(items)


def _metadata(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads only its input's metadata (``x.size()``, ``x.dim()``, ``x.shape``, ``x.dtype``)."""
    if node.op == "call_method" and node.target in ("size", "dim", "numel"):
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1:2] in (
        ("shape",), ("dtype",), ("device",), ("ndim",)
    )


def _function_module(node: torch.fx.Node) -> nn.Module:
    """The module form of a ``call_function``/``call_method`` node, or :data:`OPAQUE`."""
    if node.op == "call_function" and node.target in _FUNCTIONS:
        return _FUNCTIONS[node.target]()
    if node.op == "call_method" and node.target in _METHODS:
        return _METHODS[node.target]()
    if node.target in (torch.flatten, "flatten"):  # a Flatten(1) only: from dimension 1 to the last
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if start == 1 and end == -1:
            return nn.Flatten()
    return OPAQUE


def straight_paths(model: nn.Module, prefix: str = "") -> list[Leaves] | None:
    """The straight paths of ``model``'s dataflow, each as ``(module path, module)`` leaves; ``None`` when the model
    does not trace (data-dependent control flow, an unsupported signature, ...): the caller then searches its
    children. Forward hooks are off while it traces (FSDP's would unshard), so a sharded model reads as the same
    model unsharded.

    ``prefix`` is ``model``'s own path in the model discovery was given (module paths are prefixed with it).

    Example:
        >>> import torch.nn as nn
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.proj = nn.Linear(4, 8), nn.Linear(8, 4)
        ...     def forward(self, x):
        ...         return x + self.proj(self.fc(x).relu())
        >>> [[p for p, _ in leaves] for leaves in straight_paths(Block()) if leaves[0][0] == "fc"]
        [['fc', '<relu>', 'proj']]
    """
    tracer = _Tracer()
    with _hooks_off(model):  # before the snapshot: _restore then leaves the emptied dicts alone
        snapshot = _snapshot(model)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                graph = tracer.trace(model)
        except Exception:  # any failure to trace: the caller falls back to nn.Sequential order
            return None
        finally:
            _restore(snapshot)
    modules = dict(model.named_modules())
    read_directly = {str(n.target).rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}

    def leaf(node: torch.fx.Node) -> tuple[str, nn.Module]:
        if node.op == "call_module":
            target = str(node.target)
            path = f"{prefix}.{target}" if prefix else target
            # a module whose weights are also read outside it takes no part in a symmetry (one called more than
            # once keeps one only if all its calls agree: the caller checks)
            module = modules.get(target)  # None: a module forward created and tracing took back
            return path, module if target not in read_directly and module is not None else OPAQUE
        return f"<{getattr(node.target, '__name__', node.target)}>", _function_module(node)

    def successor(node: torch.fx.Node) -> torch.fx.Node | None:
        users = [u for u in node.users if not _metadata(u)]  # x.size(), x.shape: no value read
        if len(users) != 1:
            return None
        user = users[0]
        return user if user.all_input_nodes == [node] else None

    nxt = {node: successor(node) for node in graph.nodes}
    has_pred = {s for s in nxt.values() if s is not None}
    paths: list[Leaves] = []
    for node in graph.nodes:
        if node in has_pred:
            continue
        leaves: Leaves = []
        cur: torch.fx.Node | None = node
        while cur is not None:
            leaves.append(leaf(cur) if cur.op in ("call_module", "call_function", "call_method") else ("", OPAQUE))
            cur = nxt[cur]
        paths.append(leaves)
    return paths
