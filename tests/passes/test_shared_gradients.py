"""Biases whose gradient sums rows that share it. The rules take the rows a bias sums as independent
(``sqrt(rows)``). Attention's value gradient ``A^T g`` is not: each row of ``A`` sums to 1, so every key position
holds the mean of ``g``, and a bias added to the values (BERT's, Whisper's, SigLIP's ``v_proj.bias``) sums it
coherently: 3-10x unit before. Under a global average pool every position gets the same gradient: convolution
biases were 19-29x. The attention rule gives the value gradient's cross-position correlation and the pool gives
1 (``Scales.grad_rho``), the reverse sweep carries it, and a bias's rule says its gain when the gradient is shared
(``Scales.shared_grad_gain``): ``calibrate_grads`` then corrects the rule's scale for the bias."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import gradient_cosines, rms
from unit_scale_fx import unit_scale
from unit_scale_fx.rules.attention import value_grad_rho


class Layer(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class Encoder(nn.Module):
    """BERT in small: post-norm layers, biases everywhere, the first token read out."""

    def __init__(self, vocab: int = 100, d: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.emb, self.pos, self.ln = nn.Embedding(vocab, d), nn.Embedding(32, d), nn.LayerNorm(d)
        self.layers = nn.Sequential(*[Layer(d) for _ in range(layers)])
        self.head = nn.Linear(d, 10)

    def forward(self, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.ln(self.emb(ids) + self.pos.weight[: ids.shape[1]])
        return F.cross_entropy(self.head(self.layers(x)[:, 0]), y)


def _batch(seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (8, 32), generator=g), torch.randint(0, 10, (8,), generator=g)


def test_value_biases_get_unit_gradients():
    torch.manual_seed(0)
    us = unit_scale(Encoder(), _batch(0), unsupported="error")
    us(*_batch(1)).backward()
    # (the key biases' true gradient is zero: softmax ignores what every key adds to a query's logits alike)
    biases = {k: rms(p.grad) for k, p in us.named_parameters() if p.dim() == 1 and rms(p.grad) > 1e-6}
    assert {"layers.0.v.bias", "layers.1.v.bias"} <= set(biases)
    assert all(0.5 <= v <= 2.0 for v in biases.values()), {k: v for k, v in biases.items() if not 0.5 <= v <= 2}
    cos = gradient_cosines(us, *_batch(2))
    assert min(cos.values()) > 0.9999, min(cos.values())


@pytest.mark.parametrize("logit_std", [0.0, 1.0, 3.0])
def test_value_gradient_correlation_matches_sampling(logit_std):
    """``rho`` = (mean over keys of ``A^T g``)^2 / mean over keys of (``A^T g``)^2, over many draws."""
    d, t = 16, 24
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2000, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(2000, t, d, generator=g, dtype=torch.float64)
    a = torch.softmax(q @ k.transpose(-1, -2) * (logit_std / math.sqrt(d)), -1)
    vg = a.transpose(-1, -2) @ torch.randn(2000, t, 1, generator=g, dtype=torch.float64)
    sampled = float(vg.mean(-2).pow(2).mean() / vg.pow(2).mean())
    predicted = value_grad_rho(logit_std, d, (t,) * t, t)
    assert predicted == pytest.approx(sampled, rel=0.1, abs=0.02), (predicted, sampled)


class ConvNet(nn.Module):
    """Convolutions with biases, read out through a global average pool: every position of a sample gets the same
    gradient, and a convolution's bias sums it over the positions coherently."""

    def __init__(self, c: int = 32, readout: str = "pool") -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(3 if i == 0 else c, c, 3, padding=1) for i in range(3))
        self.head = nn.Linear(c, 10)
        self.readout = readout

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.c1(x))
        h = h + F.gelu(self.c2(h))
        h = h + F.gelu(self.c3(h))
        # a global average: a pool, or a mean over the image's last two dimensions (Hugging Face's ConvNeXt)
        pooled = F.adaptive_avg_pool2d(h, 1).flatten(1) if self.readout == "pool" else h.mean((2, 3))
        return F.cross_entropy(self.head(pooled), y)


def _images(seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


@pytest.mark.parametrize("readout", ["pool", "mean"])
def test_convolution_biases_under_a_global_average_get_unit_gradients(readout):
    torch.manual_seed(0)
    us = unit_scale(ConvNet(readout=readout), _images(0), unsupported="error")
    us(*_images(1)).backward()
    biases = {k: rms(p.grad) for k, p in us.named_parameters() if p.dim() == 1}
    assert all(0.5 <= v <= 2.0 for v in biases.values()), biases  # 19-23 before
    cos = gradient_cosines(us, *_images(2))
    assert min(cos.values()) > 0.9999, min(cos.values())


def _sweep_rho(model: nn.Module, x: torch.Tensor, value: bool = False) -> dict[str, float]:
    """The reverse sweep's predicted cross-position correlation of each node's gradient (``value``: its coherence
    with the node's own values), planned on ``x``."""
    from unit_scale_fx.passes.plan import true_grad_rms

    from helpers import pipeline_until

    gm, ctx, _ = pipeline_until(model, (x,), "rewrite")
    rho: dict = {}
    val: dict = {}
    true_grad_rms(gm, ctx.scales, rho_out=rho, value_out=val)
    return {n.name: r for n, r in (val if value else rho).items()}


def _sampled_rho(g: torch.Tensor) -> float:
    """``(mean over positions of g)^2 / mean of g^2``, over samples and channels: ``g`` is ``(N, C, ...)``."""
    return float(g.flatten(2).mean(2).pow(2).mean() / g.pow(2).mean())


class _Head(nn.Module):
    """``op(x)`` read out by a global average: the gradient of ``op``'s output is the same at every position."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.op(x), 1).flatten(1).sum(1).mean()


@pytest.mark.parametrize("op", ["relu", "gelu", "max_pool", "batch_norm"])
def test_gradient_correlation_through_an_op_matches_sampling(op):
    """What a gradient shared by every position keeps of its correlation through a ReLU's mask (half), a GELU's
    derivative, a max pool (1 / window: each window's gradient goes to one position) and a batch norm in training
    (each channel's gradient then sums to zero over the batch's rows: nothing shared is left for a sum over them)."""
    torch.manual_seed(0)
    fn = {"relu": F.relu, "gelu": F.gelu, "max_pool": lambda t: F.max_pool2d(t, 2),
          "batch_norm": nn.BatchNorm2d(8)}[op]
    model = _Head(fn)
    x = torch.randn(64, 8, 8, 8, requires_grad=True)
    model(x).backward()
    # the gradient reaching x, against the sweep's prediction for the op's input
    predicted = _sweep_rho(copy.deepcopy(model), x.detach())["x"]
    sampled = _sampled_rho(x.grad)
    if op == "batch_norm":
        summed = x.grad.sum((0, 2, 3))  # what a bias before the batch norm would read
        assert float(summed.abs().max()) < 1e-5
        assert predicted == 0.0
    else:
        assert predicted == pytest.approx(sampled, rel=0.1, abs=0.01), (predicted, sampled)
        assert predicted < 0.9  # the output's gradient: 1


@pytest.mark.parametrize("op", ["relu", "gelu"])
def test_gradient_coherence_with_the_values_through_a_pointwise_op_matches_sampling(op):
    """A gradient shared by every position, through ``f``: ``f'(x)`` follows ``x`` (a ReLU passes the positive values),
    so the input gradient sums coherently against ``x``'s own fluctuation, as a batch norm's gain before the op
    reads it: ``(mean over positions of g x_hat)^2 / mean of g^2`` is ``E[f'(x) x]^2 / E[f'(x)^2]`` (a ReLU: 1 / pi)."""
    torch.manual_seed(0)
    model = _Head({"relu": F.relu, "gelu": F.gelu}[op])
    x = torch.randn(64, 8, 8, 8, requires_grad=True)
    model(x).backward()
    g, xh = x.grad, x.detach()
    sampled = float((g * xh).flatten(2).mean(2).pow(2).mean() / g.pow(2).mean())
    predicted = _sweep_rho(copy.deepcopy(model), x.detach(), value=True)["x"]
    assert predicted == pytest.approx(sampled, rel=0.1), (predicted, sampled)
    if op == "relu":
        assert predicted == pytest.approx(1 / math.pi, rel=0.02)


class _ReluMean(nn.Module):
    """A ReLU then a mean over the image's positions, then a classifier (MNASNet's and ShuffleNetV2's readout): the
    fuse pass makes the ReLU and the mean one region, whose rule probes them together."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(F.relu(x).mean((2, 3))), torch.arange(x.shape[0]) % 10)


def test_a_fused_readout_gives_its_input_gradient_correlation_and_coherence():
    """The region's probe gives what a pool and the ReLU before it give apart: every position the same gradient,
    times the ReLU's mask (correlation one half), following the values (``1 / pi``). Without it the sweep saw no
    shared gradient there (both 0), and MNASNet's and ShuffleNetV2's last batch-norm gains and biases had gradients
    4-5 times unit at ImageNet's sizes (``benchmarks/unseen_torchvision.py --imagenet``)."""
    from helpers import pipeline_until

    torch.manual_seed(0)
    x = torch.randn(64, 8, 7, 7, requires_grad=True)
    _ReluMean()(x).backward()
    g = x.grad
    sampled = (_sampled_rho(g), float((g * x.detach()).flatten(2).mean(2).pow(2).mean() / g.pow(2).mean()))
    gm, _, _ = pipeline_until(_ReluMean(), (x.detach(),), "rewrite")
    assert any(n.op == "call_module" and n.target.startswith("us_fused") for n in gm.graph.nodes)
    predicted = (_sweep_rho(_ReluMean(), x.detach())["x"], _sweep_rho(_ReluMean(), x.detach(), value=True)["x"])
    assert predicted == pytest.approx(sampled, rel=0.1), (predicted, sampled)
    assert predicted[1] == pytest.approx(1 / math.pi, rel=0.1)  # the probe samples it


class _PatchMerge(nn.Module):
    """Swin's patch merging (four strided slices side by side, a linear) on channels-last images, then a mean over
    the positions and a classifier."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.reduce, self.fc = nn.Linear(4 * c, 2 * c), nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return F.cross_entropy(self.fc(self.reduce(merged).mean((1, 2))), torch.arange(x.shape[0]) % 10)


def test_gradient_correlation_through_patch_merging_matches_sampling():
    """Each strided slice's gradient is zero between the positions it took, and the four slices' shared parts come
    from different columns of the linear: the input's gradient keeps a quarter of the correlation. The sweep carried
    all of it before (torchvision's Swin-T: biases 0.07-0.44 as their corrections took the stream's gradient as
    shared; `benchmarks/unseen_torchvision.py`)."""
    torch.manual_seed(0)
    x = torch.randn(32, 8, 8, 16, requires_grad=True)
    _PatchMerge()(x).backward()
    sampled = float(x.grad.flatten(1, -2).mean(1).pow(2).mean() / x.grad.pow(2).mean())
    predicted = _sweep_rho(_PatchMerge(), x.detach())["x"]
    assert predicted == pytest.approx(sampled, rel=0.2), (predicted, sampled)
    assert predicted < 0.4  # the merged positions' gradient: 1


class _Interleaved(_PatchMerge):
    """Even and odd channels side by side (interleaved rotary halves): a strided slice of channels, not positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = torch.cat([x[..., 0::2], x[..., 1::2], x[..., 0::2], x[..., 1::2]], -1)
        return F.cross_entropy(self.fc(self.reduce(halves).mean((1, 2))), torch.arange(x.shape[0]) % 10)


def test_a_strided_split_of_channels_keeps_the_correlation():
    torch.manual_seed(0)
    x = torch.randn(32, 8, 8, 16, requires_grad=True)
    _Interleaved(c=8)(x).backward()
    sampled = float(x.grad.flatten(1, -2).mean(1).pow(2).mean() / x.grad.pow(2).mean())
    predicted = _sweep_rho(_Interleaved(c=8), x.detach())["x"]
    assert sampled > 0.9 and predicted == pytest.approx(sampled, rel=0.1), (predicted, sampled)
