"""torch.compile for generation steps: Inductor fuses the small kernels of a step before CUDA graphs.

A decode step at batch 1 is launch-bound: about a thousand kernels for the bench config, most of them
casts, norms, rope, masks and routing arithmetic between the matmuls, and even replayed from a CUDA
graph each kernel costs microseconds.  `CompiledStep` wraps a step function fn(kv_len, *tensors) in `torch.compile` (one
graph per step, Inductor's default mode) so that this elementwise work fuses; `StepRunner` then
captures the compiled step.  The eager step stays the twin: tests hold their tokens equal.

Shapes: kv_len is traced as a symbol from the first compile (`torch.compiler.config.dynamic_sources`),
and so are the batch dim of the step's tensors and the batch and length dims of the cache
(`mark_cache_dynamic`), so new kv buckets of a long chat, a bigger cache or another batch size reuse
the compiled code.  torch specialises sizes 0 and 1, so batch 1 and batch > 1 compile separately (and
the draft step's one-token chain links): two to four compiles per step kind and model, none per kv
bucket.  A read of the whole cache would be a contiguous view, another specialisation, which is why
`Generator.kv_len` stops one slot short of it.
Mode: default.  "reduce-overhead" would capture CUDA graphs of its own, which StepRunner already
does; "max-autotune-no-cudagraphs" benchmarks Triton GEMM templates against cuBLAS for every matmul
shape, which multiplies the compile time (untried here).
Data-dependent sizes are captured (`capture_scalar_outputs`): the experts' fallback for dtypes without
a compiled grouped GEMM (fp32, fp16; `dsv3.model.moe.grouped_mm`) reads per-expert row counts on the
host, and captured the step stays one graph.  That read is still a host sync, so a CUDA graph refuses
such a step (StepRunner then launches it eagerly); BF16 has none.
These settings are patched around each call, never set globally.

Failure: an error while compiling or running the compiled step warns once, and the step runs eagerly
from then on.  The warning keeps the error's first and last lines; DSV3_COMPILE_DEBUG=1 adds the whole
traceback (the "from user code" frames say which line of the step failed).  A step writes the same values into the same cache slots whenever it runs on the same
inputs, so re-running a half-run step eagerly is safe.  Errors during CUDA graph capture go to StepRunner.
Not here: prefill (once per generation, at a new prompt length each time) stays eager.
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections.abc import Callable

import torch

from .cache import LatentCache


def mark_cache_dynamic(cache: LatentCache) -> None:
    """Batch and length of a cache change between generations: trace them as symbols from the start."""
    torch._dynamo.maybe_mark_dynamic(cache.kv, [1, 2])  # [layers, B, max_len, 576]
    torch._dynamo.maybe_mark_dynamic(cache.rows, 0)  # [B, 1]


def error_summary(e: BaseException, width: int = 300) -> str:
    """The first line of a compile error and, when it differs, the last: inductor's errors from its
    compile workers start "SubprocException: An exception occurred in a subprocess:" and end with the
    cause (e.g. Triton's "Loop-carried variable ... fp64 ...")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    first, last = f"{type(e).__name__}: {lines[0]}"[:width], lines[-1][:width]
    return first if len(lines) == 1 else f"{first} ... {last}"


def interrupted(e: BaseException) -> bool:
    """Whether a compile error is really a deadline's TimeoutError (e.g. a benchmark section's alarm)
    raised inside the compiler, which wraps it: that is no reason to run eagerly, so it propagates."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, TimeoutError):
            return True
        seen.add(id(e))
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
    return False


def warn_fallback(name: str, e: BaseException) -> None:
    """The one warning of a compile failure; with DSV3_COMPILE_DEBUG=1 the whole traceback too."""
    text = f"torch.compile of {name} failed, running it eagerly: {error_summary(e)}"
    if os.environ.get("DSV3_COMPILE_DEBUG", "") not in ("", "0"):
        text += "\n" + "".join(traceback.format_exception(e))
    else:
        text += " (DSV3_COMPILE_DEBUG=1 shows the traceback)"
    warnings.warn(text)


class CompiledHelper:
    """A small sync-free function called between graph replays (e.g. the decode loop's
    bookkeeping), compiled whole so that its many tiny ops launch as a few kernels.  After a compile
    error it warns once and runs eagerly; compile errors surface before the compiled code runs, so a
    function that updates its arguments in place is applied once."""

    def __init__(self, fn: Callable[..., object]):
        self.fn = fn
        self.compiled: Callable[..., object] | None = torch.compile(fn, fullgraph=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:
                if interrupted(e):
                    raise
                warn_fallback(self.fn.__name__, e)
                self.compiled = None
        return self.fn(*args)


class CompiledStep:
    def __init__(self, fn: Callable[..., object]):
        self.fn = fn  # fn(kv_len: int, *tensors), each tensor batch-first
        self.compiled: Callable[..., object] | None = torch.compile(fn, fullgraph=True)

    def __call__(self, kv_len: int, *args: torch.Tensor):
        if self.compiled is None:
            return self.fn(kv_len, *args)
        for a in args:
            torch._dynamo.maybe_mark_dynamic(a, 0)
        try:
            with torch.compiler.config.patch(dynamic_sources="L['kv_len']"), \
                    torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
                return self.compiled(kv_len, *args)
        except Exception as e:
            if interrupted(e) or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
                raise  # a deadline, or a capture broken either way (StepRunner falls back)
            warn_fallback(getattr(self.fn, "__name__", "a step"), e)
            self.compiled = None
            return self.fn(kv_len, *args)
