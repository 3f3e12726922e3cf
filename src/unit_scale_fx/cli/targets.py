"""What the CLI's TARGET names: a built-in model, ``package.module:factory`` or ``path/file.py:factory``.

A factory (a function, or a model class) is called with the ``--set KEY=VALUE`` options as
keyword arguments and returns ``(model, example_inputs)`` or just a model. Example inputs can
also come from the command line (:func:`with_inputs`): random tensors of given shapes
(``--input-shape``, ``--kwarg-shape``), a function (``--inputs``), or the model's
``example_input_array``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import keyword
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..errors import UnitScaleError
from ..examples import GPT, ResidualMLP, gpt_batch, mlp_batch

log = logging.getLogger(__name__)


def gpt(vocab: int = 256, d: int = 64, layers: int = 2, heads: int = 4, seq: int = 64, batch: int = 4,
        gated: bool = False, tied: bool = False, seed: int = 0) -> tuple[nn.Module, tuple]:
    """The built-in pre-norm GPT and a batch of (tokens, targets); its forward returns the loss."""
    torch.manual_seed(seed)
    model = GPT(vocab=vocab, d=d, layers=layers, heads=heads, max_len=max(seq, 1), gated=gated, tied=tied)
    return model, gpt_batch(vocab, batch, seq, seed)


def mlp(d_in: int = 32, d: int = 128, layers: int = 4, d_out: int = 8, batch: int = 64,
        seed: int = 0) -> tuple[nn.Module, tuple]:
    """The built-in residual MLP regressor and a batch of (x, y); its forward returns the loss."""
    torch.manual_seed(seed)
    return ResidualMLP(d_in, d, layers, d_out), mlp_batch(d_in, d_out, batch, seed)


#: built-in targets by name.
BUILTINS: dict[str, Callable[..., tuple[nn.Module, tuple]]] = {"gpt": gpt, "mlp": mlp}


@dataclass
class Target:
    """A loaded target: the model and its example inputs (``None`` when the factory gave none)."""

    spec: str
    model: nn.Module
    inputs: Optional[tuple]

    def require_inputs(self, command: str) -> tuple:
        if self.inputs is None:
            raise UnitScaleError(f"target {self.spec!r} gave a model but no example inputs",
                                 where=command, fix="give --input-shape SHAPE[:DTYPE[:HIGH]] (repeatable), "
                                 "--kwarg-shape NAME=SHAPE, --inputs module:function, or make the factory "
                                 "return (model, example_inputs)")
        return self.inputs


def parse_params(items: Optional[list[str]]) -> dict[str, Any]:
    """``["d=64", "gated=True", "name=x"]`` -> ``{"d": 64, "gated": True, "name": "x"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UnitScaleError(f"bad --set option {item!r}", where="--set", fix="write --set KEY=VALUE, e.g. --set d=64")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def _load_file(path_str: str) -> Any:
    path = Path(path_str)
    if not path.is_file():
        raise UnitScaleError(f"file not found: {path_str}", where="TARGET",
                             fix="give an existing path/to/file.py:factory")
    name = f"_unit_scale_fx_target_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UnitScaleError(f"cannot load {path_str} as Python", where="TARGET", fix="point at a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UnitScaleError(f"importing {path_str} raised {type(exc).__name__}: {exc}", where="TARGET",
                             fix="run the file with python to see the error") from exc
    return module


def _load_module(mod_name: str) -> Any:
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        raise UnitScaleError(f"cannot import module {mod_name!r}: {exc}", where="TARGET",
                             fix="check the module name and that it is on PYTHONPATH") from exc
    except Exception as exc:
        raise UnitScaleError(f"importing {mod_name} raised {type(exc).__name__}: {exc}", where="TARGET",
                             fix=f"run python -c 'import {mod_name}' to see the error") from exc


def resolve_factory(spec: str) -> Callable[..., Any]:
    """The callable a TARGET names."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise UnitScaleError(
            f"unknown target {spec!r}", where="TARGET",
            fix=f"use a built-in ({', '.join(sorted(BUILTINS))}), package.module:factory or path/to/file.py:factory")
    module = _load_file(where) if where.endswith(".py") or "/" in where or "\\" in where else _load_module(where)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise UnitScaleError(f"{where} has no callable {attr!r}", where="TARGET",
                             fix="name a function that returns a model or (model, example_inputs)")
    return factory


def load_target(spec: str, params: Optional[dict[str, Any]] = None) -> Target:
    """Call the factory a TARGET names with ``params`` and check what it returns."""
    factory = resolve_factory(spec)
    params = params or {}
    try:
        inspect.signature(factory).bind(**params)
    except TypeError as exc:
        raise UnitScaleError(f"factory {spec!r} does not take these options: {exc}", where="--set",
                             fix=f"its signature is {spec}{inspect.signature(factory)}") from exc
    except ValueError:  # no signature (builtins): let the call decide
        pass
    try:
        result = factory(**params)
    except UnitScaleError:
        raise
    except Exception as exc:
        raise UnitScaleError(f"factory {spec!r} raised {type(exc).__name__}: {exc}", where="TARGET",
                             fix="fix the factory (rerun with --debug for the traceback)") from exc
    inputs: Optional[tuple] = None
    model = result
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        model, inputs = result
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not isinstance(model, nn.Module):
        raise UnitScaleError(f"factory {spec!r} returned {type(result).__name__}, not a model",
                             where="TARGET", fix="return an nn.Module or (model, example_inputs)")
    return Target(spec, model, inputs)


# -- example inputs given on the command line -----------------------------------
#: dtype names an input spec may use (torch's own names, plus the usual short ones).
_DTYPE_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "long": "int64", "int": "int32"}
_INPUT_SPEC_FIX = ("write SHAPE[:DTYPE[:HIGH]], e.g. 2,16 (float32 N(0,1)), 2,16:int64:256 "
                   "(integers in [0, 256)) or 2,16:bool")


@dataclass(frozen=True)
class InputSpec:
    """A random example input: ``shape``, ``dtype`` and, for integers, the exclusive ``high`` bound."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    high: Optional[int] = None

    def make(self, generator: torch.Generator) -> torch.Tensor:
        if self.dtype == torch.bool:
            return torch.randint(0, 2, self.shape, generator=generator).bool()
        if self.dtype.is_floating_point or self.dtype.is_complex:
            return torch.randn(self.shape, generator=generator).to(self.dtype)
        return torch.randint(0, int(self.high or 0), self.shape, generator=generator, dtype=self.dtype)


def parse_input_spec(text: str, where: str = "--input-shape") -> InputSpec:
    """``"2,16"`` / ``"2,16:int64:256"`` / ``"4:bool"`` -> :class:`InputSpec` (``UnitScaleError`` if malformed)."""
    parts = text.strip().split(":")
    if len(parts) > 3 or not parts[0].strip():
        raise UnitScaleError(f"bad input spec {text!r}", where=where, fix=_INPUT_SPEC_FIX)
    try:
        shape = tuple(int(s) for s in parts[0].replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise UnitScaleError(f"bad shape {parts[0]!r} in input spec {text!r}", where=where,
                             fix=_INPUT_SPEC_FIX) from None
    if not shape or any(s < 0 for s in shape):
        raise UnitScaleError(f"bad shape {parts[0]!r} in input spec {text!r}", where=where, fix=_INPUT_SPEC_FIX)
    dtype = torch.float32
    if len(parts) > 1 and parts[1].strip():
        name = _DTYPE_ALIASES.get(parts[1].strip(), parts[1].strip())
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise UnitScaleError(f"unknown dtype {parts[1]!r} in input spec {text!r}", where=where,
                                 fix="use a torch dtype name: float32, float16, bfloat16, int64, int32, bool, ...")
    high: Optional[int] = None
    integer = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    if len(parts) > 2:
        if not integer:
            raise UnitScaleError(f"input spec {text!r} gives a high bound for {str(dtype)[6:]}", where=where,
                                 fix="a high bound is for integer dtypes only (token ids: 2,16:int64:VOCAB)")
        try:
            high = int(parts[2])
        except ValueError:
            high = -1
        if high <= 0:
            raise UnitScaleError(f"bad high bound {parts[2]!r} in input spec {text!r}", where=where,
                                 fix="give a positive integer: values are drawn from [0, HIGH)")
    elif integer:
        raise UnitScaleError(f"input spec {text!r} has an integer dtype but no high bound", where=where,
                             fix=f"say the range of the values, e.g. {parts[0]}:{parts[1]}:256 for token ids < 256")
    return InputSpec(shape, dtype, high)


def parse_kwarg_spec(text: str) -> tuple[str, InputSpec]:
    """``"attention_mask=2,16:int64:2"`` -> ``("attention_mask", InputSpec(...))``."""
    name, sep, spec = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise UnitScaleError(f"bad --kwarg-shape {text!r}", where="--kwarg-shape",
                             fix="write NAME=SHAPE[:DTYPE[:HIGH]], e.g. --kwarg-shape attention_mask=2,16:int64:2")
    return name.strip(), parse_input_spec(spec, where=f"--kwarg-shape {name.strip()}")


def _call_with_accepted(fn: Callable[..., Any], params: dict[str, Any]) -> Any:
    """Call ``fn`` with those of ``params`` its signature accepts (all of them if it takes ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return fn(**params)
    return fn(**{k: v for k, v in params.items() if k in sig.parameters})


def split_inputs(value: Any, source: str) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` from what an inputs factory or ``example_input_array`` holds: a tensor,
    a tuple/list of positional inputs, a dict of keyword inputs, or ``(args_tuple, kwargs_dict)``."""
    if isinstance(value, dict):
        return (), dict(value)
    if isinstance(value, (tuple, list)):
        if len(value) == 2 and isinstance(value[0], (tuple, list)) and isinstance(value[1], dict):
            return tuple(value[0]), dict(value[1])
        return tuple(value), {}
    if isinstance(value, torch.Tensor):
        return (value,), {}
    raise UnitScaleError(f"{source} gave {type(value).__name__}, not example inputs", where=source,
                         fix="return a tuple of positional inputs, (args, kwargs), or a dict of keyword inputs")


def load_inputs(spec: str, params: Optional[dict[str, Any]] = None) -> tuple[tuple, dict[str, Any]]:
    """Call the ``module:function`` an ``--inputs`` option names; ``(args, kwargs)``.

    The function receives those ``--set`` options (and ``seed``) its signature accepts.
    """
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise UnitScaleError(f"bad --inputs {spec!r}", where="--inputs",
                             fix="name a function: package.module:function or path/to/file.py:function")
    module = _load_file(where) if where.endswith(".py") or "/" in where or "\\" in where else _load_module(where)
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UnitScaleError(f"{where} has no callable {attr!r}", where="--inputs",
                             fix="name a function that returns the example inputs")
    try:
        value = _call_with_accepted(fn, params or {})
    except UnitScaleError:
        raise
    except Exception as exc:
        raise UnitScaleError(f"--inputs {spec!r} raised {type(exc).__name__}: {exc}", where="--inputs",
                             fix="fix the function (rerun with --debug for the traceback)") from exc
    return split_inputs(value, f"--inputs {spec}")


class KeywordInputs(nn.Module):
    """``model`` called with keyword inputs, as a module whose forward takes every input by position.

    Graphs take their inputs by position, and symbolic tracing cannot skip an optional
    parameter (``if mask is not None`` is traced as true). The CLI measures this module
    when keyword inputs cannot simply be placed by position; its parameter names gain ``model.``.
    """

    def __init__(self, model: nn.Module, n_args: int, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.n_args, self.names = n_args, names
        self.train(model.training)

    def forward(self, *inputs: Any) -> Any:  # replaced per instance by one with named parameters
        raise NotImplementedError


def _keyword_module(model: nn.Module, n_args: int, names: tuple[str, ...]) -> nn.Module:
    positional = [f"arg{i}" for i in range(n_args)]
    bad = [k for k in names if not isinstance(k, str) or not k.isidentifier() or keyword.iskeyword(k)
           or k == "self" or k in positional]
    if bad:
        raise UnitScaleError(f"keyword input name {bad[0]!r} is not a plain Python name (or clashes with "
                             f"{', '.join(positional) or 'self'})", where="--inputs",
                             fix="use forward's parameter names as the keys")
    params = positional + list(names)
    call = ", ".join([f"arg{i}" for i in range(n_args)] + [f"{k}={k}" for k in names])
    code = f"def forward(self, {', '.join(params)}):\n    return self.model({call})\n"
    scope: dict[str, Any] = {}
    exec(compile(code, "<unit-scale-fx keyword inputs>", "exec"), scope)  # a fixed template; names are identifiers
    cls = type(f"{type(model).__name__}WithKeywordInputs", (KeywordInputs,), {"forward": scope["forward"]})
    return cls(model, n_args, names)


def bind_inputs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[nn.Module, tuple]:
    """``(module, positional inputs)`` that compute ``model(*args, **kwargs)``.

    When the inputs fill every parameter of ``forward`` (keyword inputs in any order), they are
    simply placed by position. When a parameter is left to its default (an optional mask or
    labels), keyword-only, or taken through ``**kwargs``, the model is wrapped in a
    :class:`KeywordInputs` module whose forward takes exactly the given inputs.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return model, tuple(args) + tuple(kwargs.values())
    P = inspect.Parameter
    names = [p.name for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    keyword_ok = {p.name for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
    var_kw = any(p.kind is P.VAR_KEYWORD for p in params)
    for k in kwargs:
        if k in names[: len(args)]:
            raise UnitScaleError(f"keyword input {k!r} is also given by position", where="--kwarg-shape / --inputs",
                                 fix=f"give {k} once: drop --kwarg-shape {k}=... or one --input-shape")
        if k not in keyword_ok and not var_kw:
            raise UnitScaleError(f"{type(model).__name__}.forward{inspect.signature(model.forward)} has no "
                                 f"parameter {k!r}", where="--kwarg-shape / --inputs",
                                 fix="name one of forward's parameters")
    rest = names[len(args):]
    if set(rest) == set(kwargs) or (not kwargs and any(p.kind is P.VAR_POSITIONAL for p in params)):
        return model, tuple(args) + tuple(kwargs[k] for k in rest)
    left = [k for k in rest if k not in kwargs]
    log.info("%s.forward: %s left to their defaults%s; measuring it through a wrapper (parameter names gain "
             "'model.')", type(model).__name__, ", ".join(left) or "no parameter",
             " and keyword inputs " + ", ".join(kwargs) if kwargs else "")
    return _keyword_module(model, len(args), tuple(kwargs)), tuple(args) + tuple(kwargs.values())


def with_inputs(target: Target, input_shapes: Optional[list[str]] = None, kwarg_shapes: Optional[list[str]] = None,
                inputs: Optional[str] = None, params: Optional[dict[str, Any]] = None, seed: int = 0) -> Target:
    """The target with the example inputs the command line asks for.

    In order: ``--inputs module:function``, else ``--input-shape`` / ``--kwarg-shape`` (random
    tensors, seeded by ``seed``), else what the factory returned, else the model's
    ``example_input_array`` (PyTorch Lightning's convention: a tensor, a tuple, or a dict of
    keyword inputs). Inputs are bound to ``forward`` by :func:`bind_inputs`.
    """
    if inputs and (input_shapes or kwarg_shapes):
        raise UnitScaleError("--inputs and --input-shape/--kwarg-shape both give example inputs",
                             where="--inputs", fix="use one of them")
    if inputs:
        args, kwargs = load_inputs(inputs, {**(params or {}), "seed": seed})
    elif input_shapes or kwarg_shapes:
        pos = [parse_input_spec(s) for s in input_shapes or []]
        kw = dict(parse_kwarg_spec(s) for s in kwarg_shapes or [])
        g = torch.Generator().manual_seed(seed)
        args, kwargs = tuple(s.make(g) for s in pos), {k: s.make(g) for k, s in kw.items()}
    elif target.inputs is not None:
        return target
    elif getattr(target.model, "example_input_array", None) is not None:
        args, kwargs = split_inputs(target.model.example_input_array,
                                    f"{type(target.model).__name__}.example_input_array")
    else:
        return target
    model, args = bind_inputs(target.model, args, kwargs)
    return Target(target.spec, model, args)
