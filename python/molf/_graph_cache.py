"""Fixed GPU work replayed as a CUDA graph (the held-out probe's spectral trial, `molf._shrink`).

That trial's setup is some 800 small kernels (stacks, Gram matrices, the Newton–Schulz
products of the r x r transforms, the shrunk B's) over the same tensors at every probe; issued
one by one from Python the host paces them (issue #32). Captured once, a probe replays them
with one launch. The graph reads its inputs where they were at the capture, so its key must
name them (their addresses, shapes and dtypes) and whatever else the work bakes in.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

__all__ = ["GraphCache"]

_WARM, _EAGER = "warm", "eager"  # a key seen once (its run warmed the libraries up); one never captured


class GraphCache:
    """`run(key, fn)` on the current CUDA stream: the first time a key comes, `fn()` runs
    eagerly (its warm-up); the second time it is captured as a CUDA graph, and replayed from
    then on. A replay returns the graph's own output tensors, which its next replay
    overwrites: the caller is done with them by then. The last `keep` keys' graphs are kept
    (each holds the memory of its work's tensors); a key whose capture fails stays eager."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._entries: dict[Hashable, object] = {}  # key: _WARM, _EAGER or (graph, outputs); oldest first

    def run(self, key: Hashable, fn: Callable[[], object]) -> object:
        entry = self._entries.pop(key, None)
        if entry is None or entry == _EAGER:
            out = fn()
            self._remember(key, _EAGER if entry == _EAGER else _WARM)
            return out
        if entry == _WARM:
            entry = self._capture(fn)
            if entry is None:
                self._remember(key, _EAGER)
                return fn()
        graph, outputs = entry
        graph.replay()
        self._remember(key, entry)
        return outputs

    def _remember(self, key: Hashable, entry: object) -> None:
        self._entries[key] = entry
        while len(self._entries) > self.keep:
            del self._entries[next(iter(self._entries))]

    @staticmethod
    def _capture(fn: Callable[[], object]) -> tuple | None:
        """(graph, outputs) of `fn` captured on the current stream, or None where capture
        fails. "thread_local": other threads' CUDA calls (a data loader pinning memory) go on."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=torch.cuda.current_stream(), capture_error_mode="thread_local"):
                outputs = fn()
        except RuntimeError:
            return None
        return graph, outputs
