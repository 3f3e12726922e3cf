"""Text / DOT / SVG / diff dumps of graphs."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pydot
import pytest
import torch

from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.draw import (FAR, PALETTE, dot_to_svg, graph_diff, graph_dot, graph_python, graph_text,
                                         rms_colour)
from unit_scale_fx.analysis.track import measure_nodes
from unit_scale_fx.examples import ResidualMLP, mlp_batch
from conftest import needs_dot


@pytest.fixture(scope="module")
def scaled():
    torch.manual_seed(0)
    model = ResidualMLP(d_in=8, d=16, layers=2, d_out=4)
    x, y = mlp_batch(8, 4, 32)
    us = unit_scale(model, (x, y))
    return us, measure_nodes(us, x, y)


def inserted(us):
    return [n for n in us.graph.nodes if n.meta.get("unit_scale_inserted")]


def test_text_has_one_line_per_float_node_with_scales(scaled) -> None:
    us, measured = scaled
    text = graph_text(us.graph, us, measured)
    lines = {line.split()[0]: line for line in text.splitlines()[2:]}
    assert inserted(us)
    for n in inserted(us):
        assert n.name in lines and f"x{float(n.args[1]):.4g} / grad x{float(n.args[2]):.4g}" in lines[n.name]
    rec = us.scale_plan()["linear_1"]
    assert f"x{rec.fwd:.4g}" in lines["linear_1"] and f"pred {rec.fwd_rms:.3g}" in lines["linear_1"]
    assert f"rms {measured['linear_1'].fwd:.3g}" in lines["linear_1"]


def test_python_is_the_generated_code(scaled) -> None:
    us, _ = scaled
    code = graph_python(us.graph, us)
    assert code.strip() == us.code.strip()
    compile(code, "<after>", "exec")


def test_dot_parses_and_colours_edges_by_rms(scaled) -> None:
    us, measured = scaled
    src = graph_dot(us.graph, us, measured)
    (g,) = pydot.graph_from_dot_data(src)
    names = {n.get_name().strip('"') for n in g.get_nodes()}
    assert {n.name for n in inserted(us)} <= names
    diamonds = [n for n in g.get_nodes() if n.get_shape() == "diamond"]
    assert len(diamonds) == len(inserted(us))
    edges = g.get_edges()
    assert len(edges) > len(inserted(us))
    coloured = 0
    for e in edges:
        src_name = e.get_source().strip('"')
        m = measured.get(src_name)
        if m is not None:
            assert e.get_color().strip('"') == rms_colour(m.fwd)
            coloured += 1
    assert coloured


def test_rms_colour_bands() -> None:
    assert rms_colour(1.0) == PALETTE[0][1] and rms_colour(0.6) == PALETTE[0][1]
    assert rms_colour(3.0) == PALETTE[1][1] and rms_colour(1 / 10) == PALETTE[2][1]
    assert rms_colour(2.0 ** -5) == FAR and rms_colour(None) != FAR and rms_colour(math.nan) != FAR


def test_diff_counts_what_the_rewrite_added(scaled) -> None:
    us, _ = scaled
    d = graph_diff(us.us_source_graph, us.graph, us)
    assert sorted(d.added) == sorted(n.name for n in inserted(us))
    assert not d.swapped
    assert "linear_1" in d.rewired  # reads scaled inputs now
    plus = [l for l in d.unified.splitlines() if l.startswith("+") and not l.startswith("+++")]
    assert sum(" = scale(" in l for l in plus) == len(d.added)
    assert str(d).startswith(f"# {len(d.added)} nodes added")


@needs_dot
def test_svg_is_valid_xml(scaled) -> None:
    us, measured = scaled
    svg = dot_to_svg(graph_dot(us.graph, us, measured))
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    titles = {t.text for t in root.iter("{http://www.w3.org/2000/svg}title")}
    assert inserted(us)[0].name in titles
