"""`routed_linear` (one autograd Function for the routed layer) against the plain
composition base(x) + Σ s_i F.linear(F.linear(x, A_i), B_i): outputs and every
gradient, in float64 to 1e-12, and under autocast, torch.compile, gradient
checkpointing and gradient accumulation; `MoLFLinear` takes it where it may."""

from __future__ import annotations

import collections
import contextlib
import itertools

import pytest
import torch
import transformers  # noqa: E402  (test dependency: a missing one fails, never skips)
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import molf
from molf.routed_linear import routed_linear

IN, OUT, TOKENS = 6, 5, 7
TIGHT = dict(rtol=1e-12, atol=1e-12)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here on one torch thread (conftest's `one_thread`)."""


def operands(kind, ranks, fft=True, dtype=torch.float64, device="cpu", seed=0):
    """weight, bias, A_i, B_i (B non-zero, so every expert shows in y); W and b
    frozen when not `fft` (MoLF-Efficient)."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_(grad)

    weight = leaf(IN, OUT, grad=fft) if kind == "conv1d" else leaf(OUT, IN, grad=fft)
    bias = None if kind == "nobias" else leaf(OUT, grad=fft)
    lora_a = [leaf(r, IN) for r in ranks]
    lora_b = [leaf(OUT, r) for r in ranks]
    scales = tuple(0.5 + 0.75 * i for i in range(len(ranks)))
    return weight, bias, lora_a, lora_b, scales


def composed(x, weight, bias, lora_a, lora_b, scales, transposed):
    """The composition MoLFLinear ran before: the base layer (nn.Linear's F.linear, or
    HF Conv1D's addmm on the flattened input), then one scaled add per expert."""
    if transposed:
        flat = x.reshape(-1, x.shape[-1])
        y = (flat @ weight if bias is None else torch.addmm(bias, flat, weight)).view(*x.shape[:-1], -1)
    else:
        y = F.linear(x, weight, bias)
    for a, b, s in zip(lora_a, lora_b, scales):
        y = y + s * F.linear(F.linear(x, a), b)
    return y


def leaves(x, weight, bias, lora_a, lora_b):
    return {
        "x": x,
        "W": weight,
        "b": bias,
        **{f"A{i}": a for i, a in enumerate(lora_a)},
        **{f"B{i}": b for i, b in enumerate(lora_b)},
    }


def run_both(x, ops, transposed, upstream_list, forward_context=contextlib.nullcontext):
    """Outputs and accumulated gradients (one backward per upstream gradient) of the
    Function and of the composition, on separate copies of the same leaves; each
    forward under `forward_context()`."""

    def copy(t):
        return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)

    results = []
    for fn in (routed_linear, composed):
        x_ = copy(x)
        weight, bias, lora_a, lora_b, scales = ops
        weight, bias = copy(weight), copy(bias)
        lora_a, lora_b = [copy(a) for a in lora_a], [copy(b) for b in lora_b]
        ys = []
        for upstream in upstream_list:
            with forward_context():
                y = fn(x_, weight, bias, lora_a, lora_b, scales, transposed)
            if y.requires_grad:  # nothing to differentiate: MoLF-Efficient without experts, x constant
                (y * upstream).sum().backward()
            ys.append(y.detach())
        grads = {n: (None if t is None else t.grad) for n, t in leaves(x_, weight, bias, lora_a, lora_b).items()}
        requires = {n: (t is not None and t.requires_grad) for n, t in leaves(x_, weight, bias, lora_a, lora_b).items()}
        results.append((ys, grads, requires))
    return results


def normwise_close(rel):
    """A comparison for low-precision results: ‖a − b‖ ≤ rel · ‖b‖ (elementwise
    tolerances fail on the entries that cancellation leaves near zero)."""

    def check(a, b, msg=None):
        err = (a.double() - b.double()).norm() / b.double().norm()
        assert err <= rel, f"{msg or ''} normwise relative error {err:.3g} > {rel}"

    return check


def assert_same(got, want, close=None, **tol):
    close = close or (lambda a, b, msg=None: torch.testing.assert_close(a, b, **tol, msg=msg))
    (ys, grads, requires), (ys_ref, grads_ref, requires_ref) = got, want
    assert requires == requires_ref
    for y, y_ref in zip(ys, ys_ref):
        assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
        close(y, y_ref, msg="output")
    for name, g_ref in grads_ref.items():
        g = grads[name]
        if g_ref is None:
            assert g is None, f"{name} got a gradient it does not need"
            continue
        assert g is not None and g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        close(g, g_ref, msg=f"grad of {name}")


@pytest.mark.parametrize(
    "kind,fft,ranks,dims,x_grad",
    list(itertools.product(["bias", "nobias", "conv1d"], [True, False], [(), (3,), (2, 4)], [1, 2, 3], [True, False])),
)
def test_matches_composition_float64(kind, fft, ranks, dims, x_grad):
    ops = operands(kind, ranks, fft)
    shape = {1: (IN,), 2: (TOKENS, IN), 3: (2, TOKENS, IN)}[dims]
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(x_grad)
    upstream = torch.randn(*shape[:-1], OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got, want = run_both(x, ops, kind == "conv1d", [upstream])
    assert_same(got, want, **TIGHT)


@pytest.mark.parametrize("kind", ["bias", "conv1d"])
def test_gradient_accumulation(kind):
    """Two backward calls add up into .grad exactly as the composition's do."""
    ops = operands(kind, (3, 2))
    x = torch.randn(2, TOKENS, IN, dtype=torch.float64).requires_grad_()
    upstreams = [torch.randn(2, TOKENS, OUT, dtype=torch.float64) for _ in range(2)]
    got, want = run_both(x, ops, kind == "conv1d", upstreams)
    assert_same(got, want, **TIGHT)


@pytest.mark.parametrize("kind", ["bias", "conv1d"])
def test_non_contiguous_input_and_upstream_gradient(kind):
    ops = operands(kind, (3,))
    x = torch.randn(IN, 2, TOKENS, dtype=torch.float64).permute(1, 2, 0).requires_grad_()
    assert not x.is_contiguous()
    # An upstream gradient that reaches the layer transposed (not contiguous in y's layout).
    upstream = torch.randn(2, OUT, TOKENS, dtype=torch.float64).transpose(1, 2)
    got, want = run_both(x, ops, kind == "conv1d", [upstream])
    assert_same(got, want, **TIGHT)


@pytest.mark.parametrize("kind", ["bias", "nobias", "conv1d"])
def test_gradcheck(kind):
    weight, bias, lora_a, lora_b, scales = operands(kind, (2, 3))
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    n = len(lora_a)
    inputs = (x, weight, *([bias] if bias is not None else []), *lora_a, *lora_b)

    def fn(x, weight, *rest):
        b, rest = (rest[0], rest[1:]) if bias is not None else (None, rest)
        return routed_linear(x, weight, b, rest[:n], rest[n:], scales, kind == "conv1d")

    assert torch.autograd.gradcheck(fn, inputs)


class CountGemms(TorchDispatchMode):
    """Counts the aten GEMMs and sums that run (the backward's included)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_", "sum"):
            self.calls["sum" if name == "sum" else "gemm"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "fft,x_grad,gemms,sums",
    [
        (True, True, 2 + 4 * 2, 1),  # dx, dW; per expert dB, gy B, dA, dx += …; db
        (False, True, 1 + 4 * 2, 0),  # frozen W and b: no dW, no db
        (False, False, 3 * 2, 0),  # and an input that needs no gradient: no dx at all
    ],
)
def test_backward_skips_what_nobody_needs(fft, x_grad, gemms, sums):
    weight, bias, lora_a, lora_b, scales = operands("bias", (2, 3), fft)
    x = torch.randn(TOKENS, IN, dtype=torch.float64, requires_grad=x_grad)
    loss = routed_linear(x, weight, bias, lora_a, lora_b, scales).sum()
    with CountGemms() as counted:
        loss.backward()
    assert counted.calls == collections.Counter(gemm=gemms, sum=sums) - collections.Counter()


def test_double_backward_raises_rather_than_being_wrong():
    weight, bias, lora_a, lora_b, scales = operands("bias", (2,))
    x = torch.randn(TOKENS, IN, dtype=torch.float64, requires_grad=True)
    y = routed_linear(x, weight, bias, lora_a, lora_b, scales)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gx.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["bias", "conv1d"])
@pytest.mark.parametrize("fft", [True, False])
def test_autocast_matches_composition(device, kind, fft):
    """float32 leaves under bf16 autocast: the output in bf16 as F.linear's, the
    gradients in float32 and close to the composition's under the same autocast."""
    ops = operands(kind, (3, 2), fft, dtype=torch.float32, device=device)
    x = torch.randn(2, TOKENS, IN, device=device).requires_grad_()
    upstream = torch.randn(2, TOKENS, OUT, device=device)
    got, want = run_both(x, ops, kind == "conv1d", [upstream], lambda: torch.autocast(device, dtype=torch.bfloat16))
    assert got[0][0].dtype == torch.bfloat16
    assert all(g is None or g.dtype == torch.float32 for g in got[1].values())
    # The Function rounds to bf16 once per GEMM where the composition rounds every add:
    # a few bf16 roundings (2^-8 each) apart.
    assert_same(got, want, close=normwise_close(2e-2))


# ------------------------------------------------------------------- the layer


def wrapped_stack(ranks=(2, 3), dropout=0.0, fft=True, dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, OUT))
    model = molf.wrap(model.to(dtype), molf.MoLFConfig(ranks=ranks, dropout=dropout, fft=fft, exclude_modules=()))
    with torch.no_grad():
        for _, layer in molf.routed_modules(model):
            for b in layer.lora_B:
                b.normal_()
    return model


def layer_composed(layer, x):
    y = layer.base(x)
    h = layer.lora_dropout(x)
    for a, b, s in zip(layer.lora_A, layer.lora_B, layer.scales):
        y = y + s * F.linear(F.linear(h, a), b)
    return y


def grads_of(model, x, forward=None):
    for p in model.parameters():
        p.grad = None
    y = (forward or model)(x)
    y.pow(2).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, close=None, **tol):
    close = close or (lambda a, b, msg=None: torch.testing.assert_close(a, b, **tol, msg=msg))
    (y, ga), (y_ref, gb) = a, b
    close(y, y_ref, msg="output")
    assert ga.keys() == gb.keys()
    for n in ga:
        close(ga[n], gb[n], msg=n)


@pytest.mark.parametrize("arch", ["linear", "conv1d"])
def test_layer_takes_the_function_and_matches_composition(arch):
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT) if arch == "linear" else transformers.pytorch_utils.Conv1D(OUT, IN)
    layer = molf.MoLFLinear(base.double(), ranks=(2, 3), scales=(0.5, 2.0))
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(2, TOKENS, IN, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "RoutedLinearFunctionBackward"
    gx, *gp = torch.autograd.grad(y.pow(2).sum(), [x, *layer.parameters()])
    y_ref = layer_composed(layer, x)
    gx_ref, *gp_ref = torch.autograd.grad(y_ref.pow(2).sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y, y_ref, **TIGHT)
    for g, g_ref in zip([gx, *gp], [gx_ref, *gp_ref]):
        torch.testing.assert_close(g, g_ref, **TIGHT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["bias", "nobias", "conv1d"])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("autocast", [False, True])
def test_no_grad_forward_is_the_functions_forward(device, kind, dims, autocast, monkeypatch):
    """Without a graph (evaluation, the probe's shrink trials) the layer skips the Function's
    machinery: the same kernels, so the output is bitwise the Function's, under autocast too."""
    ops = operands(kind, (3, 2), dtype=torch.float32, device=device)
    x = torch.randn(*[2, 3][: dims - 1], TOKENS, IN, device=device)
    weight, bias, lora_a, lora_b, scales = ops
    ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    with ctx():
        want = routed_linear(x, weight, bias, lora_a, lora_b, scales, kind == "conv1d")
        assert want.grad_fn is not None
        with torch.no_grad():
            calls = []
            monkeypatch.setattr(molf.routed_linear.RoutedLinearFunction, "apply", lambda *a: calls.append(a))
            got = routed_linear(x, weight, bias, lora_a, lora_b, scales, kind == "conv1d")
    assert not calls and got.grad_fn is None
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want.detach())


def test_layer_without_grad_skips_the_function(monkeypatch):
    layer = molf.MoLFLinear(nn.Linear(IN, OUT).double(), ranks=(2, 3), scales=(0.5, 2.0))
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(2, TOKENS, IN, dtype=torch.float64)
    function = molf.routed_linear.RoutedLinearFunction
    with monkeypatch.context() as patch:
        patch.setattr(function, "apply", lambda *a: pytest.fail("the Function ran without grad"))
        with torch.no_grad():
            y = layer(x)
        with torch.inference_mode():
            y_inference = layer(x)
    want = layer(x)
    assert type(want.grad_fn).__name__ == "RoutedLinearFunctionBackward"
    assert torch.equal(y, want.detach()) and torch.equal(y_inference, want.detach())
    torch.testing.assert_close(y, layer_composed(layer, x).detach(), **TIGHT)


def test_layer_keeps_the_composition_where_it_must():
    """LoRA dropout in training, no LoRA expert, hooks on the base layer: the
    composition (dropout draws its mask; the base's hooks run); dropout in eval mode
    is the identity, so the Function serves."""
    x = torch.randn(3, IN, dtype=torch.float64)
    layer = molf.MoLFLinear(nn.Linear(IN, OUT).double(), ranks=(2,), scales=(1.0,), dropout=0.5)
    with torch.no_grad():
        layer.lora_B[0].normal_()
    assert type(layer.train()(x).grad_fn).__name__ == "AddBackward0"
    assert type(layer.eval()(x).grad_fn).__name__ == "RoutedLinearFunctionBackward"
    torch.testing.assert_close(layer(x), layer_composed(layer, x), **TIGHT)

    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    torch.testing.assert_close(y, layer_composed(layer, x), rtol=0, atol=0)

    dense_only = molf.MoLFLinear(nn.Linear(IN, OUT).double(), ranks=(), scales=())
    assert type(dense_only(x).grad_fn).__name__ == "AddmmBackward0"

    plain = molf.MoLFLinear(nn.Linear(IN, OUT).double(), ranks=(2,), scales=(1.0,))
    seen = []
    plain.base.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    plain(x)
    assert seen == [(3, OUT)]


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    model = wrapped_stack()
    x = torch.randn(2, TOKENS, IN, dtype=torch.float64, requires_grad=True)
    want = grads_of(model, x)
    got = grads_of(model, x, lambda x: checkpoint(model, x, use_reentrant=reentrant))
    assert_grads_close(got, want, **TIGHT)


def test_efficient_model_skips_frozen_gradients():
    """MoLF-Efficient: W and b frozen get no gradient; the first layer's input needs none."""
    model = wrapped_stack(fft=False)
    x = torch.randn(2, TOKENS, IN, dtype=torch.float64)
    _, grads = grads_of(model, x)
    assert grads and all(".lora_" in n for n in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


@pytest.mark.parametrize("fft", [True, False])
def test_compile_fullgraph(fft):
    """torch.compile traces the Function without a graph break (fullgraph=True raises on
    one), forward and backward through AOTAutograd, and computes what eager does."""
    model = wrapped_stack(fft=fft)
    x = torch.randn(2, TOKENS, IN, dtype=torch.float64, requires_grad=True)
    want = grads_of(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = grads_of(model, x, compiled)
    assert_grads_close(got, want, **TIGHT)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0


@pytest.mark.slow  # inductor compiles C++ kernels: a minute on a small CPU
def test_compile_inductor():
    model = wrapped_stack(dtype=torch.float32)
    x = torch.randn(2, TOKENS, IN, requires_grad=True)
    want = grads_of(model, x)
    torch._dynamo.reset()
    got = grads_of(model, x, torch.compile(model, fullgraph=True))
    # float32, and inductor's kernels sum in their own order.
    assert_grads_close(got, want, close=normwise_close(1e-5))
