"""CUDA graphs for generation steps: capture a step function once per shape, then replay it.

A decode step at batch 1 is a few hundred small kernels; launching them one by one from Python costs
more than running them.  `StepRunner` records the whole step into a `torch.cuda.CUDAGraph` per key
(the kv_len bucket plus the input shapes), copies new inputs into the graph's static input buffers and
replays.  The step function must keep static shapes, avoid host syncs and allocate nothing that has
to outlive it; `dsv3.inference.forward` is written that way (scatter cache writes, sync-free MoE).
Outputs are the graph's static buffers: read them before the next replay of the same key.

Off (and on CPU) the runner calls the function eagerly.  If a capture fails, it warns once and stays
eager.  The function may be a `CompiledStep` (compiled.py): the graph removes the launch overhead of
each kernel, compiling first removes most of the kernels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .compiled import error_summary, interrupted


class StepRunner:
    def __init__(self, fn: Callable[..., object], cuda_graphs: bool):
        self.fn = fn  # fn(kv_len: int, *tensors) -> tensor or tuple of tensors
        self.enabled = cuda_graphs and torch.cuda.is_available()
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], object]] = {}

    def __call__(self, kv_len: int, *args: torch.Tensor):
        if not self.enabled or args[0].device.type != "cuda":
            return self.fn(kv_len, *args)
        key = (kv_len, *(tuple(a.shape) for a in args))
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(key, kv_len, args)
            except Exception as e:  # e.g. an op that syncs during capture: run eagerly from now on
                if interrupted(e):
                    raise
                cause = e.__cause__ or e.__context__  # capture_end's error hides the op that broke the capture
                why = error_summary(e) + (f" (after {error_summary(cause)})" if cause is not None else "")
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {why}")
                self.enabled = False
                return self.fn(kv_len, *args)
        graph, inputs, outputs = entry
        for buf, a in zip(inputs, args):
            buf.copy_(a)
        graph.replay()
        return outputs

    def _capture(self, key: tuple, kv_len: int, args: tuple[torch.Tensor, ...]):
        inputs = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy initialisation must not be recorded
            for _ in range(2):
                self.fn(kv_len, *inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(kv_len, *inputs)
        self._graphs[key] = (graph, inputs, outputs)
        return self._graphs[key]
