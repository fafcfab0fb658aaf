"""Per-sequence bookkeeping of generated tokens, kept on the device: stop tokens, length limits, finish.

Each step hands in a block of candidate tokens per sequence (1 for plain decoding, up to 1 + drafts for
speculative decoding).  A sequence takes tokens up to its first stop token (which ends it and is not
part of the output) and up to its own `max_new_tokens` (which counts that stop token, as transformers
does).  Nothing here reads the device: the engine decides when to look (`snapshot`).
"""

from __future__ import annotations

import torch


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

    def add(self, new: torch.Tensor, n_new: torch.Tensor) -> None:
        """new [B, n] candidate tokens, of which the first n_new [B] are real (the rest is padding)."""
        n = new.shape[1]
        j = torch.arange(n, device=new.device)
        live = ~self.finished
        is_stop = (new.unsqueeze(-1) == self.stop.unsqueeze(1)).any(-1) & (j < n_new.unsqueeze(1))  # [B, n]
        first_stop = torch.where(is_stop.any(-1), is_stop.long().argmax(-1), n)  # [B]; n = none
        room = self.limit - self.count
        take = torch.minimum(torch.minimum(n_new, first_stop), room).clamp_min(0) * live  # tokens appended
        slots = self.count.unsqueeze(1) + j  # [B, n]
        keep = j < take.unsqueeze(1)
        self.tokens.scatter_(1, slots, torch.where(keep, new, self.tokens.gather(1, slots)))
        self.count += take
        self.stopped |= live & (first_stop < torch.minimum(n_new, room))  # the stop token fits the budget
        self.finished |= self.stopped | (self.count >= self.limit)

    def snapshot(self) -> tuple[list[list[int]], bool]:
        """(tokens of every sequence so far, whether all have finished): one device read."""
        count, tokens, done = self.count.tolist(), self.tokens.tolist(), bool(self.finished.all())
        return [row[:c] for row, c in zip(tokens, count)], done

    def finish_reasons(self) -> list[str]:
        return ["stop" if s else "length" for s in self.stopped.tolist()]
