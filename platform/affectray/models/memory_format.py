"""Convolution weights in the channels-last (NHWC) layout: oneDNN's fast path on the CPU.

On this 2-core EPYC the FER2013 recipe's mini-Xception (depthwise-separable convolutions, which
PyTorch's NCHW CPU kernels run slowly) trains 1.6x faster so with bf16 autocast
(``bench/train_step.py``) and predicts 1.9x faster in fp32 (one probe). Its fp32 training
crashes on the CPU (``train/loop.py``, CHANNELS_LAST_FP32_CRASH), so the loop refuses that.
Opt-in (``train.channels_last``): a model that ``.view()``s a convolution's output needs it
contiguous. A checkpoint trained so says it (``meta.json`` ``memory_format``) and loads so,
so evaluation and labeling run the kernels validation ran.
"""

from __future__ import annotations

import itertools

import torch

__all__ = ["CHANNELS_LAST", "to_channels_last"]

CHANNELS_LAST = "channels_last"  # the checkpoint's meta.json "memory_format"


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Every 4-D parameter and buffer of ``model`` in NHWC, in place; returns ``model``.

    Only 4-D tensors: ``Module.to(memory_format=...)`` refuses a video model's 5-D weights,
    while its per-frame 2-D convolutions still gain. Activations follow their weights' layout.
    """
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return model
