"""Weight files of a unit-scaled model: marked so that a loader without the plan refuses them.

A unit-scaled model's weights are only meaningful with its scales: loaded into the plain class
they compute another function (unit-RMS weights, no scales), and nothing in a Hugging Face
checkpoint would stop that. So the weight files a unit-scaled model writes are *marked*: every
tensor is stored with one extra leading axis of size 1, and the safetensors metadata names
this format. Any loader that does not know the format finds every tensor's shape wrong and
refuses the checkpoint (``transformers``' ``from_pretrained`` raises a size-mismatch error);
:func:`unit_scale_fx.from_pretrained` and the unit-scaled class's ``from_pretrained``
read it through an unmarked view of the folder, and a unit-scaled model's
``load_state_dict`` (what ``Trainer`` uses to resume) takes marked tensors as they are.

The scales themselves travel in ``config.json`` (see :data:`unit_scale_fx.api.PLAN_ATTR`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

log = logging.getLogger(__name__)

#: safetensors metadata key and value of a marked file
MARK_KEY, MARK_VALUE = "unit_scale_fx", "marked-v1"
#: the metadata's ``format``: not one that plain loaders take for PyTorch weights
MARK_FORMAT = "unit_scale_fx"
_HOW = "load it with unit_scale_fx.from_pretrained(ModelClass, path)"


def _is_weight_file(p: Path) -> bool:
    """A model weight file as ``save_pretrained`` names them (not ``training_args.bin`` and the like)."""
    return p.is_file() and (p.suffix == ".safetensors" or (p.suffix == ".bin" and p.name.startswith("pytorch_model")))


def _weight_files(directory: Path, since: float) -> list[Path]:
    """The weight files ``save_pretrained`` wrote into ``directory`` at or after ``since``."""
    return [p for p in sorted(directory.iterdir()) if _is_weight_file(p) and p.stat().st_mtime >= since]


def is_marked(path: Path) -> bool:
    """Whether ``path`` is a weight file written by a unit-scaled model."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(MARK_KEY) == MARK_VALUE
    if path.suffix == ".bin":
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return isinstance(sd, dict) and sd.get(f"__{MARK_KEY}__") is not None
    return False


def _save(path: Path, tensors: dict[str, torch.Tensor], marked: bool) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": MARK_FORMAT, MARK_KEY: MARK_VALUE, "how_to_load": _HOW} if marked else {"format": "pt"}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    else:
        if marked:
            tensors = {**tensors, f"__{MARK_KEY}__": torch.tensor([1])}
        torch.save(tensors, path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd.pop(f"__{MARK_KEY}__", None)
    return sd


def mark_weight_files(directory: str | os.PathLike, since: float) -> list[Path]:
    """Mark the weight files written into ``directory`` since ``since`` (a ``time.time()``): each tensor gets a
    leading axis of size 1, and the file says it is a unit-scaled model's. Returns the files marked."""
    done = []
    for p in _weight_files(Path(directory), since):
        if is_marked(p):
            continue
        _save(p, {k: v.unsqueeze(0) for k, v in _load(p).items()}, marked=True)
        done.append(p)
    log.info("unit_scale_fx: marked %d weight file(s) in %s as a unit-scaled model's", len(done), directory)
    return done


@contextlib.contextmanager
def unmarked_view(directory: str | os.PathLike) -> Iterator[tuple[Path, bool]]:
    """A folder holding ``directory``'s files with its marked weight files unmarked (the folder itself when
    none are marked). Yields ``(folder, had_marked_files)``; the copy is removed on exit."""
    src = Path(directory)
    marked = [p for p in sorted(src.iterdir()) if _is_weight_file(p) and is_marked(p)]
    if not marked:
        yield src, False
        return
    tmp = Path(tempfile.mkdtemp(prefix="unit_scale_fx_load_"))
    try:
        for p in src.iterdir():
            if p in marked:
                _save(tmp / p.name, {k: v.squeeze(0) for k, v in _load(p).items()}, marked=False)
            elif p.is_file():
                try:
                    os.symlink(p.resolve(), tmp / p.name)
                except OSError:
                    shutil.copy2(p, tmp / p.name)
        yield tmp, True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unmark_state_dict(state_dict: Mapping[str, Any], own: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``state_dict`` with marked tensors (a leading axis of size 1 that the module's own tensor lacks)
    brought back to the module's shapes; every other entry as it is."""
    out = dict(state_dict)
    for k, v in state_dict.items():
        t = own.get(k)
        if (isinstance(v, torch.Tensor) and t is not None and v.dim() == t.dim() + 1 and v.shape[0] == 1
                and tuple(v.shape[1:]) == tuple(t.shape)):
            out[k] = v.squeeze(0)
    out.pop(f"__{MARK_KEY}__", None)
    return out
