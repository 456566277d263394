"""The robustness suite: generated bad inputs, each of which must end in success or the documented error
(a subclass of ``omnigen2.errors.OmniGen2Error``, ``ValueError`` or ``TypeError``; exit code 2 and one line on
the CLI), within a time limit, leaving no partial file.

Hypothesis runs derandomized under the ``ci`` profile (the default), so a failure reproduces from the
same examples; ``HYPOTHESIS_PROFILE=explore`` draws fresh ones with more examples."""

from __future__ import annotations

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")

hypothesis.settings.register_profile(
    "ci", derandomize=True, deadline=None, suppress_health_check=list(hypothesis.HealthCheck), print_blob=True
)
hypothesis.settings.register_profile(
    "explore", deadline=None, suppress_health_check=list(hypothesis.HealthCheck), max_examples=500
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
