"""u-μP: parameter roles from the graph, depth-tied residuals, readout / attention scales, RMS at init."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unit_scale_fx import MupConfig, UnitScaleConfig, UnitScaleError, unit_scale
from unit_scale_fx.analysis.recorder import fraction_in_band, record_matmul_operands
from unit_scale_fx.examples import GPT, ResidualMLP, gpt_batch, mlp_batch
from unit_scale_fx.passes.mup import depth_taus
from unit_scale_fx.passes.roles import roles_of
from unit_scale_fx.record import META_KEY
from unit_scale_fx.scale import scale

VOCAB, D, SEQ = 64, 64, 16


def _gpt(layers: int = 2, seed: int = 0, mup: bool = True, measure: bool = True, **kw):
    torch.manual_seed(seed)
    model = GPT(vocab=VOCAB, d=D, layers=layers, heads=4, max_len=SEQ, **kw)
    x, y = gpt_batch(VOCAB, 4, SEQ, seed=seed)
    return unit_scale(model, (x, y), mup=mup, measure=measure), x, y


def _human_role(name: str) -> str:
    """What a person would call each GPT parameter (the test may read names; the library may not)."""
    if name.startswith(("tok.", "pos.")):
        return "embedding"
    if name.startswith("head."):
        return "readout"
    if name.endswith("bias"):
        return "bias"
    if ".ln" in name or name.startswith("ln_f"):
        return "norm_gain"
    return "hidden"


@pytest.mark.parametrize("gated", [False, True])
def test_roles_on_gpt_match_a_human(gated):
    us, _, _ = _gpt(layers=2, gated=gated)
    analysis = roles_of(us)
    names = [n for n, _ in us.named_parameters()]
    assert set(analysis.params) == set(names)
    for name in names:
        role = analysis.params[name]
        assert role.role == _human_role(name), (name, role)
        inside_block = name.startswith("blocks.")
        assert role.depth == (4 if inside_block else None), (name, role.depth)
    assert analysis.params["blocks.0.mlp.down.weight"].fan_in == 4 * D
    assert analysis.params["blocks.0.attn.qkv.weight"].fan_in == D
    assert analysis.params["tok.weight"].fan_out == D
    assert list(analysis.readouts.values()) == [D]
    assert [len(s) for s in analysis.residual_streams] == [4]


def test_roles_ignore_names():
    """Misleading attribute names: the roles still follow what the ops do."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Embedding(VOCAB, D)  # really the embedding
            self.embed = nn.Linear(D, D)  # really a hidden layer
            self.norm = nn.Linear(D, VOCAB, bias=False)  # really the readout
            self.w_out = nn.LayerNorm(D)  # really a norm

        def forward(self, idx, targets):
            h = self.head(idx)
            h = h + F.gelu(self.embed(self.w_out(h)))
            return F.cross_entropy(self.norm(h).flatten(0, 1), targets.flatten())

    x, y = gpt_batch(VOCAB, 2, SEQ)
    us = unit_scale(Odd(), (x, y), mup=True)
    got = {n: r.role for n, r in roles_of(us).params.items()}
    assert got == {"head.weight": "embedding", "embed.weight": "hidden", "embed.bias": "bias",
                   "norm.weight": "readout", "w_out.weight": "norm_gain", "w_out.bias": "bias"}


def test_roles_input_layer_and_tied_readout():
    torch.manual_seed(0)
    us = unit_scale(ResidualMLP(d_in=16, d=32, layers=2, d_out=4), mlp_batch(16, 4, 32), mup=True)
    roles = roles_of(us).params
    assert roles["inp.weight"].role == "input" and roles["inp.weight"].depth is None
    assert roles["out.weight"].role == "readout"
    assert roles["fc1.0.weight"].role == "hidden" and roles["fc1.0.weight"].depth == 2
    tied, _, _ = _gpt(layers=1, tied=True)
    troles = roles_of(tied)
    assert troles.params["tok.weight"].role == "embedding"  # embedding beats readout on a tied matrix
    assert len(troles.readouts) == 1


def test_depth_taus_follow_the_rule():
    hp = MupConfig(residual_mult=1.5, residual_attn_ratio=0.5)
    kinds = ["attn", "mlp"] * 4
    taus = depth_taus(kinds, hp)
    # final share of the input and of each branch in the stream's variance
    keep = [math.prod(1 - t for t in taus[i + 1:]) for i in range(len(taus))]
    shares = [t * k for t, k in zip(taus, keep)]
    input_share = math.prod(1 - t for t in taus)
    a_attn, a_mlp = hp.branch_weights()
    total = len(kinds) / 2 + 4 * a_attn ** 2 + 4 * a_mlp ** 2
    assert input_share == pytest.approx(len(kinds) / 2 / total)
    for kind, s in zip(kinds, shares):
        assert s == pytest.approx((a_attn if kind == "attn" else a_mlp) ** 2 / total)
    assert a_attn / a_mlp == pytest.approx(0.5)
    assert (a_attn ** 2 + a_mlp ** 2) / 2 == pytest.approx(1.5 ** 2)


def test_plan_uses_depth_taus_and_u_mup_scales():
    us, _, _ = _gpt(layers=2, measure=False)  # analytic plan: the skip stream is predicted at RMS 1
    plan = us.scale_plan(all_nodes=True)
    taus = depth_taus(["attn", "mlp", "attn", "mlp"], MupConfig())
    adds = [plan[n] for n in roles_of(us).residual_streams[0]]
    assert len(adds) == len(taus)
    for rec, tau in zip(adds, taus):
        skip_w = list(rec.weights.values())[0]
        assert skip_w == pytest.approx(math.sqrt(1 - tau))  # the skip stream has RMS 1
    # attention logits: 1 / d_head instead of 1 / sqrt(d_head)
    d_head = D // 4
    sdpa = [n for n in us.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert sdpa and all(n.kwargs["scale"] == pytest.approx(1 / d_head) for n in sdpa)
    # readout: 1 / fan_in forward, unit-scaling backward
    unit, _, _ = _gpt(layers=2, mup=False, measure=False)
    (ro,) = roles_of(us).readouts
    r_mup, r_unit = plan[ro], unit.scale_plan(all_nodes=True)[ro]
    assert r_mup.fwd == pytest.approx(r_unit.fwd / math.sqrt(D))
    assert r_mup.bwd == pytest.approx(r_unit.bwd)


def test_hyperparameters_reach_the_graph():
    hp = MupConfig(attn_softmax=2.0, ffn_act=1.5, loss_softmax=3.0)
    torch.manual_seed(0)
    x, y = gpt_batch(VOCAB, 4, SEQ)
    us = unit_scale(GPT(vocab=VOCAB, d=D, layers=1, heads=4, max_len=SEQ), (x, y),
                    UnitScaleConfig(parametrization="u-mup", mup=hp))
    nodes = list(us.graph.nodes)
    sdpa = [n for n in nodes if n.target is F.scaled_dot_product_attention]
    assert sdpa[0].kwargs["scale"] == pytest.approx(2.0 / (D // 4))
    gelu = next(n for n in nodes if n.target is F.gelu)
    src = gelu.args[0]
    while src.target is scale:
        src = src.args[0]
    assert src.target is operator.mul and src.args[1] == 1.5
    base, _, _ = _gpt(layers=1)
    (ro,) = roles_of(us).readouts
    assert us.scale_plan()[ro].fwd == pytest.approx(3.0 * base.scale_plan()[ro].fwd)


def test_config_is_validated():
    with pytest.raises(UnitScaleError):
        MupConfig(attn_softmax=0.0)
    with pytest.raises(UnitScaleError):
        UnitScaleConfig(parametrization="mup")


def _true_gradients(us, x, y):
    """Gradients of the rewritten forward with every backward scale set equal to its forward one."""
    import copy

    import torch.fx as fx

    graph = copy.deepcopy(us.graph)
    for n in graph.nodes:
        if n.target is scale and n.args[1] != n.args[2]:
            n.args = (n.args[0], n.args[1], n.args[1])
    twin = fx.GraphModule(us, graph)  # shares the parameters
    params = dict(twin.named_parameters())
    grads = torch.autograd.grad(twin(x, y), list(params.values()), allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(params.items(), grads)}


@pytest.mark.parametrize("tied", [False, True])
def test_gradients_are_positive_multiples_of_the_true_ones(tied):
    us, x, y = _gpt(layers=2, tied=tied)
    us(x, y).backward()
    true = _true_gradients(us, x, y)
    for name, p in us.named_parameters():
        if true[name].abs().max() == 0:
            continue
        cos = F.cosine_similarity(p.grad.flatten().double(), true[name].flatten().double(), dim=0)
        assert cos > 1 - 1e-6, name


def test_rms_bands_at_init():
    us, x, y = _gpt(layers=2)
    recs = record_matmul_operands(us, x, y)
    assert recs
    assert fraction_in_band(recs, 0.5, 2.0) >= 0.95
    assert fraction_in_band(recs, 1 / 8, 8.0) == 1.0


def test_tiny_training_run_reduces_loss():
    from unit_scale_fx.training import optim

    torch.manual_seed(0)
    x, y = gpt_batch(VOCAB, 2, SEQ)
    us = unit_scale(GPT(vocab=VOCAB, d=32, layers=1, heads=2, max_len=SEQ), (x, y), mup=True)
    opt = optim.AdamW(us, lr=0.1)
    losses = []
    for _ in range(15):
        loss = us(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert losses[-1] < 0.7 * losses[0]


def test_explicit_softmax_attention_gets_the_d_head_rule():
    class ExplicitAttn(nn.Module):
        def __init__(self, d: int = 32) -> None:
            super().__init__()
            self.emb, self.ln = nn.Embedding(VOCAB, d), nn.LayerNorm(d)
            self.qkv, self.o, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, VOCAB)

        def forward(self, idx, t):
            x = self.emb(idx)
            q, k, v = self.qkv(self.ln(x)).chunk(3, -1)
            a = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            x = x + self.o(a.softmax(-1) @ v)
            return F.cross_entropy(self.head(x).flatten(0, 1), t.flatten())

    x, y = gpt_batch(VOCAB, 2, 8)
    hp = MupConfig(attn_softmax=2.0)
    us = unit_scale(ExplicitAttn(), (x, y), UnitScaleConfig(parametrization="u-mup", mup=hp))
    sm = next(n for n in us.graph.nodes if n.target == "softmax")
    src = sm.args[0]
    while src.target is scale:
        src = src.args[0]
    assert src.target is operator.mul and src.args[1] == pytest.approx(2.0 / math.sqrt(32))
    assert torch.isfinite(us(x, y))


def test_u_mup_on_an_export_captured_graph():
    """aten-level graphs (torch.export capture) get the same roles and attention rule."""

    class ShapeBranching(GPT):
        def forward(self, idx, targets=None):
            if idx.shape[1] > 4:  # defeats symbolic tracing; export specialises on the shape
                return super().forward(idx, targets)
            return super().forward(idx, targets)

    torch.manual_seed(0)
    x, y = gpt_batch(VOCAB, 2, 8)
    us = unit_scale(ShapeBranching(vocab=VOCAB, d=32, layers=1, heads=2, max_len=8), (x, y), mup=True)
    assert us.us_capture == "torch.export"
    for name, role in roles_of(us).params.items():
        assert role.role == _human_role(name), (name, role)
    sdpa = [n for n in us.us_module.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert sdpa and all(n.kwargs["scale"] == pytest.approx(1 / 16) for n in sdpa)
    assert torch.isfinite(us(x, y))


def test_post_norm_blocks_form_one_stream():
    class PostNorm(nn.Module):
        def __init__(self, d: int = 32, layers: int = 3) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, d)
            self.fc = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
            self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
            self.head = nn.Linear(d, VOCAB)

        def forward(self, idx, t):
            x = self.emb(idx)
            for fc, ln in zip(self.fc, self.ln):
                x = ln(x + F.gelu(fc(x)))
            return F.cross_entropy(self.head(x).flatten(0, 1), t.flatten())

    x, y = gpt_batch(VOCAB, 2, 8)
    us = unit_scale(PostNorm(), (x, y), mup=True)
    analysis = roles_of(us)
    assert [len(s) for s in analysis.residual_streams] == [3]
    assert analysis.params["fc.1.weight"].role == "hidden" and analysis.params["fc.1.weight"].depth == 3
    assert analysis.params["head.weight"].role == "readout"
