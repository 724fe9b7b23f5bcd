"""Shared pytest configuration: Hypothesis profiles.

* ``fast`` (default, CI): ~50 examples per property, no deadline (a 2-core CI machine must
  not flake on timing);
* ``slow``: ~2000 examples per property, for deep local runs.

Choose with the environment variable ``HYPOTHESIS_PROFILE``, e.g.
``HYPOTHESIS_PROFILE=slow python -m pytest tests/test_router_properties.py``.
"""

import os

from hypothesis import HealthCheck, settings

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
