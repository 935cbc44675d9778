"""Rehearsal: a config run at any size on a virtual CUDA device, on a CPU (issue 28).

`virtual` is the device (tensors without data, device checks, an allocation ledger per pool);
`rehearsal` applies a config to a pipeline through the same steps ``apply_config`` runs and runs one
generation's phases on it. torch and diffusers are imported here: this is the run tier.
"""
