"""Materialise one block's weights from the checkpoint, and release them again.

The skeleton's parameters live on the ``meta`` device. Loading a block swaps in real tensors
for that block only; releasing swaps meta tensors back, so memory never holds more than one block.
"""

from __future__ import annotations

import torch
from torch import nn

from reconstruct.modelio.checkpoint import CheckpointReader
from reconstruct.modelio.host_buffers import ReusableBuffers, aligned


def _owner(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    module_path, _, leaf = dotted.rpartition(".")
    return (root.get_submodule(module_path) if module_path else root), leaf


def read_module_tensors(
    module: nn.Module,
    prefix: str,
    reader: CheckpointReader,
    key_map: dict[str, str],
    *,
    own: bool = False,
    pin: bool = False,
    buffers: ReusableBuffers | None = None,
) -> dict[str, torch.Tensor]:
    """Read ``module``'s tensors from the checkpoint as CPU tensors in their stored dtype.

    The first half of :func:`load_module_weights`: it touches only the checkpoint, never the module's
    parameters, so it may run in a background thread while another block computes.

    Args:
        module: a block (or any sub-tree) of the skeleton; only its state-dict names and shapes are read.
        prefix: its state-dict prefix in the full model, e.g. ``"model.layers.3."``.
        reader: the checkpoint.
        key_map: full-model key → checkpoint key.
        own: copy every tensor out of the shard's memory map, so the pages are read now and the
            reader may be closed (a background read); else the tensors may be views of the map.
        pin: with ``own``, copy into page-locked memory (fast, asynchronous copies to a GPU).
        buffers: with ``own`` and no ``pin``, read the tensors' bytes straight into one of these
            reused buffers and return views of it (``host_buffers``), where every tensor is stored in
            safetensors; the same values as a copy.

    Returns:
        Local name → tensor, for every tensor the checkpoint holds (buffers computed at init are left out).

    Raises:
        ValueError: a parameter missing from the checkpoint, or a shape that differs from the model's.
    """
    keys: dict[str, str] = {}  # local name → checkpoint key
    stored: dict[str, tuple | None] = {}  # local name → (dtype, shape, nbytes) when readable byte for byte
    for local_name, current in module.state_dict(keep_vars=True).items():
        full_name = prefix + local_name
        if full_name not in key_map:
            if isinstance(current, nn.Parameter) or current.is_meta:
                raise ValueError(f"checkpoint has no tensor for {full_name}; the checkpoint does not match its config")
            continue  # a buffer computed at init (kept as is)
        keys[local_name] = key_map[full_name]
        stored[local_name] = reader.stored(keys[local_name])
        shape = stored[local_name][1] if stored[local_name] else tuple(reader.read(keys[local_name]).shape)
        if shape != tuple(current.shape):
            raise ValueError(f"{full_name}: checkpoint shape {shape} != model shape {tuple(current.shape)}")
    if own and not pin and buffers is not None and all(stored.values()):
        return _read_into_buffer(keys, stored, reader, buffers)
    tensors: dict[str, torch.Tensor] = {}
    for local_name, key in keys.items():
        tensor = reader.read(key)
        if own:
            tensor = torch.empty_like(tensor, pin_memory=pin).copy_(tensor)  # pages read here, not at install
        tensors[local_name] = tensor
    return tensors


def _read_into_buffer(keys: dict[str, str], stored: dict[str, tuple], reader: CheckpointReader,
                      buffers: ReusableBuffers) -> dict[str, torch.Tensor]:
    """Every tensor of ``keys`` (``stored``: their dtype, shape, bytes) read into one buffer from ``buffers``;
    local name → its view of the buffer."""
    offsets: dict[str, int] = {}
    end = 0
    for local_name in keys:
        offsets[local_name] = end
        end += aligned(stored[local_name][2])
    buffer = buffers.take(end)  # (end,) uint8
    tensors: dict[str, torch.Tensor] = {}
    for local_name, start in offsets.items():
        dtype, shape, nbytes = stored[local_name]
        raw = buffer[start : start + nbytes]
        reader.read_into(keys[local_name], raw)
        tensors[local_name] = raw.view(dtype).view(shape)
    return tensors


def install_module_tensors(
    module: nn.Module,
    tensors: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    *,
    owned: bool = False,
) -> dict[str, torch.dtype]:
    """Swap ``tensors`` (from :func:`read_module_tensors`) into ``module`` on ``device``.

    Args:
        module: the skeleton sub-tree the tensors were read for.
        tensors: local name → CPU tensor in its stored dtype.
        device: where the weights go.
        dtype: floating-point parameters are cast to this compute dtype.
        owned: the tensors are private copies (``read_module_tensors(own=True)``): one already on
            ``device`` in ``dtype`` becomes the parameter itself instead of being copied again.

    Returns:
        The dtype each tensor has in the checkpoint (local name → dtype), to write it back alike.
    """
    stored_dtypes: dict[str, torch.dtype] = {}
    for local_name, tensor in tensors.items():
        stored_dtypes[local_name] = tensor.dtype
        owner, leaf = _owner(module, local_name)
        target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        value = tensor.to(device=device, dtype=target_dtype, copy=not owned)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value
    for buffer_owner in module.modules():  # non-persistent buffers (rotary inv_freq) follow the module
        for name, buffer in buffer_owner._buffers.items():
            if buffer is not None and buffer.device != device and not buffer.is_meta:
                buffer_owner._buffers[name] = buffer.to(device)
    return stored_dtypes


def load_module_weights(
    module: nn.Module,
    prefix: str,
    reader: CheckpointReader,
    key_map: dict[str, str],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.dtype]:
    """Fill ``module``'s parameters and persistent buffers from the checkpoint.

    :func:`read_module_tensors` then :func:`install_module_tensors`, in the calling thread.

    Args:
        module: a block (or any sub-tree) of the skeleton.
        prefix: its state-dict prefix in the full model, e.g. ``"model.layers.3."``.
        reader: the checkpoint.
        key_map: full-model key → checkpoint key.
        device: where the weights go.
        dtype: floating-point parameters are cast to this compute dtype.

    Returns:
        The dtype each tensor has in the checkpoint (local name → dtype), to write it back alike.
    """
    return install_module_tensors(module, read_module_tensors(module, prefix, reader, key_map), device, dtype)


def release_module_weights(module: nn.Module) -> None:
    """Swap every parameter back to the meta device, freeing its memory; buffers go to CPU."""
    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is not None:
                submodule._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=False
                )
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None and not buffer.is_meta:
                submodule._buffers[name] = buffer.to("cpu")


def module_tensors_for_output(
    module: nn.Module, prefix: str, stored_dtypes: dict[str, torch.dtype]
) -> dict[str, torch.Tensor]:
    """The block's persistent tensors as CPU tensors named for the output checkpoint.

    Tensors keep the dtype they had in the input checkpoint; tensors that did not exist there
    (biases added by reconstruction) take the dtype of the block's weights.
    """
    return tensors_for_output(module.state_dict(), prefix, stored_dtypes)


def tensors_for_output(
    values: dict[str, torch.Tensor], prefix: str, stored_dtypes: dict[str, torch.dtype]
) -> dict[str, torch.Tensor]:
    """``values`` (local name → tensor) as :func:`module_tensors_for_output` writes a block's tensors."""
    default_dtype = next(iter(stored_dtypes.values()), None)
    tensors: dict[str, torch.Tensor] = {}
    for local_name, value in values.items():
        dtype = stored_dtypes.get(local_name, default_dtype if value.is_floating_point() else value.dtype)
        tensors[prefix + local_name] = value.detach().to("cpu", dtype).contiguous()
    return tensors


def smallest_subnormal(dtype: torch.dtype) -> float:
    """The smallest positive value ``dtype`` holds (2**-24 for float16, 2**-133 for bfloat16)."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps


@torch.no_grad()
def keep_nonzero_when_stored(weight: torch.Tensor, keep_mask: torch.Tensor, stored_dtype: torch.dtype) -> int:
    """Nudge kept weights that the cast to ``stored_dtype`` would turn into zeros; return how many.

    A kept weight that is non-zero in the compute dtype but rounds to 0 in the stored dtype (below
    half of float16's smallest subnormal, about 3e-8) becomes the stored dtype's smallest subnormal
    with its sign: the nearest value that stays non-zero, so the file holds exactly the pruner's
    zeros. Kept weights that are already exactly 0 in the compute dtype stay 0 (they are zeros of the
    model itself, e.g. from the input checkpoint) and count as zeros in the report.

    Args:
        weight: (out, in) view of a linear's weight in the compute dtype; changed in place.
        keep_mask: bool (out, in), True = weight survives pruning.
        stored_dtype: the dtype the weight is written in.
    """
    vanishing = keep_mask.to(weight.device) & (weight != 0) & (weight.to(stored_dtype) == 0)  # (out, in)
    count = int(vanishing.sum())
    if count:
        nudge = torch.full_like(weight, smallest_subnormal(stored_dtype)).copysign(weight)  # (out, in)
        weight.copy_(torch.where(vanishing, nudge, weight))
    return count


def stored_sparsity(weight: torch.Tensor, stored_dtype: torch.dtype) -> float:
    """Fraction of zeros of ``weight`` as written in ``stored_dtype``."""
    return float((weight.to(stored_dtype) == 0).sum().item() / weight.numel())
