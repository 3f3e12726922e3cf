"""The two training tasks and the precision recipes of the FP8 benchmarks (fp8_diagnostics.py, fp8_grid.py).

Tasks (no downloads; both are rebuilt bit-identically from a seed):

* ``char``: a character-level pre-LN GPT (``unit_scale_fx.examples.GPT``) on Python standard-library
  sources (``benchmarks/data.py``), next-character cross-entropy;
* ``image``: a small ViT (patch linear, learned positions, non-causal pre-LN blocks, mean pool,
  classifier) on a generated 10-class image set: each class is a fixed random pattern of Gaussian
  blobs and stripes; a sample is its class pattern shifted by up to ±1 pixel, with random contrast,
  a weaker pattern of another class on top and Gaussian noise. Classification cross-entropy.

Recipes (what ``build`` makes of a task's plain model):

* ``sp-fp32``: the model as written (GPT-2 style init), float32, ``torch.optim.Adam`` at ``lr``;
* ``sp-fp8-dynamic``: the same model with every matmul operand / output gradient rounded to
  E4M3 / E5M2 after **per-tensor dynamic scaling** (each tensor is multiplied by ``max / amax(tensor)``
  before the cast and divided after it: current scaling, the best case of TE / torchao recipes);
* ``us-fp32``: ``unit_scale(model, mup=True)`` (u-μP), float32, ``unit_scale_fx.training.optim.Adam``;
* ``us-fp8``: the same with static FP8 simulation (no scaling factors besides the unit-scaling ones);
* ``unit-fp32`` / ``unit-fp8``: plain unit scaling (``unit_scale(model)``, library defaults) instead of u-μP.

Every FP8 recipe uses the same per-op-kind format policy (``--policy``): ``fp8`` keeps attention's inner
matmuls and the readout in BF16 (``unit_scale_fx.lowp.formats.FP8_POLICY``), ``all`` rounds every
matmul-class op to FP8. FP32 recipes carry counting-only quantisers when ``count=True``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import VOCAB, char_data  # noqa: E402

from unit_scale_fx import unit_scale  # noqa: E402
from unit_scale_fx.examples import GPT, MLP  # noqa: E402
from unit_scale_fx.lowp.formats import FP8_POLICY, Quantise, round_to_format  # noqa: E402
from unit_scale_fx.lowp.simulate import format_sites, simulate_format  # noqa: E402
from unit_scale_fx.training import optim  # noqa: E402

RECIPES = ("sp-fp32", "sp-fp8-dynamic", "us-fp32", "us-fp8", "unit-fp32", "unit-fp8")
POLICIES = {"fp8": FP8_POLICY, "all": ()}


# ---------------------------------------------------------------------------------------------- image task


class EncoderAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = EncoderAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, 4 * d, gated=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Patches of a ``[B, C, H, W]`` image -> linear -> + positions -> pre-LN blocks -> mean -> LN -> classifier."""

    def __init__(self, image: int = 16, channels: int = 1, patch: int = 4, d: int = 64, layers: int = 2,
                 heads: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        n = (image // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, d)
        self.pos = nn.Parameter(torch.randn(n, d) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, img: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = img.shape
        p = self.patch
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        x = self.embed(x) + self.pos
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x.mean(dim=1)))
        return F.cross_entropy(logits, y)


def make_images(n: int, seed: int, classes: int = 10, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` generated images ``[n, 1, size, size]`` (per-image standardised) and their labels."""
    proto_gen = torch.Generator().manual_seed(0)  # the class patterns: the same for every split
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    protos = []
    for _ in range(classes):
        img = torch.zeros(size, size)
        for _ in range(3):  # three blobs of random place, width and sign
            cy, cx = (torch.rand(2, generator=proto_gen) * size).tolist()
            s = 1.5 + 2.5 * float(torch.rand(1, generator=proto_gen))
            sign = 1.0 if float(torch.rand(1, generator=proto_gen)) < 0.5 else -1.0
            img += sign * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        theta = float(torch.rand(1, generator=proto_gen)) * math.pi  # one stripe pattern of random angle
        freq = 0.3 + 0.6 * float(torch.rand(1, generator=proto_gen))
        img += 0.5 * torch.sin(freq * (math.cos(theta) * xx + math.sin(theta) * yy))
        protos.append((img - img.mean()) / img.std())
    protos_t = torch.stack(protos)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    other = (y + torch.randint(1, classes, (n,), generator=g)) % classes
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, generator=g)
    imgs = torch.empty(n, size, size)
    for i in range(n):
        base = torch.roll(protos_t[y[i]], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(0, 1))
        imgs[i] = contrast[i] * base + 0.6 * protos_t[other[i]]
    imgs += 1.0 * torch.randn(n, size, size, generator=g)
    imgs = (imgs - imgs.mean(dim=(1, 2), keepdim=True)) / imgs.std(dim=(1, 2), keepdim=True)
    return imgs.unsqueeze(1), y


# ------------------------------------------------------------------------------------------------- tasks


@dataclass
class Task:
    name: str
    make_model: Callable[[], nn.Module]
    train_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    val: list[tuple[torch.Tensor, torch.Tensor]]
    describe: str


def char_task(d: int = 64, layers: int = 2, heads: int = 2, seq: int = 64, batch: int = 16,
              val_batches: int = 16) -> Task:
    data = char_data()
    gv = torch.Generator().manual_seed(1234)
    val = [data.batch("val", batch, seq, gv) for _ in range(val_batches)]
    return Task("char", lambda: GPT(vocab=VOCAB, d=d, layers=layers, heads=heads, max_len=seq),
                lambda g: data.batch("train", batch, seq, g), val,
                f"char-level GPT d={d} layers={layers} heads={heads}, seq {seq}, batch {batch}; "
                f"val: {val_batches} fixed batches of the held-out 10% of the text")


def image_task(d: int = 64, layers: int = 2, heads: int = 2, batch: int = 64, n_train: int = 8192,
               n_val: int = 2048) -> Task:
    xt, yt = make_images(n_train, seed=1)
    xv, yv = make_images(n_val, seed=2)
    val = [(xv[i:i + 512], yv[i:i + 512]) for i in range(0, n_val, 512)]

    def train_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, n_train, (batch,), generator=g)
        return xt[idx], yt[idx]

    return Task("image", lambda: ViT(d=d, layers=layers, heads=heads), train_batch, val,
                f"ViT d={d} layers={layers} heads={heads}, 16x16 generated images, patch 4, 10 classes, batch {batch}; "
                f"{n_train} train / {n_val} val images")


TASKS = {"char": char_task, "image": image_task}


# ---------------------------------------------------------------------------------------- dynamic scaling


class _DynamicFn(torch.autograd.Function):
    """Per-tensor current scaling: ``round(x * s) / s`` with ``s = max / amax(x)``, forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, site: "DynamicQuantise") -> torch.Tensor:  # type: ignore[override]
        ctx.site = site
        return _scaled_round(x, site.fwd, site, "fwd")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _scaled_round(grad, ctx.site.bwd, ctx.site, "bwd"), None


def _scaled_round(x: torch.Tensor, spec, site: "DynamicQuantise", direction: str) -> torch.Tensor:
    if spec is None:
        return x
    if spec.max > 1e6:  # BF16 (the policy's high-precision ops): float32's range, no scaling (max/amax overflows)
        y = round_to_format(x, spec, site.saturate)
        if site.stats is not None:
            getattr(site.stats, direction).add(x, y, spec)
        return y
    with torch.no_grad():
        amax = x.detach().abs().amax().float()
        s = (spec.max / amax) if bool(torch.isfinite(amax) & (amax > 0)) else torch.tensor(1.0)
        xs = x * s.to(x.dtype)
        ys = round_to_format(xs, spec, site.saturate)
        if site.stats is not None:
            getattr(site.stats, direction).add(xs, ys, spec)
        return ys / s.to(x.dtype)


class DynamicQuantise(Quantise):
    """A :class:`Quantise` that scales each tensor by ``max / amax`` before the cast (set by ``dynamic_scaling``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        if self.fwd is None and self.bwd is None:
            return x
        return _DynamicFn.apply(x, self)


def dynamic_scaling(model: nn.Module) -> nn.Module:
    """Turn every quantiser of a format-simulated model into a per-tensor dynamically scaled one."""
    for site in format_sites(model).values():
        site.__class__ = DynamicQuantise
    return model


# ---------------------------------------------------------------------------------------------- recipes


def build(task: Task, recipe: str, lr: float, seed: int, policy: str = "fp8", count: bool = False
          ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model of ``recipe`` (see the module docstring) and its Adam optimizer at peak ``lr``."""
    torch.manual_seed(seed)
    model = task.make_model()
    kind, prec = recipe.rsplit("-", 1) if recipe != "sp-fp8-dynamic" else ("sp", "fp8")
    fp8 = prec == "fp8"
    hp = POLICIES[policy]
    if kind in ("us", "unit"):
        model = unit_scale(model, task.val[0], mup=(kind == "us"))
    if fp8 or count:
        model = simulate_format(model, "e4m3", "e5m2", passthrough=not fp8, high_precision=hp,
                                example_inputs=task.val[0])
    if recipe == "sp-fp8-dynamic":
        dynamic_scaling(model)
    if kind == "sp":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = optim.Adam(model, lr=lr)
    return model, opt


def schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 10% of the steps, then cosine decay to 10% of the peak (as lr_transfer.py)."""
    warm = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))


@torch.no_grad()
def evaluate(model: nn.Module, task: Task) -> float:
    model.eval()
    v = sum(float(model(x, y)) for x, y in task.val) / len(task.val)
    model.train()
    return v if math.isfinite(v) else float("nan")
