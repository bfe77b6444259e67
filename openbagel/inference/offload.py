"""Layer offload for accelerators too small for the whole model.

The decoder layers stay in CPU memory and each one is copied to the accelerator just before it runs
(accelerate's `cpu_offload` hooks); everything else (embeddings, lm_head, ViT, connectors, VAE) and the
KV caches live on the accelerator. For BAGEL-7B-MoT the 28 MoT layers are 13.1 B of its 14.6 B parameters
(24.3 GiB in bf16), so a GPU holds 2.9 GiB of weights plus caches and one 0.87 GiB layer at a time, at
the price of streaming every layer over PCIe on every forward: a memory option, not a speed one.
"""

from __future__ import annotations

import torch

from ..models.bagel import Bagel

LAYERS_PREFIX = "language_model.model.layers."


def offload_layers(model: Bagel, execution_device: torch.device | str) -> None:
    """Move all but the decoder layers to `execution_device`; hook the layers to stream from CPU."""
    from accelerate import cpu_offload
    from accelerate.utils import set_module_tensor_to_device

    device = torch.device(execution_device)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith(LAYERS_PREFIX):
            set_module_tensor_to_device(model, name, device, value=tensor.data)
    for layer in model.language_model.model.layers:
        layer.to("cpu")
        cpu_offload(layer, execution_device=device, offload_buffers=True)


def offloaded(model: Bagel) -> bool:
    """Whether `offload_layers` hooked this model (its layers' weights are placeholders between calls)."""
    return any(hasattr(layer, "_hf_hook") for layer in model.language_model.model.layers)
