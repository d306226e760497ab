"""The chunked LM loss against transformers' own (logits of every token, upcast, cross-entropy)."""

import pytest
import torch
from transformers import LlamaForCausalLM

import qrelora.loss
from qrelora.config import ModelConfig
from qrelora.models import build_model

VOCAB, SEQ = 256, 32


def model_pair():
    """Our model (chunked loss) and the same weights as a plain transformers model (its own loss)."""
    ours = build_model(ModelConfig(preset="custom", hidden_size=64, num_layers=2, num_heads=4, mlp_size=96), VOCAB, SEQ)
    plain = LlamaForCausalLM(ours.config)
    plain.load_state_dict(ours.state_dict())
    assert "forward" in vars(ours) and "forward" not in vars(plain)
    return ours, plain


def loss_and_grads(model, x, labels, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=x, labels=labels).loss
    (3 * loss).backward()  # a scaled loss (as with gradient accumulation) scales the gradients
    return loss.detach().float(), [p.grad.clone() for p in model.parameters()]


def batch():
    x = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(0))
    labels = x.clone()
    labels[0, 5:9] = qrelora.loss.IGNORE_INDEX  # ignored targets count neither in the sum nor in the mean
    return x, labels


@pytest.mark.parametrize("rows", [7, 10**6])  # several chunks, the last one short; one chunk
def test_chunked_loss_and_gradients_equal_transformers_in_fp32(rows, monkeypatch):
    monkeypatch.setattr(qrelora.loss, "CHUNK_LOGITS_BYTES", rows * 4 * VOCAB)
    ours, plain = model_pair()
    x, labels = batch()
    (loss, grads), (ref_loss, ref_grads) = (loss_and_grads(m, x, labels, autocast=False) for m in (ours, plain))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_chunked_loss_under_bf16_autocast_is_as_close_to_fp32_as_transformers_own(monkeypatch):
    """Under autocast both compute 16-bit logits and an fp32 loss; the gradients differ by rounding only (the
    chunked head gradient is summed in fp32 chunk by chunk), so ours must be as close to the fp32 values."""
    monkeypatch.setattr(qrelora.loss, "CHUNK_LOGITS_BYTES", 7 * 4 * VOCAB)
    ours, plain = model_pair()
    x, labels = batch()
    ref_loss, ref_grads = loss_and_grads(plain, x, labels, autocast=False)
    errors = {}
    for name, model in (("ours", ours), ("transformers", plain)):
        loss, grads = loss_and_grads(model, x, labels, autocast=True)
        assert abs(loss - ref_loss) < 1e-3
        errors[name] = max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads))
    assert errors["ours"] <= 1.5 * errors["transformers"], errors


def test_without_labels_or_gradients_the_model_is_transformers_own():
    ours, plain = model_pair()
    x, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, plain(input_ids=x).logits, rtol=0, atol=0)
        torch.testing.assert_close(ours(input_ids=x, labels=labels).loss, plain(input_ids=x, labels=labels).loss,
                                   rtol=1e-6, atol=1e-6)
        assert ours(input_ids=x, labels=labels).logits is None  # the whole logits are what is never made
