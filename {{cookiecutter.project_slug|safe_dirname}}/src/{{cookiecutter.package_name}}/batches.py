"""Batches: the one collate and the one `to_device` that training, evaluation and the doctor's probes use."""

import torch
from torch.utils.data import default_collate


def collate(items):
    """Samples (dicts, tuples or tensors) -> one batch, by torch's default_collate."""
    return default_collate(items)


def to_device(obj, device, memory_format=None, input_key="image"):
    """Every tensor in a (nested) batch moved to `device`; with `memory_format`, the input (`input_key` of
    a dict batch) is made contiguous in it (channels_last lets oneDNN and cuDNN pick faster kernels)."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        moved = {k: to_device(v, device) for k, v in obj.items()}
        if memory_format is not None and input_key in moved and torch.is_tensor(moved[input_key]):
            moved[input_key] = moved[input_key].contiguous(memory_format=memory_format)
        return moved
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
