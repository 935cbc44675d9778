"""Rehearsal: a config run at any size on a virtual CUDA device, on a CPU (issue 28).

`virtual` is the device (tensors without data, device checks, an allocation ledger per pool);
`bindings` the Python-level rewrites a CPU build needs for cuda tensors; `runtime` ``torch.cuda``
answering as the card; `device` enters all three. `build` makes a full-size pipeline without
weights; `quantize` applies load-time quantization with the backends' own loading code;
`rehearsal` applies a config through the same steps ``apply_config`` runs and runs one generation's
phases. torch and diffusers are imported here: this is the run tier.
"""
