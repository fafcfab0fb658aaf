"""A simple, obviously-correct sampler (full recompute each token) for end-of-training samples.
The fast cached engine is `dsv3.inference`."""

from __future__ import annotations

import torch


@torch.no_grad()
def sample(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = 40, seed: int = 0, stop_id: int | None = None, max_len: int | None = None) -> list[int]:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids], device=device)
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        window = ids[:, -max_len:] if max_len else ids
        logits = model(window)[0, -1].float()
        if temperature <= 0:
            nxt = logits.argmax()
        else:
            if top_k:
                kth = logits.topk(min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen)[0]
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        if stop_id is not None and nxt.item() == stop_id:
            break
    model.train(was_training)
    return ids[0, len(prompt_ids):].tolist()
