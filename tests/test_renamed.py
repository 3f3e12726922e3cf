"""Names that changed keep working: "role" now has three names (init kind, u-μP parameter role,
scale role), and the meta keys live in record.py."""

from __future__ import annotations

from unit_scale_fx import record
from unit_scale_fx.passes import PassContext, parameter_init_kinds, parameter_roles
from unit_scale_fx.passes.roles import PARAM_ROLES, ROLES
from unit_scale_fx.rules.registry import INIT_KINDS, Rule
from unit_scale_fx.rules.registry import ROLES as INIT_ROLES


def test_a_rule_written_against_the_former_name_still_declares_init_kinds():
    class Old(Rule):
        def param_roles(self, node):
            return {node: "zero"}

    class New(Rule):
        def init_kinds(self, node):
            return {node: "one"}

    assert Old().init_kinds("n") == {"n": "zero"} and Old().param_roles("n") == {"n": "zero"}
    assert New().init_kinds("n") == {"n": "one"} and New().param_roles("n") == {"n": "one"}
    assert Rule().init_kinds("n") == {} and Rule().param_roles("n") == {}


def test_former_names():
    assert INIT_ROLES is INIT_KINDS == ("unit", "zero", "one")
    assert ROLES is PARAM_ROLES and "readout" in PARAM_ROLES
    assert parameter_roles is parameter_init_kinds
    ctx = PassContext()
    ctx.param_roles = {"w": "unit"}  # the field's former name
    assert ctx.init_kinds == {"w": "unit"} and ctx.param_roles is ctx.init_kinds


def test_meta_keys_are_defined_once():
    import importlib

    rewrite = importlib.import_module("unit_scale_fx.passes.rewrite")  # the package exports the pass of that name
    fold_scales = importlib.import_module("unit_scale_fx.passes.fold_scales")
    registry = importlib.import_module("unit_scale_fx.rules.registry")

    assert rewrite.INSERTED is record.INSERTED and rewrite.ROLE is record.SCALE_ROLE
    assert rewrite.original is record.original and fold_scales.FOLDED is record.FOLDED
    assert registry.RULE_OVERRIDE is record.RULE_OVERRIDE and registry.MASK_KEYS is record.MASK_KEYS
    keys = [v for k, v in vars(record).items() if k.isupper() and isinstance(v, str)]
    assert len(keys) == len(set(keys)) >= 12  # distinct values, one name each
