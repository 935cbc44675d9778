"""Milliseconds, no torch: what the machine has and what a pipeline weighs, without loading weights.

`hardware` (GPUs, RAM, disk, packages), `target` (the machine a plan is for), `models` (component
sizes from configs and safetensors headers, or the built-in catalog), `workload` (what to generate).
`calibrate` is the one module here that imports torch, and only when asked to measure.
"""
