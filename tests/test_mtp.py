"""Multi-token prediction: shapes, what each depth sees, and that it shares the embedding and head."""

import torch
from helpers import randomize_, tiny_config

from dsv3 import Transformer


def _model(depth: int) -> Transformer:
    m = Transformer(tiny_config(num_mtp_layers=depth), attn_impl="eager").eval()
    randomize_(m, 11)
    return m


def test_shapes_and_aux_outputs():
    model = _model(depth=2)
    tokens = torch.randint(0, 256, (2, 12))
    out = model(tokens, return_aux=True)
    assert out.logits.shape == (2, 12, 256)
    assert [tuple(x.shape) for x in out.mtp_logits] == [(2, 11, 256), (2, 10, 256)]
    assert out.expert_loads.shape == (len(model.moe_layers()), 8)  # 2 main MoE layers + 2 MTP blocks
    torch.testing.assert_close(out.logits, model(tokens))


def test_depth_k_sees_exactly_the_token_k_ahead():
    """mtp_logits[k-1][:, i] predicts token i+k+1 from tokens 0..i+k: it changes with token i+k
    and not with anything after it."""
    model = _model(depth=2)
    tokens = torch.randint(0, 256, (1, 12))
    base = model(tokens, return_aux=True).mtp_logits
    i = 4
    for k in (1, 2):
        changed = tokens.clone()
        changed[0, i + k] = (changed[0, i + k] + 1) % 256
        out = model(changed, return_aux=True).mtp_logits[k - 1]
        assert not torch.allclose(out[0, i], base[k - 1][0, i])
        assert torch.allclose(out[0, :i], base[k - 1][0, :i], atol=1e-5)  # earlier positions are blind to it
        later = tokens.clone()
        later[0, i + k + 1] = (later[0, i + k + 1] + 1) % 256
        assert torch.allclose(model(later, return_aux=True).mtp_logits[k - 1][0, : i + 1], base[k - 1][0, : i + 1], atol=1e-5)


def test_mtp_shares_embedding_and_head():
    model = _model(depth=1)
    names = [n for n, _ in model.mtp.named_parameters()]
    assert not any("embed" in n or n.endswith("head.weight") and "norm" not in n for n in names)
    tokens = torch.randint(0, 256, (1, 8))
    out = model(tokens, return_aux=True)
    (out.mtp_logits[0].sum()).backward()
    assert model.embed.weight.grad is not None and model.head.weight.grad is not None
