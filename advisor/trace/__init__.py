"""Trace full-size components on the meta device: FLOPs and activation peaks, no weights, no GPU.

This tier imports torch, diffusers and transformers. Its results are plain numbers stored in the
catalog entries (``scripts/build_catalog.py``) or the user's cache (local folders, hub models), so
the planner (`advisor.plan`) stays pure arithmetic. See docs/estimate.md.
"""
