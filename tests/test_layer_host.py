"""`MoLFLinear`'s lean forward (issue #32: the step is bound by the host) decides and
reads everything afresh on every call: hooks added after a first call, parameter
objects swapped (as FSDP2 does) or converted (`module.to`) all take effect; and the
Function's backward is exact with and without `create_graph` (where it skips
once_differentiable's no_grad context, and where it keeps it)."""

from __future__ import annotations

import pytest
import torch
import transformers  # noqa: E402  (test dependency: a missing one fails, never skips)
from torch import nn
from torch.nn import functional as F

import molf

IN, OUT, TOKENS = 6, 5, 7
TIGHT = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here on one torch thread (conftest's `one_thread`)."""


def make_layer(arch="linear", bias=True, ranks=(2, 3)):
    torch.manual_seed(0)
    if arch == "linear":
        base = nn.Linear(IN, OUT, bias=bias)
    else:
        base = transformers.pytorch_utils.Conv1D(OUT, IN)
    layer = molf.MoLFLinear(base.double(), ranks=ranks, scales=tuple(0.5 + i for i in range(len(ranks))))
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    return layer


def composed(layer, x):
    """The plain composition, from the layer's current parameters (independent of the Function)."""
    w, b = layer.base.weight, layer.base.bias
    y = (x @ w + b) if layer.transposed else F.linear(x, w, b)
    for a, bb, s in zip(layer.lora_A, layer.lora_B, layer.scales):
        y = y + s * (x @ a.T) @ bb.T
    return y


def grads(layer, x, forward):
    params = [p for p in layer.parameters() if p.requires_grad]
    y = forward(x)
    return (y, *torch.autograd.grad(y.pow(2).sum(), [x, *params]))


@pytest.mark.parametrize("arch,bias", [("linear", True), ("linear", False), ("conv1d", True)])
@pytest.mark.parametrize("shape", [(TOKENS, IN), (2, TOKENS, IN)])
def test_function_matches_composition_in_either_input_rank(arch, bias, shape):
    """2-d inputs skip the reshape and view of the n-d path; both are exact."""
    layer = make_layer(arch, bias)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ == "RoutedLinearFunctionBackward"
    for got, want in zip(grads(layer, x, layer), grads(layer, x, lambda x: composed(layer, x))):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **TIGHT)


def test_create_graph_gives_the_same_first_order_gradients():
    """Under create_graph the backward runs with grad mode on (once_differentiable's
    path): the same gradients as a plain backward, and a double backward still raises."""
    layer = make_layer()
    x = torch.randn(2, TOKENS, IN, dtype=torch.float64, requires_grad=True)
    params = [x, *layer.parameters()]
    plain = torch.autograd.grad(layer(x).pow(2).sum(), params)
    graphed = torch.autograd.grad(layer(x).pow(2).sum(), params, create_graph=True)
    for g, want in zip(graphed, plain):
        torch.testing.assert_close(g, want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        graphed[0].sum().backward()


def test_hooks_added_after_a_call_take_effect():
    layer = make_layer()
    x = torch.randn(TOKENS, IN, dtype=torch.float64)
    assert type(layer(x).grad_fn).__name__ == "RoutedLinearFunctionBackward"
    seen = []
    handle = layer.base.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    y = layer(x)
    assert seen == [(TOKENS, IN)]
    torch.testing.assert_close(y, composed(layer, x), **TIGHT)
    handle.remove()
    assert type(layer(x).grad_fn).__name__ == "RoutedLinearFunctionBackward"
    assert seen == [(TOKENS, IN)]


def test_train_eval_switch_with_dropout_takes_effect_each_call():
    layer = molf.MoLFLinear(nn.Linear(IN, OUT).double(), ranks=(2,), scales=(1.0,), dropout=0.5)
    x = torch.randn(TOKENS, IN, dtype=torch.float64)
    assert type(layer.eval()(x).grad_fn).__name__ == "RoutedLinearFunctionBackward"
    assert type(layer.train()(x).grad_fn).__name__ == "AddBackward0"
    assert type(layer.eval()(x).grad_fn).__name__ == "RoutedLinearFunctionBackward"


def test_swapped_and_converted_parameters_are_read_each_call():
    """New parameter objects (FSDP2 registers its own) and `module.to(dtype)` after a
    first call: the next call computes with them and their gradients land on them."""
    layer = make_layer()
    x = torch.randn(TOKENS, IN, dtype=torch.float64)
    layer(x)
    new_w = nn.Parameter(torch.randn(OUT, IN, dtype=torch.float64))
    new_a = nn.Parameter(torch.randn(2, IN, dtype=torch.float64))
    layer.base.weight = new_w
    layer.lora_A[0] = new_a
    y = layer(x)
    torch.testing.assert_close(y, composed(layer, x), **TIGHT)
    y.sum().backward()
    assert new_w.grad is not None and new_a.grad is not None

    layer.float()
    y32 = layer(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, composed(layer, x.float()), rtol=1e-5, atol=1e-5)
