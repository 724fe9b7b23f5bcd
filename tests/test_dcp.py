"""torch.distributed.checkpoint: save at step STOP with `get_state_dict` + `dcp.save`, load into
a fresh model and optimizer with `dcp.load` + `set_state_dict`, continue: the run equals the
uninterrupted one bit for bit (parameters, moments, router, ledger, routing log).

Single process, in a one-rank gloo group, with both of DCP's optimizer layouts (nested, and
`flatten_optimizer_state_dict=True`, which rebuilds groups from the live optimizer's keys)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from test_checkpoint import STOP, TOTAL, make, run


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    if dist.is_initialized():  # another test module's group serves as well
        yield
        return
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("variant", ["molf", "hysteresis", "warmup-freeze", "lagged"])
def test_dcp_resume_is_exact(variant, flatten, tmp_path, process_group):
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    full_log, log, ckpt = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl", str(tmp_path / "ckpt")
    model, opt, sched = make(variant, full_log)
    run(model, opt, sched, range(TOTAL))

    model_a, opt_a, sched_a = make(variant, log)
    run(model_a, opt_a, sched_a, range(STOP))
    model_sd, optim_sd = get_state_dict(model_a, opt_a, options=options)
    dcp.save({"model": model_sd, "optim": optim_sd, "sched": sched_a.state_dict()}, checkpoint_id=ckpt)
    router_at_save, ledger_at_save = opt_a.router.to_bytes(), opt_a.ledger.to_bytes()
    run(model_a, opt_a, sched_a, range(STOP, STOP + 2))  # goes on after the save, then dies
    del model_a, opt_a, sched_a

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model_b, opt_b, sched_b = make(variant, log)
        # On a fresh optimizer get_state_dict runs a zero-gradient, zero-lr step to create
        # the state that dcp.load fills in; the load replaces all it did.
        model_sd, optim_sd = get_state_dict(model_b, opt_b, options=options)
        state = {"model": model_sd, "optim": optim_sd, "sched": sched_b.state_dict()}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(
            model_b, opt_b, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
        )
        sched_b.load_state_dict(state["sched"])
    assert [str(w.message) for w in record if "routing log" in str(w.message)] == []
    assert opt_b.router.to_bytes() == router_at_save and opt_b.ledger.to_bytes() == ledger_at_save
    run(model_b, opt_b, sched_b, range(STOP, TOTAL))

    for (name, p), q in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), f"{name} differs after the DCP resume"
    for s, t in zip(opt.state.values(), opt_b.state.values()):
        assert s.keys() == t.keys()
        for k in s:
            assert s[k].dtype == t[k].dtype and torch.equal(s[k], t[k]), k
    assert opt_b.router == opt.router and opt_b.ledger == opt.ledger
    assert opt_b.routing_summary().skipped_steps == opt.routing_summary().skipped_steps
    assert log.read_text() == full_log.read_text(), "the log continues without gaps or repeats"
