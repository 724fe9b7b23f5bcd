"""`molf._graph_cache.GraphCache`: fixed work run eagerly once, then captured and replayed as a
CUDA graph that reads its inputs' current values; a key whose capture fails stays eager; the
last few keys kept. And the held-out probe's spectral trial through it, probe after probe."""

from __future__ import annotations

import pytest
import torch

from molf import _shrink
from molf._graph_cache import GraphCache

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@cuda
def test_eager_then_captured_then_replayed_reading_the_current_values():
    x = torch.arange(6.0, device="cuda")
    runs = []

    def fn():
        runs.append(1)
        return [x * 2, (x @ x).reshape(1)]

    cache, side = GraphCache(), torch.cuda.Stream()
    for k in range(5):
        x.add_(1.0)
        with torch.cuda.stream(side):
            side.wait_stream(torch.cuda.current_stream())
            out = cache.run("k", fn)
        torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(out[0], x * 2) and torch.equal(out[1], (x @ x).reshape(1)), k
    assert len(runs) == 2  # the warm-up and the capture: the Python ran twice, the graph replayed thrice


@cuda
def test_a_key_whose_capture_fails_stays_eager():
    x = torch.ones(3, device="cuda")
    runs = []

    def fn():  # a host sync: not capturable
        runs.append(1)
        return x * float(x.sum().item())

    cache = GraphCache()
    with torch.cuda.stream(torch.cuda.Stream()):
        outs = [cache.run("k", fn) for _ in range(4)]
    torch.cuda.synchronize()
    assert all(torch.equal(o, x * 3) for o in outs)
    assert len(runs) == 5  # warm-up, the failed capture's try, then eager three times


def test_keeps_the_last_keys_only():
    """Bookkeeping alone (no capture: each key seen once), so it runs without a GPU."""
    cache = GraphCache(keep=2)
    for key in "abc":
        assert cache.run(key, lambda k=key: k) == key
    assert list(cache._entries) == ["b", "c"]
    assert cache.run("a", lambda: "again") == "again"  # forgotten: a warm-up again
    assert list(cache._entries) == ["c", "a"]


@cuda
def test_spectral_trials_replayed_probe_after_probe_match_the_reference(monkeypatch):
    """The same tensors trial after trial (the weights moved in place between): from the second
    trial on a replay, each writes the reference's B − B T of the weights as they are then."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, 16, 24, generator=gen, dtype=torch.float64).cuda()
    b = (torch.randn(6, 32, 16, generator=gen, dtype=torch.float64) * 1e-2).cuda()
    monkeypatch.setattr(_shrink, "_REPLAYS", GraphCache())
    for k in range(4):
        a.mul_(1.1).add_(0.01 * k)
        b.mul_(0.9).add_(1e-3 * k)
        want = b - b @ _shrink._shrink_transform(a @ a.mT, b.mT @ b, 0.1, _shrink._rtol(torch.float64, 16))
        local = list(b.unbind())  # (the same tensors every trial, as a model's parameters are)
        entries = [(bk, None, ak, False) for bk, ak in zip(local, a.unbind())]
        _shrink._Trial(entries, 0.1, _shrink.weights_mark(local)).apply(entries, local)
        torch.testing.assert_close(b, want, rtol=0, atol=1e-12)
        if k:
            assert any(isinstance(e, tuple) for e in _shrink._REPLAYS._entries.values())  # replayed
