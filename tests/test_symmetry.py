"""Symmetry discovery: what is found, what stays raw, declarations, and bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from symmetry_models import FusedBlock, RandomDataflow, act_on_report, cnn, mlp, transformer_layer
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import shockmon
from shockmon import AttentionHeads, NormScale, Rescaling, discover
from shockmon.symmetry import ParamRef, load_declarations

ROOT = Path(__file__).resolve().parents[1]


def test_discover_mlp_chain_through_nesting_and_dropout() -> None:
    r = discover(mlp())
    assert [g.name for g in r.rescale_groups()] == ["0", "2.0"]
    assert r.uncovered == []
    assert not r.warnings


def test_discover_cnn_norm_scale_and_pooled_head() -> None:
    r = discover(cnn())
    assert [g.name for g in r.rescale_groups()] == ["1", "4", "7"]
    assert [(n.name, n.per) for n in r.norm_scales] == [("0", "row"), ("3", "row")]
    flat = [c for c in r.chains if c.name == "4"][0]  # BN(4) -> ReLU -> pool -> conv(7) -> ReLU -> pool -> Linear(11)
    assert [lay.path for lay in flat.layers] == ["4", "7", "11"]
    assert flat.layers[-1].in_blocks == 4  # AdaptiveAvgPool2d(2) -> Flatten: 4 columns per channel
    assert r.covered["0.bias"] == ["normscale (gauge)"]


def test_discover_transformer_layer() -> None:
    r = discover(transformer_layer())
    assert [a.name for a in r.attentions] == ["self_attn"] and r.attentions[0].num_heads == 4
    assert [g.name for g in r.rescale_groups()] == ["linear1"]
    # layer norms and the output bias have no symmetry found here: they stay raw, and the report says so
    assert set(r.uncovered) == {
        "linear2.bias",
        "norm1.weight",
        "norm1.bias",
        "norm2.weight",
        "norm2.bias",
        "self_attn.out_proj.bias",
    }
    text = str(r)
    assert "attention" in text and "raw only: " in text and "norm1.weight" in text


def test_discover_gelu_is_permutation_not_rescaling() -> None:
    r = discover(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)))
    assert [(c.name, c.family) for c in r.chains] == [("0", "permute")] and not r.warnings
    assert [row[0] for row in r.rows()] == ["permute"] and r.covered["0.weight"] == ["permute"]
    g = discover(nn.TransformerEncoderLayer(8, 2, 16, activation="gelu"))
    assert [(c.name, c.family) for c in g.chains] == [("linear1", "permute")] and len(g.attentions) == 1
    # a ReLU link then a Tanh link: one chain (its path masses stay invariant under the ReLU units' rescaling),
    # whose hidden layers have their own family each
    m = discover(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)))
    assert [(c.name, c.families, [lay.path for lay in c.layers]) for c in m.chains] == [
        ("0", ("rescale", "permute"), ["0", "2", "4"])
    ]
    assert [(g.name, g.family) for g in m.rescale_groups()] == [("0", "rescale"), ("2", "permute")]
    assert m.covered["2.weight"] == ["rescale", "permute"] and m.covered["4.weight"] == ["permute"]
    # the reason for the family: a rescaling does not pass a GELU unit (it does a ReLU one)
    torch.manual_seed(0)
    for act, same in ((nn.GELU, False), (nn.ReLU, True)):
        net = nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 2)).double()
        x = torch.randn(8, 3, dtype=torch.float64)
        y = net(x)
        with torch.no_grad():
            net[0].weight.mul_(3.0), net[0].bias.mul_(3.0), net[2].weight.div_(3.0)
        assert torch.allclose(net(x), y) is same
    # an activation that is not elementwise (softmax mixes the units): nothing found, and the warning says what was
    # searched for
    with pytest.warns(UserWarning, match="no symmetry found"):
        e = discover(nn.Sequential(nn.Linear(3, 4), nn.Softmax(-1), nn.Linear(4, 2)))
    assert e.is_empty and len(e.warnings) == 1
    assert "searched for positive rescaling" in e.warnings[0] and "permutation of hidden units" in e.warnings[0]


def test_discover_layernorm_after_linear_is_tensor_scale() -> None:
    r = discover(
        nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))
    )
    assert [(n.name, n.per) for n in r.norm_scales] == [("2", "tensor")]
    assert [(c.name, c.end_norm) for c in r.chains] == [("0", "tensor"), ("3", "none")]


class _Residual(nn.Module):
    """``x + mlp(x)``: a block whose MLP is an nn.Sequential inside a module that is not one."""

    def __init__(self, d: int = 6, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), act(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


def _tied_pair() -> nn.Module:
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight  # the same matrix read twice, in two roles
    return nn.Sequential(a, nn.ReLU(), b)


class _TiedLM(nn.Module):
    """Token embedding tied to the last layer of a ReLU MLP (the unembedding), as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.body = nn.Sequential(
            nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 10, bias=False)
        )
        self.body[4].weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.emb(x))


class _Decoder(nn.Module):
    """A pre-norm GELU decoder layer attending to the first 3 positions of its own input (two attention blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(16, 4, 24, dropout=0.0, batch_first=True, norm_first=True)
        self.layer.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, x[:, :3])


class _BasicBlock(nn.Module):
    """ResNet's basic block, written as torchvision does: attributes and a residual sum, no nn.Sequential."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class _TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.block1, self.block2 = _BasicBlock(8), _BasicBlock(8)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(F.relu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class _GPTBlock(nn.Module):
    """Pre-norm residual MLP as nanoGPT writes it: ``x + c_proj(gelu(c_fc(ln(x))))``."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.ln, self.c_fc, self.c_proj = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c_proj(F.gelu(self.c_fc(self.ln(x))))


class _NanoGPTBlock(nn.Module):
    """nanoGPT's block: fused QKV attention reading ``x.size()`` of its input, then the GELU MLP; both pre-norm."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.c_attn, self.attn_proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = _GPTBlock(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        b, t, c = h.size()
        q, k, v = self.c_attn(h).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, c))
        return self.mlp(x)


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> 1x1 project -> BN, plus the
    input; then a squeeze-excitation gate ``x * sigmoid(fc2(relu(fc1(pool(x)))))``."""

    def __init__(self, c: int = 4, e: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
            nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
            nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c),
        )  # fmt: skip
        self.pool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.body(x)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))


class _SwiGLU(nn.Module):
    """LLaMA's MLP: ``w2(silu(w1(x)) * w3(x))``; its hidden units can be permuted, which is not claimed here."""

    def __init__(self, d: int = 6, h: int = 10) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Functional(nn.Module):
    """Activations as functions and tensor methods; ``read_weight`` also reads ``fc3.weight`` outside ``fc3``."""

    def __init__(self, read_weight: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2)
        self.read_weight = read_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(F.relu(self.fc1(x)), 0.0, self.training)
        out = self.fc3(self.fc2(x).relu())
        return out + self.fc3.weight.sum() if self.read_weight else out


class _LoRALinear(nn.Linear):
    """A Linear with a low-rank path added in ``forward``: rescaling its rows alone changes its output."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o)
        self.a, self.b = nn.Parameter(torch.randn(2, i)), nn.Parameter(torch.randn(o, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.a.t() @ self.b.t()


class _Branchy(nn.Module):
    """Control flow on a tensor value: it does not trace, so its children are searched one by one (also those held
    in a ModuleList)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.blocks = nn.ModuleList([_Residual(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.seq(x) if x.sum() > 0 else -self.seq(x)
        return self.blocks[0](x)


class _SharedInTwoChains(nn.Module):
    """One Linear feeding a different next layer at each of its two calls: no rescaling of its units holds for both."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.head_a, self.head_b = nn.Linear(6, 8), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_a(F.relu(self.shared(x))) + self.head_b(F.relu(self.shared(-x)))


def _reused_block() -> nn.Module:
    block = _Residual()
    return nn.Sequential(block, nn.ReLU(), block)  # one module applied twice: its symmetry holds at both uses


_ZOO = {
    # name: (model, input, the rescale/permute groups discovery must report)
    "mlp": (mlp, lambda: torch.randn(5, 6), ["0", "2.0"]),
    "cnn": (cnn, lambda: torch.randn(4, 3, 8, 8), ["1", "4", "7"]),
    "transformer-layer": (lambda: transformer_layer().eval(), lambda: torch.randn(2, 5, 16), ["linear1"]),
    "gelu-then-layernorm": (
        lambda: nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2)),
        lambda: torch.randn(5, 4),
        ["2"],
    ),
    "silu-then-batchnorm": (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 3)),
        lambda: torch.randn(4, 3, 8, 8),
        ["2"],
    ),
    "relu-then-groupnorm": (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 3)),
        lambda: torch.randn(4, 3, 8, 8),
        ["2"],
    ),
    "sequential-of-residual-blocks": (
        lambda: nn.Sequential(_Residual(), _Residual(act=nn.GELU), nn.Linear(6, 2)),
        lambda: torch.randn(5, 6),
        ["0.mlp.0", "1.mlp.0"],
    ),
    "transformer-decoder-layer": (
        lambda: _Decoder(), lambda: torch.randn(2, 5, 16), ["layer.linear1"]
    ),
    "tied-in-two-roles": (_tied_pair, lambda: torch.randn(5, 6), []),
    "tied-unembedding": (_TiedLM, lambda: torch.randint(0, 10, (7,)), ["body.0"]),
    # called twice, in the same chain each time: the block's symmetry holds at both uses
    "module-used-twice": (_reused_block, lambda: torch.randn(5, 6), ["0.mlp.0"]),
    "pooling-across-a-linears-units": (
        lambda: nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.MaxPool1d(3, 1, 1), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(),
            nn.AvgPool1d(3, 1, 1), nn.Linear(6, 2),
        ),
        lambda: torch.randn(5, 4),
        [],
    ),
    "pooling-over-space": (
        lambda: nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.MaxPool1d(3, 1, 1), nn.Conv1d(8, 2, 3)),
        lambda: torch.randn(5, 3, 9),
        ["0"],
    ),
    "resnet-blocks": (_TinyResNet, lambda: torch.randn(4, 3, 6, 6), ["block1.bn1", "block2.bn1"]),
    "nanogpt-mlp-blocks": (
        lambda: nn.Sequential(_GPTBlock(), _GPTBlock()),
        lambda: torch.randn(2, 5, 6),
        ["0.ln", "0.c_fc", "1.ln", "1.c_fc"],
    ),
    "nanogpt-blocks": (
        lambda: nn.Sequential(_NanoGPTBlock(), _NanoGPTBlock()),
        lambda: torch.randn(2, 5, 8),
        ["0.ln_1", "0.mlp.ln", "0.mlp.c_fc", "1.ln_1", "1.mlp.ln", "1.mlp.c_fc"],
    ),
    "mobilenet-block-with-squeeze-excitation": (_InvertedResidual, lambda: torch.randn(3, 4, 5, 5), ["body.4", "fc1"]),
    "swiglu-mlp": (_SwiGLU, lambda: torch.randn(5, 6), []),
    # a chain ending in a 1x1 conv: the observer multiplied by its 4-D weight and raised a RuntimeError
    "conv-chain-ending-in-a-1x1-conv": (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)), lambda: torch.randn(2, 3, 6, 6), ["0"]
    ),
    "functional-activations": (_Functional, lambda: torch.randn(5, 4), ["fc1", "fc2"]),
    "weight-read-outside-its-layer": (lambda: _Functional(read_weight=True), lambda: torch.randn(5, 4), ["fc1"]),
    "lora-linear": (
        lambda: nn.Sequential(_LoRALinear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)),
        lambda: torch.randn(5, 4),
        ["2"],
    ),
    "untraceable-forward": (_Branchy, lambda: torch.randn(5, 4), ["seq.0", "blocks.0.mlp.0"]),
    "module-shared-by-two-chains": (_SharedInTwoChains, lambda: torch.randn(5, 6), []),
    "module-twice-in-one-chain": (
        lambda: (lambda lin: nn.Sequential(lin, nn.ReLU(), lin))(nn.Linear(6, 6)), lambda: torch.randn(5, 6), []
    ),
    "weight-norm-layer": (
        lambda: nn.Sequential(
            nn.Linear(4, 6), nn.ReLU(), weight_norm(nn.Linear(6, 6)), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(),
            nn.Linear(5, 2),
        ),
        lambda: torch.randn(5, 4),
        ["4"],
    ),
}


@pytest.mark.parametrize("case", list(_ZOO))
def test_every_symmetry_discovery_claims_leaves_the_function_unchanged(case: str) -> None:
    """A random element of every group in the report, applied to the model at once, leaves its output unchanged;
    models where an activation stands between a layer and its norm, or where a weight is tied to another module,
    had claims that did not (a norm scale through a GELU, a rescaling of a tied matrix)."""
    make, inp, groups = _ZOO[case]
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = make().double()
    for mod in model.modules():
        if hasattr(mod, "eps"):
            mod.eps = 1e-12  # the norm scale symmetry is exact only while eps is negligible
    x = inp()
    x = x.double() if x.is_floating_point() else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = discover(model)
    assert [g.name for g in report.rescale_groups()] == groups
    y = model(x)
    obs = shockmon.Observer(model, report=report)
    before, units = obs.compute(spectra=True), obs.units()
    act_on_report(model, report, torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x), y, rtol=1e-9, atol=1e-9)
    # and every quotient value the observer computes from these groups is unchanged too; the units' coordinates are
    # the same set (permuted with the units)
    obs = shockmon.Observer(model, report=report)
    after, units_after = obs.compute(spectra=True), obs.units()
    quotient = [k for k in before if k.startswith("quotient/")]
    assert len(quotient) >= 4 * len(groups)
    for k in quotient:
        torch.testing.assert_close(after[k], before[k], rtol=1e-7, atol=1e-10, msg=k)
    assert units_after.keys() == units.keys()
    for k, u in units.items():
        order, order_after = u[:, 0].argsort(), units_after[k][:, 0].argsort()
        torch.testing.assert_close(units_after[k][order_after], u[order], rtol=1e-7, atol=1e-9, msg=k)
    # the check has teeth: a generic change of the parameters (1e-4 relative noise) moves the output past it
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 1e-4 * torch.randn_like(p))
    assert not torch.allclose(model(x), y, rtol=1e-9, atol=1e-9)


def test_discover_leaves_tied_and_parametrized_weights_raw_and_says_which() -> None:
    with pytest.warns(UserWarning, match=r"shared between modules get raw observables only: body\.4\.weight \(also "
                      r"emb\.weight\)"):
        r = discover(_TiedLM())
    assert [c.name for c in r.chains] == ["body.0"] and r.uncovered == ["emb.weight"]
    assert len(r.warnings) == 1 and "declare it" in r.warnings[0]
    with pytest.warns(UserWarning) as rec:
        e = discover(_tied_pair())
    assert [str(w.message).split(":")[1].strip().split(" ")[0] for w in rec] == ["parameters", "no"]
    assert e.is_empty and e.uncovered == ["0.weight", "0.bias", "2.bias"]
    # no activation between the layer and its norm but a GELU: no norm scale, the layer stays raw
    g = discover(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2)))
    assert g.norm_scales == [] and g.uncovered == ["0.weight", "0.bias"]
    # a parametrized layer (its weight is computed, not a parameter) is left raw: it used to crash the observer
    m = nn.Sequential(weight_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning) as rec:
        obs = shockmon.Observer(m)
    assert [str(w.message).split(":")[1].strip().split(" ")[0] for w in rec] == ["modules", "no"]
    assert "parametrization (weight_norm, spectral_norm, ...) get raw observables only: 0." in str(rec[0].message)
    assert obs.report.is_empty and "0.parametrizations.weight.original0" in obs.report.uncovered
    assert torch.isfinite(obs.compute()["raw/0.parametrizations.weight.original1"])
    # a module used twice shares its parameters with itself only: not a tie, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [c.name for c in discover(_reused_block()).chains] == ["0.mlp.0"]


def test_random_dataflow_graphs_get_only_claims_that_hold() -> None:
    """400 random computations (residual sums, products, concatenations, a Linear called twice, a weight read outside
    its module, functional activations, shape reads): every group discovery claims leaves the output and every
    quotient value unchanged, and it claims some (paths through such graphs exist)."""
    claimed = 0
    for seed in range(400):
        torch.manual_seed(seed)
        model = RandomDataflow(seed).double()
        if not list(model.parameters()):
            continue
        x = torch.randn(7, 6, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = discover(model)
        claimed += len(report.rows())
        y, before = model(x), shockmon.Observer(model, report=report).compute(spectra=True)
        act_on_report(model, report, torch.Generator().manual_seed(seed))
        # 1e-5: a norm's eps (1e-12) is not negligible against the rare row whose mean square is ~1e-6
        assert (model(x) - y).abs().max() <= 1e-5 * max(1.0, y.abs().max().item()), (seed, report.rows())
        after = shockmon.Observer(model, report=report).compute(spectra=True)
        for k in (k for k in before if k.startswith("quotient/")):
            torch.testing.assert_close(after[k], before[k], rtol=1e-6, atol=1e-9, msg=f"{seed}: {k}")
    assert claimed >= 80, claimed


class _Stateful(nn.Module):
    """A forward that keeps what it computed and counts its calls: tracing it must not leave a proxy behind."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        self.calls, self.seen = 0, [1]
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen.append(self.calls)
        self.last = self.fc2(F.relu(self.fc1(x)))
        return self.last


def test_discover_traces_without_leaving_traces_and_declarations_take_precedence() -> None:
    m = _Stateful()
    r = discover(m)
    assert [g.name for g in r.rescale_groups()] == ["fc1"]
    assert (m.calls, m.seen, m.last) == (0, [1], None)  # the trace ran forward: its side effects are undone
    assert m(torch.randn(3, 4)).shape == (3, 2) and m.calls == 1
    # forward hooks are off while tracing (they would run on symbolic values: FSDP's unshards), then back on
    calls: list[int] = []
    hooked = nn.Sequential(_GPTBlock())
    hooked[0].register_forward_pre_hook(lambda mod, args: calls.append(1))
    hooked.register_forward_hook(lambda mod, args, out: calls.append(2), always_call=True)
    assert [g.name for g in discover(hooked).rescale_groups()] == ["0.ln", "0.c_fc"] and calls == []
    hooked(torch.randn(2, 3, 6))
    assert calls == [1, 2]
    # and a model that does not trace is searched child by child, its nn.Sequential walked in order
    assert [g.name for g in discover(_Branchy()).rescale_groups()] == ["seq.0", "blocks.0.mlp.0"]
    # a declaration on the same parameters replaces what is found there (no duplicate group, no error)
    block = FusedBlock()
    found = discover(block, extra=[FusedBlock.declarations()[0]])  # the attention only: the MLP is found
    assert [(c.name, c.declared) for c in found.chains] == [("fc", False)]
    both = discover(block, extra=FusedBlock.declarations())
    assert [(c.name, c.declared) for c in both.chains] == [("fc", True)]


def test_discover_declarations_python_and_yaml(tmp_path: Path) -> None:
    block = FusedBlock()
    r = discover(block, extra=FusedBlock.declarations())
    assert [a.name for a in r.attentions] == ["attn"] and [g.name for g in r.rescale_groups()] == ["fc"]
    assert r.uncovered == ["proj.bias", "out.bias"]
    y = tmp_path / "decl.yaml"
    y.write_text(
        textwrap.dedent("""
        symmetries:
          - type: attention_heads
            q: qkv.weight[0:16]
            k: qkv.weight[16:32]
            v: qkv.weight[32:48]
            o: proj.weight
            num_heads: 4
            q_bias: qkv.bias[0:16]
          - type: rescaling
            inp: fc.weight
            inp_bias: fc.bias
            out: out.weight
    """)
    )
    r2 = discover(block, extra=str(y))
    assert [a.name for a in r2.attentions] == ["qkv"] and [g.name for g in r2.rescale_groups()] == ["fc"]


def test_discover_shipped_yaml_config_loads() -> None:
    decls = load_declarations(ROOT / "configs" / "symmetries_fused_gpt_block.yaml")
    assert {type(d).__name__ for d in decls} == {"AttentionHeads", "Rescaling"}


@pytest.mark.parametrize(
    ("make", "err", "match"),
    [
        (lambda: discover("model"), TypeError, "`model` to be a torch.nn.Module"),
        (lambda: discover(nn.ReLU()), ValueError, "at least one parameter"),
        (
            lambda: discover(FusedBlock(), extra=[Rescaling(inp="fc.weight", out="nope.weight")]),
            ValueError,
            "`out` to name a parameter of the model, but got 'nope.weight'",
        ),
        (
            lambda: discover(
                FusedBlock(),
                extra=[
                    AttentionHeads(
                        q="qkv.weight[0:16]", k="qkv.weight[16:32]", v="qkv.weight[32:48]", o="proj.weight", num_heads=5
                    )
                ],
            ),
            ValueError,
            "`num_heads` to divide the attention width 16, but got num_heads=5",
        ),
        (
            lambda: discover(
                FusedBlock(),
                extra=[
                    AttentionHeads(
                        q="qkv.weight[0:99]", k="qkv.weight[16:32]", v="qkv.weight[32:48]", o="proj.weight", num_heads=4
                    )
                ],
            ),
            ValueError,
            r"slice rows within \[0, 48\)",
        ),
        (lambda: AttentionHeads(q="a.w", k="b.w", v="c.w", o="d.w", num_heads=0), ValueError, "`num_heads`"),
        (lambda: NormScale(weight="a.w", per="rows"), ValueError, "`per` to be one of"),
        (lambda: discover(FusedBlock(), extra=["fc.weight"]), TypeError, r"`extra\[0\]`"),
        (lambda: load_declarations([{"type": "magic"}]), ValueError, "`type` to be one of"),
        (lambda: ParamRef.parse("w[a:b]"), ValueError, "module.param"),
        (
            lambda: discover(FusedBlock(), extra=[Rescaling(inp="fc.weight", out="proj.weight")]),
            ValueError,
            "one column per hidden unit",
        ),
    ],
    ids=[
        "not-module",
        "empty",
        "missing-param",
        "heads-not-dividing",
        "bad-slice",
        "zero-heads",
        "bad-per",
        "bad-decl-type",
        "bad-yaml-type",
        "bad-ref",
        "shape-mismatch",
    ],
)
def test_discover_bad_input(make, err, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(err, match=match):
        make()


def test_discover_norm_scale_declared_is_invariant() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6))
    o = shockmon.Observer(m, extra=[NormScale(weight="0.weight", bias="0.bias")])
    v = o.compute()["quotient/normscale/0/direction_coherence"]
    with torch.no_grad():
        m[0].weight.mul_(3.0)
        m[0].bias.mul_(3.0)
    torch.testing.assert_close(
        shockmon.Observer(m, extra=[NormScale(weight="0.weight", bias="0.bias")]).compute()[
            "quotient/normscale/0/direction_coherence"
        ],
        v,
    )


def test_core_imports_without_lightning() -> None:
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'tensorboard', 'matplotlib'):
                    raise ImportError('blocked: ' + name)
                return None
        sys.meta_path.insert(0, Block())
        import torch, shockmon
        from shockmon import discover, Observer, symmetry, observables, observer
        m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        assert Observer(m).compute()
        assert not any(k.split('.')[0] in ('lightning', 'tensorboard') for k in sys.modules)
        try:
            shockmon.ShockMonitor
        except ImportError:
            print('callbacks need lightning: ok')
        print('core ok')
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "core ok" in res.stdout
