"""Shared pytest configuration: Hypothesis profiles, Triton's interpreter on CPU-only
machines, and a one-thread fixture.

* ``fast`` (default, CI): ~50 examples per property, no deadline (a 2-core CI machine must
  not flake on timing);
* ``slow``: ~2000 examples per property, for deep local runs.

Choose with the environment variable ``HYPOTHESIS_PROFILE``, e.g.
``HYPOTHESIS_PROFILE=slow python -m pytest tests/test_router_properties.py``.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    # tests/test_fused.py runs the Triton kernels through Triton's interpreter on
    # the CPU; it must be on before anything (transformers, torch.distributed's
    # checkpointing) first imports triton, which other test modules do.
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "fast",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "slow",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, busy
    machine two spinning threads make each step tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """`molf train`'s tiny random Qwen2, saved once per test module."""
    from molf.train import save_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "qwen2"
    save_tiny_model(path, seed=0)
    return path


@pytest.fixture
def data(tmp_path):
    """Ten prompt/completion rows of `molf train`'s generated arithmetic set."""
    from molf.train import write_arithmetic_data

    path = tmp_path / "pairs.jsonl"
    write_arithmetic_data(path, rows=10, seed=1)
    return path
