"""The one definition of matmul-class (rules.matmul.matmul_operands / is_matmul_class)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import unit_scale_fx.rules  # noqa: F401  (fills the registry)
from unit_scale_fx.rules.matmul import is_matmul_class, matmul_operands


class AllOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.b = nn.Parameter(torch.zeros(8))
        self.emb = nn.Parameter(torch.randn(10, 8))
        self.k = nn.Parameter(torch.randn(4, 2, 3))
        self.kt = nn.Parameter(torch.randn(2, 4, 3))

    def forward(self, x, ids):
        lin = F.linear(x, self.w, self.b)
        mm = x @ self.w
        meth = x.matmul(self.w)
        addmm = torch.addmm(self.b, x, self.w)
        ein = torch.einsum("ij,jk->ik", x, self.w)
        emb = F.embedding(ids, self.emb)
        const = x * 2.0
        img = x.reshape(2, 2, 4, 4)[:, :1].reshape(2, 2, 8)
        conv = F.conv1d(img, self.k)
        convt = F.conv_transpose1d(img, self.kt)
        q = x.reshape(1, 1, 4, 8)
        att = F.scaled_dot_product_attention(q, q, q)
        return lin, mm, meth, addmm, ein, emb, const, conv, convt, att


def test_what_is_matmul_class():
    gm = fx.symbolic_trace(AllOps())
    by_name = {n.name: n for n in gm.graph.nodes}
    yes = ["linear", "matmul", "matmul_1", "addmm", "einsum", "conv1d", "conv_transpose1d",
           "scaled_dot_product_attention"]
    assert all(is_matmul_class(by_name[n], gm) for n in yes), [n for n in yes if not is_matmul_class(by_name[n], gm)]
    no = ["embedding", "mul", "reshape", "getitem", "x", "w"]
    assert not any(is_matmul_class(by_name[n], gm) for n in no)
    # operands: never the bias, the equation or the ids
    assert [o.name for o in matmul_operands(by_name["linear"], gm)] == ["x", "w"]
    assert [o.name for o in matmul_operands(by_name["addmm"], gm)] == ["x", "w"]
    assert [o.name for o in matmul_operands(by_name["einsum"], gm)] == ["x", "w"]
    q = by_name["scaled_dot_product_attention"].args[0]
    assert matmul_operands(by_name["scaled_dot_product_attention"], gm) == [q, q, q]  # query, key, value


def test_integer_operands_do_not_count():
    class IntMM(nn.Module):
        def forward(self, a, b):
            return a @ b

    gm = fx.symbolic_trace(IntMM())
    a, b, mm = list(gm.graph.nodes)[:3]
    a.meta["val"] = torch.zeros(2, 2, dtype=torch.int64)
    b.meta["val"] = torch.zeros(2, 2, dtype=torch.int64)
    assert not is_matmul_class(mm, gm)
    a.meta["val"] = b.meta["val"] = torch.zeros(2, 2)
    assert is_matmul_class(mm, gm)


def test_simulate_format_rounds_every_matmul_class_op():
    from unit_scale_fx.lowp.formats import Quantise
    from unit_scale_fx.lowp.simulate import simulate_format

    class Ein(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))
            self.emb = nn.Parameter(torch.randn(10, 8))

        def forward(self, x, ids):
            return torch.einsum("ij,jk->ik", x, self.w) + F.embedding(ids, self.emb)

    sim = simulate_format(Ein())
    sites = [m.role for m in sim.modules() if isinstance(m, Quantise)]
    assert sorted(sites) == ["matmul grad", "matmul operand", "matmul operand"]  # the einsum; not the lookup


class GroupedExperts(nn.Module):
    """A mixture-of-experts layer's grouped matmul: tokens sorted by expert, one weight per expert."""

    def __init__(self, experts: int = 3, k: int = 16, n: int = 32) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, k, n) * 0.02)  # a library's small init

    def forward(self, x, offs):
        return torch._grouped_mm(x, self.w, offs=offs)


def test_grouped_matmul_is_matmul_class_and_unit_scaled():
    """``torch._grouped_mm`` (and transformers' fallback op for it) is a matmul: fan-in k, fan-out n,
    rows per expert; its weight is initialised unit; the recorder sees its operands, forward and backward."""
    from helpers import band_fractions
    from unit_scale_fx import unit_scale
    from unit_scale_fx.analysis.recorder import record_matmul_operands

    model = GroupedExperts()
    gm = fx.symbolic_trace(model)
    (mm,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.name for n in matmul_operands(mm, gm)] == ["x", "w"]
    gen = torch.Generator().manual_seed(0)
    offs = torch.tensor([40, 80, 120], dtype=torch.int32)
    x = torch.randn(120, 16, generator=gen)
    before = record_matmul_operands(model, x, offs)
    assert {r.op for r in before} == {"_grouped_mm"} and {r.phase for r in before} == {"fwd", "bwd"}
    assert band_fractions(before)["fwd"] < 1.0  # the 0.02 weight
    us = unit_scale(model, (x, offs))
    frac = band_fractions(record_matmul_operands(us, torch.randn(120, 16, generator=gen), offs))
    assert frac == {"fwd": 1.0, "bwd": 1.0}, frac
