"""Where cross-position alignment comes from: cosine by residual add, skip against branch, unscaled against unit-scaled.

    python benchmarks/cosine_components.py [--families bart,falcon,gpt2,roberta_classifier] [--seed 0]
                                           [--widths 64,256,768] [--out benchmarks/results/cosine_components.md]
    python benchmarks/cosine_components.py --families gpt2,tv_vit --taus 0.02,0.1,0.33,0.5,0.8 --no-adds \
                                           --out benchmarks/results/cosine_tau_sweep.md

For each model family (tests/fixtures/families.py, eval mode: no dropout noise), the model is unit-scaled
with ``measure=False`` and both it and the unscaled model (its own init, the scales of the rewrite erased)
run the same fresh batch through one fx interpreter. At every residual add the planner found: the mean
cosine between distinct rows (positions, all sequences; ``analysis.recorder.row_cosine``) of the skip, of
the branch, and of the sum, the branch's share of the sum's variance (``|w_b b|^2 / (|w_s s|^2 + |w_b b|^2)``,
the unscaled model's weights being 1), and the planner's predicted branch correlation ``rho``. Then the
cosine at the readout's input, as tests/test_families.py measures it (train mode, over all rows).
``--widths``: that readout cosine again with the families' Hugging Face configs widened (hidden size w,
MLP 2w; everything else as in the tests), mean of two inits: the unscaled models' std-0.02 init makes
their blocks nearly linear and their branches small at width 64, not at a real width.
``--taus``: the readout cosine with every residual add given the same share ``tau`` (``attn_tau`` =
``mlp_tau``), against the depth rule's default: whether any residual share meets the unscaled cosine.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch
import torch.fx as fx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from unit_scale_fx import unit_scale  # noqa: E402
from unit_scale_fx.analysis.equivalence import _erase_module  # noqa: E402
from unit_scale_fx.analysis.recorder import MatmulRecorder, last_row_cosine, row_cosine  # noqa: E402


class _Values(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.vals: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        v = super().run_node(n)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            self.vals[n.name] = v.detach().double()
        return v


def _values(gm: fx.GraphModule, flat: list) -> dict[str, torch.Tensor]:
    r = _Values(gm)
    with torch.no_grad():
        r.run(*flat)
    return r.vals


def _ms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean())


def _readout(model, fam, args, kwargs, seed: int) -> float:
    rec = MatmulRecorder()
    torch.manual_seed(seed)
    with rec:
        loss = fam.loss(model(*args, **kwargs))
        rec.backward()
        loss.backward()
    return last_row_cosine(rec.records)


def family_rows(name: str, seed: int) -> list[str]:
    from fixtures.families import FAMILIES

    fam = FAMILIES[name]
    torch.manual_seed(seed)
    model = fam.make()
    args, kwargs = fam.batch(0)
    args2, kwargs2 = fam.batch(1)
    base_cos = _readout(model, fam, args2, kwargs2, seed)
    model.zero_grad(set_to_none=True)
    us = unit_scale(model, args, example_kwargs=kwargs, measure=False)
    us_cos = _readout(us, fam, args2, kwargs2, seed)
    model.eval()
    us.eval()
    gm = getattr(us, "us_module", us)
    base = copy.deepcopy(gm)
    _erase_module(base)
    base.load_state_dict(model.state_dict(), strict=False)
    flat = list(args2) + list(kwargs2.values())
    vu, vb = _values(gm, flat), _values(base, flat)
    plan = gm.scale_plan()
    rows = [f"\n### {name}\n",
            "| residual add | module | skip cos | branch cos (predicted rho) | branch share | sum cos |",
            "|---|---|---|---|---|---|"]
    node_of = {n.name: n for n in gm.graph.nodes}
    for n in base.graph.nodes:
        rec = plan.get(n.name)
        if rec is None or rec.kind != "residual" or len(rec.weights) != 2:
            continue
        (sk, ws), (br, wb) = rec.weights.items()
        stack = node_of[n.name].meta.get("nn_module_stack") or {}
        mod = list(stack.values())[-1][0] if stack else ""
        cells = []
        for vals, (a, b) in ((vb, (1.0, 1.0)), (vu, (ws, wb))):
            s, b_ = vals[sk], vals[br]
            share = b * b * _ms(b_) / (a * a * _ms(s) + b * b * _ms(b_))
            cells.append((row_cosine(s), row_cosine(b_), share, row_cosine(vals[n.name])))
        rho = rec.note.split(" branch ")[-1] if "; rho skip" in rec.note else ""
        fmt = lambda i, f: f"{f(cells[0][i])} / {f(cells[1][i])}"  # noqa: E731
        rows.append(f"| {n.name} | {mod} | {fmt(0, lambda x: f'{x:.3f}')} | {fmt(1, lambda x: f'{x:.3f}')}"
                    f"{f' ({rho})' if rho else ''} | {fmt(2, lambda x: f'{x:.3f}')} | {fmt(3, lambda x: f'{x:.3f}')} |")
    rows.append(f"\nreadout input cosine (train mode, as tests/test_families.py): unscaled {base_cos:.3f} / "
                f"unit-scaled {us_cos:.3f}")
    return rows


_WIDTH_KEYS = ("n_embd", "hidden_size", "d_model")
_FFN_KEYS = ("intermediate_size", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim")


def widened(make, width: int):
    """A family's ``_hf`` builder with its width (and MLP width, 2x) replaced."""
    cells = dict(zip(make.__code__.co_freevars, (c.cell_contents for c in make.__closure__ or ())))
    size = dict(cells["size"])
    size.update({k: width for k in _WIDTH_KEYS if k in size})
    size.update({k: 2 * width for k in _FFN_KEYS if k in size})

    def build():
        import transformers

        return getattr(transformers, cells["cls_name"])(getattr(transformers, cells["cfg_name"])(**size))

    return build


def width_rows(names: list[str], widths: list[int]) -> list[str]:
    from fixtures.families import FAMILIES

    rows = ["\n## Readout input cosine by width (unscaled / unit-scaled, mean of 2 inits, train mode)\n",
            "| family | " + " | ".join(f"d={w}" for w in widths) + " |", "|---|" + "---|" * len(widths)]
    for name in names:
        fam, cells = FAMILIES[name], []
        for w in widths:
            pairs = []
            for seed in range(2):
                torch.manual_seed(100 + seed)
                model = widened(fam.make, w)()
                args, kwargs = fam.batch(0)
                args2, kwargs2 = fam.batch(1)
                b = _readout(model, fam, args2, kwargs2, seed)
                us = unit_scale(model, args, example_kwargs=kwargs, measure=False)
                pairs.append((b, _readout(us, fam, args2, kwargs2, seed)))
            cells.append(f"{sum(p[0] for p in pairs) / 2:.3f} / {sum(p[1] for p in pairs) / 2:.3f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def tau_rows(names: list[str], taus: list[float], seed: int) -> list[str]:
    """Readout cosine of each family unit-scaled with one residual share for every add."""
    from fixtures.families import FAMILIES, missing

    rows = ["\n## Readout input cosine under one residual share tau for every add (measure=False, train mode)\n",
            "| family | unscaled | depth rule | " + " | ".join(f"tau={t:g}" for t in taus) + " |",
            "|---|---|---|" + "---|" * len(taus)]
    for name in names:
        fam = FAMILIES[name]
        if missing(fam.needs):
            print(f"{name}: {missing(fam.needs)}; skipped", flush=True)
            continue
        torch.manual_seed(seed)
        model = fam.make()
        args, kwargs = fam.batch(0)
        args2, kwargs2 = fam.batch(1)
        cells = [_readout(model, fam, args2, kwargs2, seed)]
        for tau in [None, *taus]:
            model.zero_grad(set_to_none=True)
            shares = {} if tau is None else {"attn_tau": tau, "mlp_tau": tau}
            us = unit_scale(model, args, example_kwargs=kwargs, measure=False, **shares)
            cells.append(_readout(us, fam, args2, kwargs2, seed))
        rows.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="bart,falcon,gpt2,roberta_classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--widths", default="", help="also the readout cosine at these widths (e.g. 64,256,768)")
    p.add_argument("--taus", default="", help="also the readout cosine under one residual share (e.g. 0.02,0.5)")
    p.add_argument("--no-adds", action="store_true", help="skip the per-add tables")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cosine_components.md"))
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    title = ("Readout cosine under one residual share" if a.no_adds else
             "Cross-position cosine by residual add: unscaled / unit-scaled")
    lines = [f"# {title} (measure=False)\n",
             f"`python benchmarks/cosine_components.py --families {a.families} --seed {a.seed}"
             f"{' --widths ' + a.widths if a.widths else ''}{' --taus ' + a.taus if a.taus else ''}"
             f"{' --no-adds' if a.no_adds else ''}` "
             f"(torch {torch.__version__}, CPU; eval mode; each cell: unscaled / unit-scaled). The cosine is over "
             "all rows (pairs from different sequences count, as in the test); the planner's predicted rho is "
             "within one sequence, so an attention branch's is the higher of the two."]
    for name in [] if a.no_adds else a.families.split(","):
        rows = family_rows(name, a.seed)
        lines += rows
        print("\n".join(rows), flush=True)
    if a.widths:
        lines += width_rows(a.families.split(","), [int(w) for w in a.widths.split(",")])
    if a.taus:
        lines += tau_rows(a.families.split(","), [float(t) for t in a.taus.split(",")], a.seed)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
