"""Test-session settings shared by every test module."""
from __future__ import annotations

import os

import torch

# pytest -n N runs N worker processes on a machine of about N cores (CI: 2 and 2). torch would start its own
# intra-op threads in each worker, and oversubscribed cores make small matmuls 10-20x slower (threads spin on
# barriers waiting for a core). One thread per worker keeps every core busy without contention.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
