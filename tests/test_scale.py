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


def test_a_returned_backward_only_scale_is_a_native_copy_with_the_functions_gradient():
    """``scale_returned`` in eager training: a native multiply by a 0-dim factor set to the backward factor
    after forward (no Python ``autograd.Function``); under saved-tensor hooks, the Function. Both give the
    same copy (not a view: the caller may scale it in place, ``loss *= k``) and the gradient times the
    backward factor."""
    from unit_scale_fx.scale import scale_returned

    a0 = torch.randn(3, 4, dtype=torch.float64)
    grads = []
    for hooks in (False, True):
        a = a0.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if hooks else torch.enable_grad():
            loss = scale_returned(a.square().mean(), 1.0, 7.0)
        assert (type(loss.grad_fn).__name__ == "MulBackward0") == (not hooks)
        assert not loss._is_view() and loss.item() == a.square().mean().item()
        loss *= 0.5  # as transformers.Trainer scales a loss
        loss.backward()
        torch.testing.assert_close(a.grad, 0.5 * 7.0 * 2 * a.detach() / a.numel(), rtol=1e-12, atol=0)
        grads.append(a.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
