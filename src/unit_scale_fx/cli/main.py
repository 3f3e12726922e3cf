"""``unit-scale-fx`` (also ``python -m unit_scale_fx``): see what unit scaling does to a model.

    unit-scale-fx dump TARGET [--stage before|after|diff] [--format text|python|dot|svg] [-o FILE]
    unit-scale-fx report TARGET [--png FILE] [--json FILE] [--only matmul|outliers] [--analytic]
    unit-scale-fx demo

TARGET is a built-in (``gpt``, ``mlp``), ``package.module:factory`` or
``path/to/file.py:factory`` (a function or a model class); ``--set KEY=VALUE`` passes sizes to it.
Example inputs: ``--input-shape SHAPE[:DTYPE[:HIGH]]``, ``--kwarg-shape NAME=SHAPE[...]``,
``--inputs module:function``, or the model's ``example_input_array``.
Errors print one line on stderr and exit with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from ..errors import UnitScaleError
from ..table import format_table

log = logging.getLogger("unit_scale_fx.cli")

EXIT_ERROR = 2


# -- helpers ------------------------------------------------------------------
def _write(text: str, path: Optional[str]) -> None:
    if path is None or path == "-":
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"wrote {path}", file=sys.stderr)


def _table(rows: list[tuple[str, ...]], left: int = 1) -> str:
    """Aligned columns: the first ``left`` left-aligned, the rest (numbers) right-aligned."""
    return format_table(rows, left=left)


def _g(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3g}"


def _load(args: argparse.Namespace, seed: Optional[int] = None) -> Any:
    """The target with its example inputs (``seed``: the factory's and the random inputs' seed)."""
    from .targets import load_target, parse_params, with_inputs

    params = parse_params(args.set)
    cli_inputs = args.input_shape or args.kwarg_shape or args.inputs
    # a seed goes to the factory only when its own inputs are used; otherwise it seeds the CLI's inputs
    target = load_target(args.target, params if seed is None or cli_inputs else {**params, "seed": seed})
    return with_inputs(target, args.input_shape, args.kwarg_shape, args.inputs, params, seed or 0)


def _unit_scale(target: Any, command: str, debug: bool = False, **overrides: Any) -> Any:
    """unit_scale the target; warnings become one line each, and what torch prints on
    stderr while a capture fails (torch.export prints the partial graph) is dropped unless --debug."""
    import contextlib
    import io
    import warnings

    from ..api import unit_scale

    inputs = target.require_inputs(command)
    noise = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.redirect_stderr(sys.stderr if debug else noise):
            us = unit_scale(target.model, inputs, dynamo_fallback=False, **overrides)  # dump/report need one graph
    sys.stderr.write(noise.getvalue())
    for w in caught:  # ours, one line each (torch's own deprecation notices are not the user's business)
        if "unit_scale_fx" in str(w.filename).replace("\\", "/"):
            print(f"warning: {str(w.message).splitlines()[0]}", file=sys.stderr)
    return us


def _attr(root: Any, target: str) -> Any:
    for part in target.split("."):
        root = getattr(root, part)
    return root


def captured_original(model: Any, us: Any) -> Optional[fx.GraphModule]:
    """The graph the rewrite started from, run with the original model's own weights.

    Node names match the unit-scaled graph exactly, so before and after line up.
    Attributes the original lacks (helpers a capture added, such as torch.export's
    guard module) come from the unit-scaled module. None if that fails too.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(us.us_source_graph)
    attrs: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op in ("get_attr", "call_module"):
            target = str(n.target)
            try:
                attrs[target] = _attr(model, target)
            except AttributeError:
                try:
                    attrs[target] = _attr(us, target)
                except AttributeError:
                    log.info("captured graph reads %s, which neither model has; measuring the model as it is", target)
                    return None
    gm = fx.GraphModule(attrs, graph, type(model).__name__)
    gm.train(model.training)
    return gm


# -- dump ---------------------------------------------------------------------
def cmd_dump(args: argparse.Namespace) -> int:
    from ..analysis.draw import dot_to_svg, graph_diff, graph_dot, graph_python, graph_text
    from ..analysis.track import traced_graph, measure_nodes

    target = _load(args)
    inputs = target.require_inputs("dump")
    # a model torch.fx cannot trace keeps its class; dump and report work on its planned graph, which
    # takes the (positional, tensor) inputs flat and returns its outputs as a tuple
    us = _unit_scale(target, "dump", args.debug).us_module
    if args.stage == "before":
        gm = captured_original(target.model, us) or traced_graph(target.model)
        if gm is None:
            raise UnitScaleError("cannot show the captured graph with the original weights", where="dump --stage before",
                                 fix="use --stage after or --stage diff")
        graph, root, title = gm.graph, gm, f"{args.target}: captured graph (before unit scaling)"
    else:
        gm, graph, root = us, us.graph, us
        title = f"{args.target}: unit-scaled graph" if args.stage == "after" else f"{args.target}: what the rewrite changed"
    measured = {} if args.no_measure else measure_nodes(gm, *inputs)

    if args.stage == "diff":
        diff = graph_diff(us.us_source_graph, us.graph, us)
        if args.format == "text":
            out = str(diff)
        elif args.format == "python":
            import difflib

            before_code = graph_python(us.us_source_graph, us).splitlines()
            after_code = graph_python(us.graph, us).splitlines()
            out = f"# {diff.summary()}\n" + "\n".join(
                difflib.unified_diff(before_code, after_code, "before.py", "after.py", lineterm="")) + "\n"
        else:
            out = graph_dot(graph, root, measured, title=f"{title}: {diff.summary()}",
                            added=frozenset(diff.added), swapped=frozenset(diff.swapped))
    elif args.format == "text":
        out = graph_text(graph, root, measured, float_only=not args.all_nodes)
    elif args.format == "python":
        out = graph_python(graph, root)
    else:
        out = graph_dot(graph, root, measured, title=title)
    if args.format == "svg":
        out = dot_to_svg(out)
    _write(out, args.output)
    return 0


# -- report -------------------------------------------------------------------
def compare_table(before: Any, after: Any) -> str:
    """Ops of the unit-scaled model beside the same nodes of the original: forward and gradient RMS."""
    from ..analysis.track import short_op

    b = {r.name: r for r in before.rows}
    rows = [("node", "op", "mm", "fwd before", "fwd after", "grad before", "grad after", "pred fwd", "pred grad")]
    for a in after.rows:
        o = b.get(a.name)
        rows.append((a.name, short_op(a.op), a.matmul or "", _g(o.fwd_rms if o else None), _g(a.fwd_rms),
                     _g(o.grad_rms if o else None), _g(a.grad_rms), _g(a.pred_fwd_rms), _g(a.pred_grad_rms)))
    return _table(rows, left=3)


def band_summary(before: Any, after: Any) -> str:
    lines = []
    for lo, hi in ((0.5, 2.0), (0.125, 8.0)):
        fb, fa = before.fraction_in_band(lo, hi), after.fraction_in_band(lo, hi)
        lines.append(f"measured RMS values (fwd and grad) in [{lo:g}, {hi:g}]: before {fb:.0%}, after {fa:.0%}")
    return "\n".join(lines)


def analytic_gap(target: Any, inputs: Any, measured_plan: Any, args: argparse.Namespace) -> str:
    """The same model planned on shapes alone (``measure=False``, what the meta device gets), measured
    on the same inputs: the gap between analytic and measured planning, matmul operands, fwd and bwd."""
    from ..analysis.track import track_scales

    analytic = track_scales(_unit_scale(target, "report", args.debug, measure=False), *inputs)
    lines = []
    for label, rep in (("measured plan", measured_plan), ("analytic plan", analytic)):
        mm = rep.matmul_operands()
        parts = [f"{ph} {mm.fraction_in_band(0.5, 2.0, ph):.0%}" for ph in ("fwd", "grad")]
        lines.append(f"{label} (measure={label.startswith('measured')}): matmul operands in [1/2, 2]: "
                     + ", ".join(parts) + f"; in [1/8, 8]: {mm.fraction_in_band(0.125, 8.0):.0%}")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    from ..analysis.track import track_scales

    target = _load(args)
    inputs = target.require_inputs("report")
    if args.png:  # fail before the work, not after it
        from ..analysis.plot import _matplotlib

        _matplotlib()
    t0 = time.perf_counter()
    model_us = _unit_scale(target, "report", args.debug)  # plans (and calibrates) on the factory's batch
    us = model_us.us_module  # the planned graph (see dump)
    if args.measure_seed is not None:  # measure on a batch the plan has not seen
        inputs = _load(args, args.measure_seed).require_inputs("report")
    before = track_scales(captured_original(target.model, us) or target.model, *inputs, progress=args.progress)
    after = track_scales(us, *inputs, progress=args.progress)
    sel_b, sel_a = before.ops(), after.ops()
    if args.only == "matmul":
        sel_b, sel_a = before.matmul_operands(), after.matmul_operands()
    elif args.only == "outliers":
        sel_a = after.ops().outliers()
        sel_b = before
    print(f"{args.target}: {len(after.rows)} float nodes; loss before {_g(before.loss)}, after {_g(after.loss)} "
          f"({time.perf_counter() - t0:.1f} s)")
    print(compare_table(sel_b, sel_a))
    print(band_summary(before.ops(), after.ops()))
    checks = trust_checks(target.model, model_us, inputs)
    print(checks["text"])
    if args.analytic:
        print(analytic_gap(target, inputs, after, args))
    if args.full:
        print()
        print(after)
    if args.json:
        import json

        payload = {"target": args.target, "before": before.to_dict(), "after": after.to_dict(),
                   "equivalence": checks["equivalence"], "min_gradient_cosine": checks["min_cosine"]}
        _write(json.dumps(payload, indent=2, default=str), args.json)
    if args.png:
        from ..analysis.plot import plot_reports

        plot_reports(before, after, args.png, title=f"{args.target}: log2 RMS per op, before vs after unit scaling")
        print(f"wrote {args.png}", file=sys.stderr)
    return 0 if checks["ok"] else 1


def trust_checks(original: Any, us: Any, inputs: tuple) -> dict:
    """Equivalence (every scale erased: the original's outputs and gradients) and gradient validity."""
    from ..analysis import all_outputs_loss, check_equivalence, gradient_cosines

    eq = check_equivalence(original, us, *inputs)
    cos = gradient_cosines(us, *inputs, loss_fn=all_outputs_loss)
    low = min(cos.values(), default=1.0)
    valid = low >= 1 - 1e-6
    text = (f"equivalence with every scale erased, on the original weights: {eq}\n"
            f"gradient validity (cosine with the true gradient of the rewritten forward): min {low:.9f} over "
            f"{len(cos)} parameters ({'valid' if valid else 'NOT valid'}: threshold 1 - 1e-6)")
    return {"ok": eq.ok and valid, "text": text, "min_cosine": low,
            "equivalence": {"ok": eq.ok, "max_error": eq.max_error, "failures": eq.failures}}


# -- demo ---------------------------------------------------------------------
def counting_batch(vocab: int, batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable toy task: each row counts from a random start with a random step in 1..3 (mod vocab)."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    step = torch.randint(1, 4, (batch, 1), generator=generator)
    seqs = (start + step * torch.arange(seq + 1)) % vocab
    return seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()


def _operand_table(before: list, after: list) -> str:
    rows = [("phase", "operand", "count", "before median", "before range", "after median", "after range",
             "after in [1/2,2]")]
    for phase in ("fwd", "bwd"):
        for role in sorted({r.role for r in after if r.phase == phase}):
            b = [r.rms for r in before if r.phase == phase and r.role == role]
            a = [r.rms for r in after if r.phase == phase and r.role == role]
            if not a:
                continue
            rng = (lambda v: f"{min(v):.2g}..{max(v):.2g}" if v else "-")
            rows.append((phase, role, str(len(a)), _g(statistics.median(b)) if b else "-", rng(b),
                         _g(statistics.median(a)), rng(a), f"{sum(0.5 <= x <= 2 for x in a)}/{len(a)}"))
    return _table(rows, left=2)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..analysis.progress import Progress
    from ..analysis.recorder import fraction_in_band, record_matmul_operands
    from ..analysis.track import track_scales
    from ..api import unit_scale
    from .targets import gpt, parse_params

    params = {"vocab": 256, "d": args.width, "layers": args.layers, "heads": 4, "seq": 64, "batch": 8,
              "seed": args.seed, **parse_params(args.set)}
    model, _ = gpt(**params)
    g = torch.Generator().manual_seed(params["seed"])
    idx, tgt = counting_batch(params["vocab"], params["batch"], params["seq"], g)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"1. A GPT ({params['layers']} layers, d={params['d']}, {n_params / 1e6:.2f}M parameters) with the usual "
          f"std-0.02 init.\n")
    t0 = time.perf_counter()
    us = unit_scale(model, (idx, tgt))
    print(f"2. us = unit_scale(model, (idx, targets)): {len(us.scale_plan())} nodes scaled in "
          f"{time.perf_counter() - t0:.2f} s; same state_dict keys: "
          f"{list(us.state_dict().keys()) == list(model.state_dict().keys())}.\n")

    rb = record_matmul_operands(model, idx, tgt)
    ra = record_matmul_operands(us, idx, tgt)
    model.zero_grad(set_to_none=True)
    us.zero_grad(set_to_none=True)
    print("3. RMS of every matmul operand (measured at the aten level, forward and backward):")
    print(_operand_table(rb, ra))
    print(f"   in [1/2, 2]: before {fraction_in_band(rb):.0%}, after {fraction_in_band(ra):.0%} "
          f"of {len(ra)} operands\n")

    before = track_scales(model, idx, tgt, progress=False)
    after = track_scales(us, idx, tgt, progress=False)
    print("4. track_scales: every op output, forward and gradient RMS")
    print("   " + band_summary(before.ops(), after.ops()).replace("\n", "\n   ") + "\n")

    print("5. The scale plan (first rows of us.summary()):")
    print("   " + "\n".join(us.summary().splitlines()[:12]).replace("\n", "\n   ") + "\n")

    print(f"6. Training the unit-scaled GPT on a counting task (Adam, lr {args.lr:g}, {args.steps} steps):")
    opt = torch.optim.Adam(us.parameters(), lr=args.lr)
    losses = []
    every = max(1, args.steps // 8)
    with Progress(args.steps, "   training", enabled=args.progress) as bar:
        for step in range(args.steps):
            x, y = counting_batch(params["vocab"], params["batch"], params["seq"], g)
            loss = us(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update()
            if step % every == 0 or step == args.steps - 1:
                log.info("step %d loss %.4f", step, losses[-1])
    rows = [("step", "loss")] + [(str(s), f"{losses[s]:.3f}") for s in range(0, args.steps, every)]
    if (args.steps - 1) % every:
        rows.append((str(args.steps - 1), f"{losses[-1]:.3f}"))
    print("   " + _table(rows).replace("\n", "\n   "))
    ok = all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    print(f"   loss {losses[0]:.3f} -> {losses[-1]:.3f} (uniform guess: ln {params['vocab']} = "
          f"{math.log(params['vocab']):.3f})")
    return 0 if ok else 1


# -- parser -------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unit-scale-fx", description="See what unit scaling does to a model.",
                                epilog="TARGET: gpt | mlp | package.module:factory | path/to/file.py:factory "
                                "(a factory, or a model class, returns a model or (model, example_inputs); inputs "
                                "can also be given with --input-shape, --kwarg-shape or --inputs). Built-in options: "
                                "gpt: vocab d layers heads seq batch gated tied seed; mlp: d_in d layers d_out batch seed.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, target: bool = True) -> None:
        if target:
            sp.add_argument("target", metavar="TARGET", help="gpt, mlp, package.module:factory or file.py:factory")
        sp.add_argument("-s", "--set", action="append", metavar="KEY=VALUE",
                        help="keyword argument for the factory or model class (sizes), e.g. -s d=128 -s layers=4; "
                        "repeatable")
        if target:
            sp.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE[:HIGH]]",
                            help="a positional example input: random N(0,1) floats, or integers in [0, HIGH), "
                            "e.g. --input-shape 2,16:int64:256; repeatable, in forward's order")
            sp.add_argument("--kwarg-shape", action="append", metavar="NAME=SHAPE[:DTYPE[:HIGH]]",
                            help="a keyword example input, e.g. --kwarg-shape attention_mask=2,16:int64:2; repeatable")
            sp.add_argument("--inputs", metavar="MODULE:FUNCTION",
                            help="a function (package.module:fn or file.py:fn) returning the example inputs: "
                            "a tuple of args, (args, kwargs) or a dict of kwargs; it gets the --set options it "
                            "takes. Without input options: the factory's inputs, else the model's "
                            "example_input_array")
        sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: only on a terminal)")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logs")

    d = sub.add_parser("dump", help="the captured / unit-scaled graph as text, Python, DOT or SVG")
    common(d)
    d.add_argument("--stage", choices=("before", "after", "diff"), default="after",
                   help="before: the captured graph with the original weights; after: the unit-scaled graph "
                   "(default); diff: what the rewrite changed")
    d.add_argument("--format", choices=("text", "python", "dot", "svg"), default="text",
                   help="text: one line per float node with scales and RMS (default); python: the generated "
                   "code; dot/svg: Graphviz, edges coloured by RMS (svg needs Graphviz's dot)")
    d.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    d.add_argument("--no-measure", action="store_true", help="skip the forward/backward that measures RMS")
    d.add_argument("--all-nodes", action="store_true", help="text: also list integer / shape nodes")
    d.set_defaults(func=cmd_dump)

    r = sub.add_parser("report", help="measured RMS per op before and after unit scaling")
    common(r)
    r.add_argument("--png", metavar="FILE", help="save a plot of log2 RMS per op (needs matplotlib)")
    r.add_argument("--json", metavar="FILE", help="save both reports as JSON")
    r.add_argument("--only", choices=("matmul", "outliers"), help="only matmul operands / only ops outside [1/2, 2]")
    r.add_argument("--measure-seed", type=int, metavar="N",
                   help="measure on the batch the factory makes with seed=N (the factory must take seed), "
                   "not on the batch the scales were planned on")
    r.add_argument("--analytic", action="store_true",
                   help="also plan on shapes alone (measure=False, as on the meta device) and print the matmul "
                        "operands in band for both plans: the analytic-measured gap")
    r.add_argument("--full", action="store_true", help="also print the unit-scaled report with predictions and scales")
    r.set_defaults(func=cmd_report)

    m = sub.add_parser("demo", help="unit-scale the built-in GPT, compare scales, train a few steps")
    common(m, target=False)
    m.add_argument("--width", type=int, default=64, help="model width d")
    m.add_argument("--layers", type=int, default=2, help="number of transformer blocks (default 2)")
    m.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches (default 0)")
    m.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    m.add_argument("--lr", type=float, default=5e-2, help="Adam learning rate (default 0.05)")
    m.set_defaults(func=cmd_demo)
    return p


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, UnitScaleError):
        msg = exc.what.strip().splitlines()[0] if exc.what.strip() else type(exc).__name__
        if exc.fix:
            msg += f" (fix: {exc.fix})"
        return msg
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("unit-scale-fx: interrupted", file=sys.stderr)
        return 130
    except (UnitScaleError, Exception) as exc:  # noqa: B014 - one line for every failure
        if args.debug:
            raise
        print(f"unit-scale-fx: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
