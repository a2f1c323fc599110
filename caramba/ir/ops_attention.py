"""Fused attention ops produced by fuse_attention and fuse_decoupled_attention."""
from __future__ import annotations
