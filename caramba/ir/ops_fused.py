"""Fused ops produced by the norm, RoPE and MLP fusion passes (their reference code is the unfused formula)."""
from __future__ import annotations
