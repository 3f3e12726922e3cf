"""What the CLI's TARGET names: a built-in model, ``package.module:factory`` or ``path/file.py:factory``.

A factory is called with the ``--set KEY=VALUE`` options as keyword arguments and
returns ``(model, example_inputs)`` (or just a model, for commands that need no inputs).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..errors import UnitScaleError
from ..examples import GPT, ResidualMLP, gpt_batch, mlp_batch


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
                                 where=command, fix="make the factory return (model, example_inputs)")
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
