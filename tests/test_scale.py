import torch

from unit_scale_fx.scale import scale, weighted_add


def test_scale_forward_and_backward_factors():
    x = torch.randn(8, 4, requires_grad=True)
    y = scale(x, 2.0, 0.25)
    torch.testing.assert_close(y, 2.0 * x)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.25))


def test_equal_factors_are_an_ordinary_product():
    x = torch.randn(5, requires_grad=True)
    y = scale(x, 3.0, 3.0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    assert scale(x, 1.0, 1.0) is x


def test_gradient_only_scale_keeps_values():
    x = torch.randn(5, requires_grad=True)
    y = scale(x, 1.0, 4.0)
    torch.testing.assert_close(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 4.0))


def test_weighted_add():
    a, b = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(weighted_add(a, b, 0.6, 0.8), 0.6 * a + 0.8 * b)
