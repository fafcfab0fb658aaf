"""Per-sequence bookkeeping of generated tokens, kept on the device: stop tokens, length limits, finish.

Each step hands in a block of candidate tokens per sequence (1 for plain decoding, up to 1 + drafts for
speculative decoding).  A sequence takes tokens up to its first stop token (which ends it and is not
part of the output) and up to its own `max_new_tokens` (which counts that stop token, as transformers
does).  `OutputBuffer` never reads the device; `Progress` decides when the host looks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

OnTokens = Callable[[list[list[int]]], None]  # receives each sequence's tokens added since the last call


def append_block(tokens: torch.Tensor, count: torch.Tensor, finished: torch.Tensor, stopped: torch.Tensor,
                 stop: torch.Tensor, limit: torch.Tensor, new: torch.Tensor, n_new: torch.Tensor | None) -> None:
    """OutputBuffer.add's maths, in place on the buffer's tensors (shapes there); about 25 small ops,
    which the decode loops compile together with the rest of a step's bookkeeping."""
    n = new.shape[1]
    j = torch.arange(n, device=new.device)
    if n_new is None:
        n_new = torch.full_like(count, n)
    live = ~finished
    is_stop = (new.unsqueeze(-1) == stop.unsqueeze(1)).any(-1) & (j < n_new.unsqueeze(1))  # [B, n]
    first_stop = torch.where(is_stop.any(-1), is_stop.long().argmax(-1), n)  # [B]; n = none
    room = limit - count
    take = torch.minimum(torch.minimum(n_new, first_stop), room).clamp_min(0) * live  # tokens appended
    slots = count.unsqueeze(1) + j  # [B, n]
    keep = j < take.unsqueeze(1)
    tokens.scatter_(1, slots, torch.where(keep, new, tokens.gather(1, slots)))
    count += take
    stopped |= live & (first_stop < torch.minimum(n_new, room))  # the stop token fits the budget
    finished |= stopped | (count >= limit)


def step_flags(finished: torch.Tensor, *watch: torch.Tensor) -> torch.Tensor:
    """[all finished, *watch] as a long tensor: what Progress copies to the host after a step."""
    return torch.stack([finished.all().long(), *[w.long() for w in watch]])


class OutputBuffer:
    def __init__(self, max_new: list[int], stop_ids: list[list[int]], block: int, device: torch.device):
        b = len(max_new)
        width = max(max(len(s) for s in stop_ids), 1)
        stop = torch.full((b, width), -1, dtype=torch.long)
        for i, ids in enumerate(stop_ids):
            stop[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.stop = stop.to(device)  # [B, S], -1 = none
        self.limit = torch.tensor(max_new, dtype=torch.long, device=device)  # [B]
        # room for a whole block past the longest limit, so that writes never need clamping
        self.tokens = torch.zeros(b, max(max_new) + block, dtype=torch.long, device=device)
        self.count = torch.zeros(b, dtype=torch.long, device=device)
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)
        self.stopped = torch.zeros(b, dtype=torch.bool, device=device)  # finished by a stop token

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(tokens, count, finished, stopped, stop, limit): append_block's state, for the decode loops'
        compiled bookkeeping (engine.advance, speculative.commit)."""
        return self.tokens, self.count, self.finished, self.stopped, self.stop, self.limit

    def add(self, new: torch.Tensor, n_new: torch.Tensor | None = None) -> None:
        """new [B, n] candidate tokens, of which the first n_new [B] are real (None: all n)."""
        append_block(*self.tensors, new, n_new)

    def snapshot(self) -> tuple[list[list[int]], bool]:
        """(tokens of every sequence so far, whether all have finished): one device read."""
        count, tokens, done = self.count.tolist(), self.tokens.tolist(), bool(self.finished.all())
        return [row[:c] for row, c in zip(tokens, count)], done

    def finish_reasons(self) -> list[str]:
        return ["stop" if s else "length" for s in self.stopped.tolist()]


class Progress:
    """When the host looks at the device during decoding.

    After every step its flags (and, with a listener, the output buffer's counts and tokens) are copied
    to the host without blocking and read one step later, after the next step has been queued: the CPU
    never waits for work it has just launched, and a finished batch costs one extra step at most (`wait`
    avoids it where a loop can foresee the end).  Streaming hands the tokens over a step late, which
    keeps the GPU busy instead of idle while the host reads and prints."""

    def __init__(self, out: OutputBuffer, on_tokens: OnTokens | None):
        self.out, self.on_tokens = out, on_tokens
        self.sent = [0] * out.count.shape[0]
        cuda = out.count.device.type == "cuda"
        self._pin = cuda
        self._event = torch.cuda.Event() if cuda else None
        self._host: torch.Tensor | None = None  # what was queued last step (pinned on a GPU)
        self._queued = False

    def start(self) -> bool:
        """A blocking look (after prefill): streams the first tokens; returns whether all are done."""
        tokens, done = self.out.snapshot()
        self.flush(tokens)
        return done

    def after_step(self, flags: torch.Tensor) -> tuple[bool, list[int]] | None:
        """Call once a step is queued, with its `step_flags` [1 + watched] (long; the decode loops make
        them inside their compiled bookkeeping).  Returns (all finished, the watched values) as of the
        previous step (None after the first); a listener gets the tokens up to that step."""
        seen = self._read() if self._queued else None
        queued = flags
        if self.on_tokens is not None:  # [flags | count [B] | tokens [B * L]], one copy
            queued = torch.cat([flags, self.out.count, self.out.tokens.flatten()])
        if self._host is None or self._host.shape != queued.shape:
            self._host = torch.empty(queued.shape, dtype=queued.dtype, pin_memory=self._pin)
        self._host.copy_(queued, non_blocking=True)
        if self._event is not None:
            self._event.record()
        self._queued, self._n_flags = True, flags.numel()
        return seen

    def _read(self) -> tuple[bool, list[int]]:
        """The values queued last (waits for them), streaming their tokens -> (all finished, watched)."""
        if self._event is not None:
            self._event.synchronize()
        values = self._host.tolist()  # read before the buffer is reused
        flags = values[:self._n_flags]
        if self.on_tokens is not None:
            b = len(self.sent)
            count, flat = values[self._n_flags:self._n_flags + b], values[self._n_flags + b:]
            width = len(flat) // b
            self.flush([flat[i * width:i * width + c] for i, c in enumerate(count)])
        return bool(flags[0]), flags[1:]

    def wait(self) -> tuple[bool, list[int]] | None:
        """A blocking look at the values queued last (None if none are queued): (all finished, the watched
        values) as of the step just queued.  For a loop that knows that step may have finished the batch,
        where one wasted step costs more than waiting."""
        if not self._queued:
            return None
        self._queued = False
        return self._read()

    def flush(self, tokens: list[list[int]]) -> None:
        if self.on_tokens is None:
            return
        new = [t[s:] for t, s in zip(tokens, self.sent)]  # tokens only grow: reads come in step order
        self.sent = [max(len(t), s) for t, s in zip(tokens, self.sent)]
        if any(new):
            self.on_tokens(new)
