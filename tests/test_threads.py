"""One Router and one Ledger shared by several Python threads.

Large inputs release the GIL while the core computes, so calls really overlap. The bindings
serialise them: no exception, and the final state equals a sequential run of the same calls
in some order (the order the threads were served), with every thread's mask the one that
sequential run gives it.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np

from molf._core import Ledger, Router

THREADS = 4
MODULES, EXPERTS = 20_000, 4  # 80,000 entries: far above the size that releases the GIL


def _router() -> Router:
    # Hysteresis with a dwell time: each decision depends on the calls before it.
    return Router(MODULES, EXPERTS, policy="hysteresis", margin=0.05, min_dwell=1)


def _sequential(order, scores):
    router, ledger = _router(), Ledger(MODULES, EXPERTS)
    masks = {}
    for i in order:
        masks[i] = router.route(scores[i])
        ledger.record(scores[i], masks[i])
    return router, ledger, masks


def _run_threads(scores):
    router, ledger = _router(), Ledger(MODULES, EXPERTS)
    start = threading.Barrier(THREADS + 1)
    masks, errors, steps_seen = {}, [], []
    done = threading.Event()

    def work(i: int) -> None:
        try:
            start.wait()
            masks[i] = router.route(scores[i])
            ledger.record(scores[i], masks[i])
        except BaseException as exc:  # noqa: BLE001 - any failure is the test's finding
            errors.append(exc)

    def watch() -> None:
        # Reads while the others route: getters must neither fail nor see a torn state.
        try:
            start.wait()
            while not done.is_set():
                steps_seen.append((router.step, ledger.step))
                repr(router), ledger.checksum, router.incumbents()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    watcher = threading.Thread(target=watch)
    for t in [*threads, watcher]:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    return router, ledger, masks, errors, steps_seen


def test_concurrent_route_and_record_serialise():
    rng = np.random.default_rng(0)
    for trial in range(8):
        scores = [rng.random((MODULES, EXPERTS), dtype=np.float64 if i % 2 else np.float32) for i in range(THREADS)]
        router, ledger, masks, errors, steps_seen = _run_threads(scores)
        assert errors == [], f"trial {trial}: {errors!r}"
        assert router.step == ledger.step == THREADS
        assert all(0 <= r <= THREADS and 0 <= lg <= THREADS for r, lg in steps_seen)
        assert [r for r, _ in steps_seen] == sorted(r for r, _ in steps_seen)

        # The router served the threads in some order: find it from the masks it gave.
        served = [
            order
            for order in itertools.permutations(range(THREADS))
            if all(np.array_equal(masks[i], m) for i, m in _sequential(order, scores)[2].items())
        ]
        assert served, f"trial {trial}: the masks match no sequential order"
        seq_router = _sequential(served[0], scores)[0]
        assert router == seq_router

        # The ledger may have served the same calls in another order: its state must equal
        # recording the (scores, mask) pairs sequentially in one of them.
        def ledger_in(order, scores=scores, masks=masks):
            ref = Ledger(MODULES, EXPERTS)
            for i in order:
                ref.record(scores[i], masks[i])
            return ref

        assert any(ledger_in(order) == ledger for order in itertools.permutations(range(THREADS))), (
            f"trial {trial}: ledger checksum {ledger.checksum:#x} matches no sequential order"
        )
