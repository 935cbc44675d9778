"""A GGUF checkpoint of a tiny pipeline's component, written here: what ``from_single_file`` loads.

The tensors keep the component's own (diffusers) names, so diffusers loads the file against the
pipeline folder's config without converting keys. Each linear weight whose rows split into whole
blocks is quantized to `type_name` (the ``gguf`` package quantizes Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and
BF16; it can't write K-quants); every other tensor is stored F32, as GGUF files of diffusion models
keep their norms and biases.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_gguf(model_folder: str | os.PathLike[str], path: str | os.PathLike[str], type_name: str) -> Path:
    """Write the safetensors weights in `model_folder` (one component's folder) to the GGUF file `path`."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    qtype = gguf.GGMLQuantizationType[type_name]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(path), arch="diffusers")
    for file in sorted(Path(model_folder).glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            tensor = tensor.astype(np.float32)
            if name.endswith(".weight") and tensor.ndim == 2 and tensor.shape[-1] % block == 0:
                writer.add_tensor(name, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
