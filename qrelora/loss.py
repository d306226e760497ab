"""The language-model loss without the whole logits: the LM head and cross-entropy, a chunk of tokens at a time.

transformers' LlamaForCausalLM computes the logits of every token (tokens x vocabulary, in bf16 under autocast),
upcasts them to fp32 and keeps the softmax for the backward: at the 1.3B recipe's micro-batch (4,096 tokens,
32,000 entries) that is about 1.5 GiB live at the start of the backward. Here each chunk's logits are made,
reduced to its loss and turned into its gradients at once (the gradient of cross-entropy is softmax minus the
one-hot target), so at most one chunk's logits exist at a time. The GEMMs are those of the usual forward and
backward (logits, input gradient, weight gradient), in the same dtype: nothing is recomputed.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100  # transformers' label for "no target here"
CHUNK_LOGITS_BYTES = 64 * 2**20  # fp32 logits of one chunk; 524 tokens at a 32,000-entry vocabulary


class _LinearCrossEntropyFn(torch.autograd.Function):
    """Mean cross-entropy of (hidden @ weight^T) against labels, by chunks of rows; the gradients of hidden and
    weight are made in the forward (when asked for) and scaled by the incoming gradient in the backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, dtype: torch.dtype, rows: int,
                need_hidden: bool, need_weight: bool) -> Tensor:
        w = weight.to(dtype)
        count = (labels != IGNORE_INDEX).sum().clamp(min=1).float()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows].to(dtype)
            target = labels[start:start + rows]
            valid = target != IGNORE_INDEX
            index = target.clamp(min=0)[:, None]
            logits = (h @ w.t()).float()  # as transformers' loss: 16-bit logits, upcast
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, index)[:, 0]) * valid).sum()
            if need_hidden or need_weight:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad.scatter_add_(1, index, -valid[:, None].to(grad.dtype))
                grad = grad.mul_(valid[:, None]).to(dtype)
                if need_hidden:
                    grad_hidden[start:start + rows] = grad @ w
                if need_weight:
                    grad_weight.add_(grad.t() @ h)  # upcast element by element, no fp32 copy
            del logits
        ctx.has_grads = grad_hidden is not None, grad_weight is not None
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight) if t is not None), count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        *grads, count = ctx.saved_tensors
        scale, grads = grad_loss / count, iter(grads)
        has_hidden, has_weight = ctx.has_grads
        grad_hidden = next(grads) * scale if has_hidden else None
        grad_weight = next(grads) * scale if has_weight else None
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy of a causal LM from its final hidden states (batch x seq x hidden), the
    LM head's weight and the input ids as labels (shifted here, IGNORE_INDEX ignored), as transformers'
    LlamaForCausalLM computes it with labels, without holding more than one chunk's logits."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = labels[:, 1:].reshape(-1)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    rows = max(1, CHUNK_LOGITS_BYTES // (4 * weight.shape[0]))
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropyFn.apply(hidden, weight, labels, dtype, rows, grad and hidden.requires_grad,
                                       grad and weight.requires_grad)


def use_chunked_loss(model: nn.Module) -> nn.Module:
    """Make `model(input_ids=..., labels=...)` compute its loss with linear_cross_entropy (the output then has
    no logits); without labels the model's own forward runs, logits included. The override lives on the
    instance, so the class, the state dict and what save_pretrained writes stay transformers' own."""
    if getattr(model, "lm_head", None) is None or model.lm_head.bias is not None or not hasattr(model, "model"):
        return model  # not a decoder with a bias-free LM head: keep transformers' loss
    model.forward = types.MethodType(_forward_with_chunked_loss, model)
    return model


def _forward_with_chunked_loss(self, *args, labels: Tensor | None = None, **kwargs):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if labels is None:
        return type(self).forward(self, *args, **kwargs)
    hidden = self.model(*args, **kwargs).last_hidden_state
    return CausalLMOutputWithPast(loss=linear_cross_entropy(hidden, self.lm_head.weight, labels))
