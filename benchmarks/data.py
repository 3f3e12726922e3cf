"""A small, deterministic character-level corpus: Python standard-library sources.

The text is the concatenation, in this order, of these files of the running
Python's standard library (``sysconfig.get_paths()["stdlib"]``)::

    argparse.py  difflib.py  textwrap.py  inspect.py  typing.py  dataclasses.py
    functools.py  enum.py  string.py  fractions.py  shlex.py  pprint.py

Characters outside ASCII become ``"?"``, so the vocabulary is the 128 ASCII
codes. The first 90% of the text is the training split, the last 10% the
validation split. The same Python version gives the same text; the file list
is fixed so that every benchmark that imports this module sees the same data.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass

import torch

FILES = ("argparse.py", "difflib.py", "textwrap.py", "inspect.py", "typing.py", "dataclasses.py",
         "functools.py", "enum.py", "string.py", "fractions.py", "shlex.py", "pprint.py")
VOCAB = 128


def load_text() -> str:
    """The corpus text (raises FileNotFoundError naming a missing file)."""
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in FILES:
        path = os.path.join(root, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"benchmarks/data.py: standard-library file {path} is missing")
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    return "\n".join(parts)


@dataclass
class CharData:
    train: torch.Tensor  # int64 token ids
    val: torch.Tensor

    def batch(self, split: str, batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of shape ``[batch, seq]``: random windows of the split."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
        idx = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def char_data() -> CharData:
    text = load_text()
    ids = torch.tensor([c if c < VOCAB else ord("?") for c in text.encode("ascii", errors="replace")],
                       dtype=torch.long)
    cut = int(0.9 * ids.numel())
    return CharData(ids[:cut], ids[cut:])
