"""Tensors a module keeps from one decode step to the next, so a step allocates nothing.

Both the model's own one-row paths (norms, RoPE, attention, residuals: ``edgetp.model.llama``) and
the decode linears' outputs (``edgetp.kernels.native.StepOutput``) keep theirs here, in the module's
``__dict__`` (not its state dict). Buffers are made outside inference mode, so a model that has
run under ``torch.inference_mode`` can still be called under ``torch.no_grad`` (an inference
tensor refuses in-place updates there).
"""

from __future__ import annotations

import torch
from torch import nn


def step_buffer(owner: nn.Module, name: str, shape: tuple[int, ...], like: torch.Tensor
                ) -> torch.Tensor:
    """The tensor ``owner`` keeps under ``name`` for one-row steps, made anew only when the
    shape or dtype changes. Made outside inference mode, so the model can be called in it and
    out of it. A step's buffers are used up within the step: nothing may keep them."""
    buffer = owner.__dict__.get(name)
    if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype:
        with torch.inference_mode(False):
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
        owner.__dict__[name] = buffer
    return buffer


def step_constant(owner: nn.Module, name: str, value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor holding ``value`` that ``owner`` keeps: an in-place op given a Python number
    wraps it in a new tensor on every call."""
    constant = owner.__dict__.get(name)
    if constant is None or constant.dtype != like.dtype:
        with torch.inference_mode(False):
            constant = torch.tensor(value, dtype=like.dtype, device=like.device)
        owner.__dict__[name] = constant
    return constant
