"""Load-time quantization of a virtual pipeline, through the libraries' own loading code.

`from_pretrained` quantizes while it loads; a rehearsal has no checkpoint, so it replays what the
loaders do with each weight, on the virtual ones (``advisor.run.quantize.pipeline_kwargs`` gives the
same ``PipelineQuantizationConfig`` a real load gets, and its ``_resolve_quant_config`` each
component's backend config):

- diffusers models (``load_model_dict_into_meta`` in ``diffusers/models/model_loading_utils.py``):
  ``hf_quantizer.preprocess_model`` swaps the layers (bitsandbytes' ``replace_with_bnb_linear``),
  then ``create_quantized_param`` for each weight ``check_if_quantized_param`` claims, the others
  placed as they are; ``postprocess_model`` last;
- transformers models (``transformers/core_model_loading.py``): ``preprocess_model``, then the
  quantizer's ``get_quantize_ops().convert`` for each weight ``param_needs_quantization`` claims.

Where the weights land: the device for a quantizer that loads there (bitsandbytes: its
``update_device_map`` maps the whole model to the current CUDA device), else the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from advisor.rehearse.virtual import CPU, CUDA, NotRehearsable


def quantize_in_place(pipe: Any, config: Any) -> list[str]:
    """Quantize `pipe`'s (virtual, unquantized) components as loading with `config` would; returns their names."""
    from advisor.levers.gguf import GGUF_BACKEND
    from advisor.levers.offload import loads_onto_device, on_device_after_loading
    from advisor.levers.quantization import backend_of
    from advisor.run.classes import Components
    from advisor.run.quantize import loadings

    loaded = loadings(config, Components.of_pipe(pipe))
    apart = next((q.keyword for q in loaded if q.keyword in pipe.components), None)  # loaded from its own file
    if apart is not None:
        if backend_of(config.quantization) is not GGUF_BACKEND:  # the one format laid out here
            raise NotRehearsable(f"{apart}: a pre-quantized checkpoint of `{config.quantization.backend}`")
        device = CUDA if loads_onto_device(config) else CPU
        _gguf(pipe.components[apart], config.quantization, device, getattr(torch, config.dtype))
        return [apart]
    found = [q for q in loaded if q.keyword == "quantization_config"]
    if not found:
        return []
    pipeline_config = found[0].build()
    onto_device = on_device_after_loading(config, list(pipe.components))
    dtype = getattr(torch, config.dtype)
    quantized = []
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        is_diffusers = type(component).__module__.startswith("diffusers")
        backend_config = pipeline_config._resolve_quant_config(is_diffusers=is_diffusers, module_name=name)
        if backend_config is None:
            continue
        device = CUDA if name in onto_device else CPU
        try:
            if is_diffusers:
                _diffusers(component, backend_config, device, dtype)
            else:
                _transformers(component, backend_config, device, dtype)
        except NotImplementedError as error:
            raise NotRehearsable(f"quantizing {name} with {type(backend_config).__name__}: {error}") from None
        quantized.append(name)
    return quantized


def _diffusers(model: torch.nn.Module, backend_config: Any, device: torch.device, dtype: torch.dtype) -> None:
    from diffusers.quantizers import DiffusersAutoQuantizer

    weights = dict(model.state_dict(keep_vars=True))
    quantizer = DiffusersAutoQuantizer.from_config(backend_config, pre_quantized=False)
    quantizer.validate_environment(torch_dtype=dtype, from_flax=False, device_map=None)
    quantizer.preprocess_model(
        model=model, device_map=None, keep_in_fp32_modules=list(getattr(model, "_keep_in_fp32_modules", None) or [])
    )
    for name in list(weights):
        value = weights.pop(name)  # as loading reads one tensor at a time: the source goes once converted
        if quantizer.check_if_quantized_param(model, value, name, weights):
            quantizer.create_quantized_param(model, value, name, device, weights, [], dtype=dtype)
        else:
            _place(model, name, value, device)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer


def _gguf(model: torch.nn.Module, quantization: Any, device: torch.device, dtype: torch.dtype) -> None:
    """A GGUF file loaded as `model` (``from_single_file``): every Linear weight whose rows split into
    whole blocks packed in the file's main type (a Q4_K_S file holds mostly Q4_K), the rest as they
    are; then diffusers' GGUF quantizer swaps the layers for ``GGUFLinear`` and places the weights."""
    import gguf
    from diffusers import GGUFQuantizationConfig
    from diffusers.quantizers import DiffusersAutoQuantizer
    from diffusers.quantizers.gguf.utils import GGUFParameter

    from advisor.levers.gguf import file_type, tensor_type

    try:
        kind = gguf.GGMLQuantizationType[tensor_type(file_type(quantization))]
    except KeyError:
        raise NotRehearsable(f"GGUF type {file_type(quantization)}: not one the rehearsal can lay out") from None
    block, size = gguf.GGML_QUANT_SIZES[kind]
    state: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        owner = model.get_submodule(name.rpartition(".")[0])
        if name.endswith(".weight") and isinstance(owner, torch.nn.Linear) and value.shape[-1] % block == 0:
            packed = torch.empty((*value.shape[:-1], value.shape[-1] // block * size), dtype=torch.uint8, device=CPU)
            state[name] = GGUFParameter(packed, quant_type=kind)
        else:
            state[name] = value
    quantizer = DiffusersAutoQuantizer.from_config(GGUFQuantizationConfig(compute_dtype=dtype), pre_quantized=True)
    quantizer.preprocess_model(model=model, device_map=None, keep_in_fp32_modules=[], state_dict=state)
    for name in list(state):
        value = state.pop(name)
        if quantizer.check_if_quantized_param(model, value, name, state):
            quantizer.create_quantized_param(model, value, name, device, state, [])
        else:
            _place(model, name, value.to(dtype) if value.is_floating_point() else value, device)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer


def _transformers(model: torch.nn.Module, backend_config: Any, device: torch.device, dtype: torch.dtype) -> None:
    from transformers.quantizers import AutoHfQuantizer

    weights = dict(model.state_dict(keep_vars=True))
    quantizer = AutoHfQuantizer.from_config(backend_config, pre_quantized=False)
    quantizer.validate_environment(dtype=dtype, device_map=None, weights_only=True)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map=None, checkpoint_files=None)
    convert = quantizer.get_quantize_ops()
    for name in list(weights):
        value = weights.pop(name)
        if quantizer.param_needs_quantization(model, name):
            # The op sets the weight itself where it quantizes in place (torchao), and returns the rest.
            moved = {name: value.to(device)}
            for key, converted in convert.convert(
                moved, model=model, full_layer_name=name, missing_keys=set()
            ).items():
                _place(model, key, converted, device)
        else:
            _place(model, name, value, device)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer


def _place(model: torch.nn.Module, name: str, value: torch.Tensor, device: torch.device) -> None:
    """Set `model`'s tensor `name` to `value` on `device`, as accelerate's ``set_module_tensor_to_device``."""
    module_name, _, key = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    moved = value if value.device == device else value.to(device)
    if key in module._parameters:
        if not isinstance(moved, torch.nn.Parameter):
            moved = torch.nn.Parameter(moved, requires_grad=False)
        module._parameters[key] = moved
    else:
        module._buffers[key] = moved
