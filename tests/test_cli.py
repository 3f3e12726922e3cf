"""The unit-scale-fx command line, run as users run it (subprocess), plus in-process checks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pydot
import pytest

from unit_scale_fx.cli import main
from conftest import needs_dot

GPT_SMALL = ["-s", "vocab=32", "-s", "d=16", "-s", "layers=1", "-s", "heads=2", "-s", "seq=8", "-s", "batch=2"]
MLP_SMALL = ["-s", "d_in=8", "-s", "d=16", "-s", "layers=2", "-s", "batch=16"]


def run_cli(*args: str, cwd: Path | None = None, module: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if module:
        cmd = [sys.executable, "-m", "unit_scale_fx", *args]
    else:
        cmd = [str(Path(sys.executable).with_name("unit-scale-fx")), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def factories(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("targets") / "targets.py"
    path.write_text(textwrap.dedent("""
        import torch, torch.nn as nn

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, x):
                for _ in range(int((x > 0).sum().item()) % 3 + 1):  # data-dependent: untraceable
                    x = self.fc(x)
                return x.sum()

        def untraceable():
            return Branchy(), (torch.randn(2, 4),)

        def boom(size=3):
            raise ValueError("boom at size %d" % size)

        def model_only():
            return nn.Linear(3, 3)

        class ShapeBranch(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

            def forward(self, x):
                if x.shape[0] > 2:  # fx cannot trace this; torch.export specialises on it
                    x = x * 2
                return self.b(torch.relu(self.a(x)))

        def export_only():
            torch.manual_seed(0)
            return ShapeBranch(), (torch.randn(32, 8),)

        def tiny(width=8):
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(4, width), nn.GELU(), nn.Linear(width, 2)), (torch.randn(16, 4),)

        class Tok(nn.Module):  # a class target; optional keyword inputs, as a Hugging Face model has
            def __init__(self, vocab=32, d=16):
                super().__init__()
                self.emb, self.fc = nn.Embedding(vocab, d), nn.Linear(d, vocab)

            def forward(self, input_ids, attention_mask=None, labels=None):
                h = self.emb(input_ids)
                if attention_mask is not None:
                    h = h * attention_mask.unsqueeze(-1).to(h.dtype)
                logits = self.fc(h)
                if labels is not None:
                    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
                return logits

        def tok_batch(seed=0):  # (args, kwargs)
            g = torch.Generator().manual_seed(seed)
            return (torch.randint(0, 32, (3, 6), generator=g),), {"labels": torch.randint(0, 32, (3, 6), generator=g)}

        def tok_kwargs():  # a dict of keyword inputs
            return {"input_ids": torch.randint(0, 32, (2, 7)), "labels": torch.randint(0, 32, (2, 7))}

        def not_inputs():
            return 3

        def bad_name():
            return (torch.randint(0, 32, (2, 3)),), {"labels); import os; (": torch.zeros(1)}

        class VarKw(nn.Module):  # keyword inputs through **kwargs
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, x, **kw):
                return self.fc(x) * kw["gain"]

        def varkw_inputs():
            return (torch.randn(2, 4),), {"gain": torch.full((1,), 3.0)}

        def varkw_bad_inputs():
            return (torch.randn(2, 4),), {"a b": torch.full((1,), 3.0)}

        class Lit(nn.Module):  # PyTorch Lightning's convention
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 4)
                self.example_input_array = torch.randn(5, 8)

            def forward(self, x):
                return self.fc(x)

        class LitDict(Lit):
            def __init__(self):
                super().__init__()
                self.example_input_array = {"x": torch.randn(9, 8)}
    """))
    return path


def one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("unit-scale-fx: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


# -- subprocess: every subcommand and format ------------------------------------
def test_dump_diff_text() -> None:
    p = run_cli("dump", "gpt", *GPT_SMALL, "--stage", "diff", "--format", "text")
    assert p.returncode == 0, p.stderr
    head, *rest = p.stdout.splitlines()
    assert head.startswith("# ") and "nodes added" in head
    added = int(head.split()[1])
    assert added > 10 and sum(l.startswith("+scale") and " = scale(" in l for l in rest) == added


def test_dump_before_python_via_console_script() -> None:
    p = run_cli("dump", "mlp", *MLP_SMALL, "--stage", "before", "--format", "python", module=False)
    assert p.returncode == 0, p.stderr
    assert "def forward" in p.stdout and "unit_scale_fx_scale" not in p.stdout
    compile(p.stdout, "<before>", "exec")


def test_dump_after_dot_file(tmp_path: Path) -> None:
    out = tmp_path / "after.dot"
    p = run_cli("dump", "gpt", *GPT_SMALL, "--stage", "after", "--format", "dot", "-o", str(out))
    assert p.returncode == 0, p.stderr
    (g,) = pydot.graph_from_dot_data(out.read_text())
    shapes = [n.get_shape() for n in g.get_nodes()]
    assert shapes.count("diamond") > 10 and len(g.get_edges()) > 40


@needs_dot
def test_dump_diff_svg_file(tmp_path: Path) -> None:
    out = tmp_path / "diff.svg"
    p = run_cli("dump", "mlp", *MLP_SMALL, "--stage", "diff", "--format", "svg", "-o", str(out))
    assert p.returncode == 0, p.stderr
    root = ET.fromstring(out.read_text())
    assert root.tag.endswith("svg")
    assert "nodes added" in out.read_text()


def test_report_png_and_json(tmp_path: Path) -> None:
    png, js = tmp_path / "plot.png", tmp_path / "r.json"
    p = run_cli("report", "gpt", *GPT_SMALL, "--png", str(png), "--json", str(js))
    assert p.returncode == 0, p.stderr
    header = p.stdout.splitlines()[1].split()
    assert header[:4] == ["node", "op", "mm", "fwd"]
    assert "before" in p.stdout and "after" in p.stdout
    data = png.read_bytes()
    assert len(data) > 10_000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(js.read_text())
    assert payload["after"]["unit_scaled"] and not payload["before"]["unit_scaled"]
    names = {r["name"] for r in payload["after"]["rows"]}
    assert {"linear", "scaled_dot_product_attention", "cross_entropy"} <= names
    # the report proves the rewrite is the user's model plus scales, with valid gradients
    assert "equivalence with every scale erased" in p.stdout and "equivalent (max relative error" in p.stdout
    assert payload["equivalence"]["ok"] and payload["min_gradient_cosine"] >= 1 - 1e-6


def test_demo_trains() -> None:
    p = run_cli("demo", "--steps", "8", "-s", "d=32", "-s", "layers=1", "-s", "seq=16", "-s", "vocab=64")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "matmul operand" in p.stdout and "in [1/2, 2]: before" in p.stdout
    last = p.stdout.strip().splitlines()[-1]
    first, final = (float(v) for v in last.split()[1:4:2])
    assert final < first


def test_bad_targets_subprocess(factories: Path) -> None:
    one_line_error(run_cli("dump", "nonsense"), "unknown target 'nonsense'")
    one_line_error(run_cli("dump", f"{factories}:untraceable"), "could capture")


# -- in process: the remaining combinations and error paths ----------------------
@pytest.mark.parametrize("stage,fmt", [("before", "text"), ("before", "dot"), ("after", "text"),
                                       ("after", "python"), pytest.param("after", "svg", marks=needs_dot), ("diff", "python"), ("diff", "dot")])
def test_dump_combinations(stage: str, fmt: str, factories: Path, capsys) -> None:
    assert main(["dump", f"{factories}:tiny", "--stage", stage, "--format", fmt]) == 0
    out = capsys.readouterr().out
    if fmt == "dot":
        assert pydot.graph_from_dot_data(out)
    elif fmt == "svg":
        assert ET.fromstring(out).tag.endswith("svg")
    elif fmt == "python" and stage == "after":  # the code: scales, or fused ops with their scale values
        assert re.search(r"unit_scale_fx_scale_(scale|scaled_[a-z_]+)\(", out) and "_scale = (" in out
    elif fmt == "python":
        assert out.startswith("# ") and "+++ after.py" in out
    else:
        assert out.splitlines()[0].split()[:3] == ["node", "op", "shape"]
        assert any(l.split()[1] == "scale" for l in out.splitlines()[2:]) == (stage == "after")


def test_report_on_user_factory_with_options(factories: Path, capsys) -> None:
    assert main(["report", f"{factories}:tiny", "-s", "width=12", "--only", "matmul"]) == 0
    out = capsys.readouterr().out
    rows = out.splitlines()[3:-4]
    assert rows and all(r.split()[2] in ("in", "out", "in,out") for r in rows)
    assert "12" in out  # the width option reached the factory (12 in shapes)


def test_report_lines_up_an_export_captured_model(factories: Path, capsys) -> None:
    assert main(["report", f"{factories}:export_only"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[3:-4]}
    assert set(rows) == {"mul", "linear", "relu", "linear_1"}
    # the original weights (std ~ 1/sqrt(fan_in)): linear_1's output is far from unit before, near it after
    before, after = float(rows["linear_1"][3]), float(rows["linear_1"][4])
    assert before < 0.7 and 0.7 < after < 1.4


def test_report_measures_on_a_fresh_batch(capsys) -> None:
    assert main(["report", "mlp", *MLP_SMALL, "--measure-seed", "3"]) == 0
    out = capsys.readouterr().out
    after = float(out.strip().splitlines()[-4].split("after ")[1].rstrip("%")) / 100
    assert after > 0.8  # measured RMS in [1/2, 2] on a batch the plan did not see


@pytest.mark.parametrize("args,needle", [
    (["report", "{f}:tiny", "--measure-seed", "1"], "does not take these options"),
    (["dump", "nonsense"], "unknown target"),
    (["dump", "no/such/file.py:f"], "file not found: no/such/file.py"),
    (["dump", "no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
    (["dump", "{f}:boom"], "raised ValueError: boom at size 3"),
    (["dump", "{f}:boom", "-s", "nosuch=1"], "does not take these options"),
    (["dump", "{f}:missing"], "has no callable 'missing'"),
    (["dump", "{f}:model_only"], "no example inputs"),
    (["dump", "{f}:untraceable"], "could capture"),
])
def test_errors_are_one_line_exit_2(args: list[str], needle: str, factories: Path, capsys) -> None:
    args = [a.replace("{f}", str(factories)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unit-scale-fx: error:") and needle in err[0], err


def test_debug_shows_the_traceback(factories: Path) -> None:
    with pytest.raises(Exception, match="boom"):
        main(["--debug", "dump", f"{factories}:boom"])


def test_missing_matplotlib_is_one_line(factories: Path) -> None:
    code = ("import sys; sys.modules['matplotlib'] = None; from unit_scale_fx.cli import main; "
            f"sys.exit(main(['report', {str(factories) + ':tiny'!r}, '--png', 'never.png']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    one_line_error(p, "plotting needs matplotlib")
    assert "unit-scale-fx[plot]" in p.stderr


def test_debug_after_the_subcommand_too(factories: Path) -> None:
    with pytest.raises(Exception, match="boom"):
        main(["dump", f"{factories}:boom", "--debug"])


def test_progress_bar_is_quiet_off_a_terminal() -> None:
    import io

    from unit_scale_fx.analysis.progress import Progress

    quiet = io.StringIO()
    with Progress(5, "work", stream=quiet) as bar:  # StringIO is not a TTY
        for _ in range(5):
            bar.update()
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    with Progress(4, "work", enabled=True, stream=loud) as bar:
        bar.update(4)
    assert loud.getvalue().rstrip().endswith("4/4") and "\r" in loud.getvalue()


# -- example inputs from the command line ------------------------------------------
def _report_rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines()[3:-2]}


def test_class_target_with_input_shapes(factories: Path, capsys) -> None:
    assert main(["report", f"{factories}:Tok", "-s", "d=12", "--input-shape", "2,5:int64:32"]) == 0
    out = capsys.readouterr().out
    assert "loss before -" in out  # no labels: the logits are the output
    assert {"embedding", "linear"} <= set(_report_rows(out))
    assert main(["dump", f"{factories}:Tok", "-s", "d=12", "--input-shape", "2,5:int64:32"]) == 0
    dump = capsys.readouterr().out
    assert "2x5x12" in dump and "2x5x32" in dump  # the shape and the class option reached the graph


def test_keyword_inputs_by_shape(factories: Path, capsys) -> None:
    args = ["report", f"{factories}:Tok", "--input-shape", "2,5:int64:32"]
    assert main(args + ["--kwarg-shape", "labels=2,5:int64:32"]) == 0
    out = capsys.readouterr().out
    rows = _report_rows(out)
    assert "cross_entropy" in rows and "mul" not in rows  # labels given, the mask left out
    loss_before = float(out.split("loss before ")[1].split(",")[0])
    assert 2.0 < loss_before < 6.0  # a cross-entropy over 32 classes, not a placeholder
    assert main(args + ["--kwarg-shape", "attention_mask=2,5:int64:2"]) == 0
    rows = _report_rows(capsys.readouterr().out)
    assert "mul" in rows and "cross_entropy" not in rows  # the mask given, labels left out


@pytest.mark.parametrize("fn,shape", [("tok_batch", "3x6x16"), ("tok_kwargs", "2x7x16")])
def test_inputs_factory(fn: str, shape: str, factories: Path, capsys) -> None:
    assert main(["dump", f"{factories}:Tok", "--inputs", f"{factories}:{fn}"]) == 0
    out = capsys.readouterr().out
    assert shape in out and "cross_entropy" in out


def test_inputs_factory_gets_the_measure_seed(factories: Path, capsys) -> None:
    assert main(["report", f"{factories}:Tok", "--inputs", f"{factories}:tok_batch", "--measure-seed", "4"]) == 0
    assert "cross_entropy" in capsys.readouterr().out


def test_keyword_inputs_through_var_kwargs(factories: Path, capsys) -> None:
    assert main(["dump", f"{factories}:VarKw", "--inputs", f"{factories}:varkw_inputs"]) == 0
    rows = {l.split()[0]: l for l in capsys.readouterr().out.splitlines()[2:]}
    assert "gain" in rows and "placeholder" in rows["gain"] and "rms 3/" in rows["gain"]
    assert main(["dump", f"{factories}:VarKw", "--inputs", f"{factories}:varkw_bad_inputs"]) == 2
    assert "'a b' is not a plain Python name" in capsys.readouterr().err


@pytest.mark.parametrize("cls,shape", [("Lit", "5x4"), ("LitDict", "9x4")])
def test_lightning_example_input_array(cls: str, shape: str, factories: Path, capsys) -> None:
    assert main(["dump", f"{factories}:{cls}"]) == 0
    out = capsys.readouterr().out
    assert shape in out and any(l.split()[1] == "scale" for l in out.splitlines()[2:])


def test_command_line_inputs_replace_example_input_array(factories: Path, capsys) -> None:
    assert main(["dump", f"{factories}:Lit", "--input-shape", "7,8"]) == 0
    out = capsys.readouterr().out
    assert "7x4" in out and "5x4" not in out


@pytest.mark.parametrize("args,needle", [
    (["--input-shape", "2,5:int64"], "integer dtype but no high bound"),
    (["--input-shape", "2,a:int64:32"], "bad shape '2,a'"),
    (["--input-shape", "2,5:nosuchtype"], "unknown dtype 'nosuchtype'"),
    (["--input-shape", "2,5:float32:3"], "gives a high bound for float32"),
    (["--input-shape", "2,5:int64:0"], "bad high bound '0'"),
    (["--input-shape", "2,5:int64:32:1"], "bad input spec"),
    (["--input-shape", "2,5:int64:32", "--kwarg-shape", "labels"], "bad --kwarg-shape 'labels'"),
    (["--input-shape", "2,5:int64:32", "--kwarg-shape", "nosuch=2"], "has no parameter 'nosuch'"),
    (["--input-shape", "2,5:int64:32", "--kwarg-shape", "input_ids=2,5:int64:32"], "also given by position"),
    (["--inputs", "{f}:not_inputs"], "gave int, not example inputs"),
    (["--inputs", "{f}:nosuch"], "has no callable 'nosuch'"),
    (["--inputs", "{f}:bad_name"], "has no parameter 'labels); import os; ('"),
    (["--inputs", "{f}:tok_batch", "--input-shape", "2"], "both give example inputs"),
    ([], "no example inputs"),
])
def test_bad_input_specs_are_one_line(args: list[str], needle: str, factories: Path, capsys) -> None:
    args = [a.replace("{f}", str(factories)) for a in args]
    assert main(["dump", f"{factories}:Tok", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unit-scale-fx: error:") and needle in err[0], err


def test_every_option_has_help() -> None:
    import argparse

    from unit_scale_fx.cli.main import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(a.option_strings)}" for name, sp in subs.choices.items() for a in sp._actions
               if a.option_strings and not a.help]
    assert not missing, missing


def test_report_analytic_gap(capsys) -> None:
    """--analytic: the same model planned on shapes alone, its matmul operands in band beside the measured plan's."""
    assert main(["report", "gpt", "-s", "layers=2", "-s", "d=32", "--analytic"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    measured, analytic = lines[-2], lines[-1]
    assert measured.startswith("measured plan (measure=True)") and analytic.startswith("analytic plan (measure=False)")
    fwd = float(analytic.split("fwd ")[1].split("%")[0])
    grad = float(analytic.split("grad ")[1].split("%")[0])
    assert fwd >= 95 and grad >= 95, analytic
