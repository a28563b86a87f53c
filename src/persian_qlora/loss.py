"""A lean causal-LM loss for Gemma's 262,144-token vocabulary: logits only where a label is, a chunk at a time.

The plain loss projects every position onto the vocabulary: for 2 × 4000 tokens that is 2.1 G logits, 8 GB in fp32,
before its log-softmax and gradient. Here only the labelled positions (the model turns) are projected,
``chunk_size`` rows at a time, and no chunk's logits outlive it, so peak memory is O(chunk_size × vocab) whatever
the batch. transformers' ``logits_to_keep`` selects positions but still materialises them all at once, TRL's
chunked losses need its own trainer and data format, and Liger's fused kernels need Triton (a GPU); this small
function fits our ``Trainer`` and turn labels, on any device.

With a frozen bias-free LM head (QLoRA and LoRA on Gemma: tied, untrained embeddings), each chunk's gradient
with respect to its hidden states is computed in the forward pass, while its logits are at hand, as Liger's fused
linear cross-entropy does: two matmuls per chunk, as many as the plain loss. The same holds when peft trains a few
of the head's rows (``trainable_token_indices``: the defaults train ``<end_of_turn>``'s row on a pretrained base):
the head is then the frozen weight with those rows replaced, and the rows' own gradient is taken from the same
chunk's softmax, a matmul of a few rows. Any other trainable or wrapped head (e.g. ``lm_head`` among the LoRA
targets) recomputes each chunk in the backward pass (activation checkpointing): one matmul more. Without gradients
(evaluation, :func:`~persian_qlora.perplexity.perplexity`) the fused path only runs forward,
and still holds one chunk of logits at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from persian_qlora.masking import IGNORE_INDEX

__all__ = ["DEFAULT_CHUNK_SIZE", "chunked_causal_lm_loss", "final_hidden_states", "lean_model_loss"]

DEFAULT_CHUNK_SIZE = 256  # rows per chunk: 256 MiB of fp32 logits at Gemma's vocabulary

_NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep: the model projects no position


def final_hidden_states(model: torch.nn.Module, causal_lm, **inputs) -> torch.Tensor:
    """Run ``model`` (``causal_lm`` itself, or it wrapped by peft/DDP) and return what its LM head would read.

    The model's own forward runs, so wrappers and their hooks work as usual, but it projects no position onto the
    vocabulary (``logits_to_keep`` empty). The states come from the decoder's ``last_hidden_state``: for Gemma 3n,
    ``hidden_states[-1]`` is the AltUp streams, not the final states.
    """
    captured = []
    hook = causal_lm.get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
    try:
        model(**inputs, logits_to_keep=_NO_LOGITS)
    finally:
        hook.remove()
    return captured[-1]


def _head_logits(lm_head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``lm_head(hidden)``; for a head with peft's trainable token rows, the frozen head's logits with those few
    columns computed from the trained rows. peft's own forward copies the whole 262k-row matrix on every call to
    write the rows into it, and this loss calls the head once per chunk."""
    from peft.utils.other import TrainableTokensWrapper

    layer = getattr(lm_head, "token_adapter", None)
    if not isinstance(lm_head, TrainableTokensWrapper) or layer.merged or layer.disable_adapters:
        return lm_head(hidden)
    logits = layer.base_layer(hidden)
    for name in layer.active_adapters:
        index = torch.tensor(layer.token_indices[name], device=logits.device)
        rows = layer.trainable_tokens_delta[name].to(hidden.dtype)
        logits = logits.index_copy(-1, index, (hidden @ rows.T).to(logits.dtype))
    return logits


def _chunk_nll_sum(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, softcap: float | None):
    logits = _head_logits(lm_head, hidden).float()  # the loss in fp32, as transformers' ForCausalLMLoss
    if softcap is not None:  # Gemma 3n caps its final logits (Gemma 3 does not)
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def _fused_chunk(hidden, weight, trained_rows, targets, softcap, with_grad):
    """One chunk's summed NLL and, ``with_grad``, its gradient with respect to its logits (in ``weight``'s dtype).

    ``trained_rows`` (index, rows), when given, replace those rows of ``weight``. The logits die with the chunk.
    """
    logits = hidden @ weight.T
    if trained_rows is not None:
        index, rows = trained_rows
        logits.index_copy_(1, index, hidden @ rows.T)
    logits = logits.float()  # the loss in fp32, as transformers' ForCausalLMLoss
    if softcap is not None:  # Gemma 3n caps its final logits: c·tanh(z / c)
        capped = logits.div_(softcap).tanh_()
        logits = capped * softcap if with_grad else capped.mul_(softcap)  # tanh is kept for the gradient only
    picked = logits.gather(1, targets[:, None])
    row_max = logits.amax(dim=1, keepdim=True)
    probs = logits.sub_(row_max).exp_()  # in place: no second chunk-sized tensor
    sums = probs.sum(dim=1, keepdim=True)
    nll = (row_max + sums.log() - picked).sum()
    if not with_grad:
        return nll, None
    grad = probs.div_(sums).scatter_add_(1, targets[:, None], torch.full_like(picked, -1))  # softmax - one-hot
    if softcap is not None:  # d(c·tanh(z / c))/dz = 1 - tanh²
        grad.mul_(capped.square_().neg_().add_(1))
    return nll, grad.to(weight.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ W.T`` over chunks of rows, its gradients computed on the way.

    ``W`` is the frozen ``weight`` (it gets no gradient), or, with ``row_index`` and ``rows``, that weight with
    those rows replaced by ``rows``, which do get one. Keeps only the (rows × hidden) input gradient and the
    (trained rows × hidden) rows' gradient for the backward pass, never a chunk's logits: two vocabulary-sized
    matmuls per chunk, where recomputing the chunk in the backward pass costs three.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_size, row_index, rows):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[6]
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        trained_rows = None if rows is None else (row_index, rows)
        grad_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) if trained_rows else None
        for start in range(0, targets.numel(), chunk_size):
            chunk = slice(start, start + chunk_size)
            nll, grad = _fused_chunk(hidden[chunk], weight, trained_rows, targets[chunk], softcap, with_grad)
            total += nll
            if not with_grad:
                continue
            if trained_rows is None:
                grad_hidden[chunk] = grad @ weight
                continue
            # The effective weight's rows at row_index are ``rows``, not the frozen ones: their columns of the
            # logits' gradient go through ``rows`` (and into the rows' own gradient), the rest through ``weight``.
            grad_at_rows = grad[:, row_index]
            grad_hidden[chunk] = grad.index_fill_(1, row_index, 0) @ weight + grad_at_rows @ rows
            grad_rows += (grad_at_rows.T @ hidden[chunk]).float()
        ctx.save_for_backward(grad_hidden, grad_rows)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_rows = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_rows is not None:
            grad_rows = grad_rows * grad_output
        return grad_hidden, None, None, None, None, None, grad_rows


def _fused_head(lm_head: torch.nn.Module, hidden: torch.Tensor):
    """``(weight, row_index, rows)`` for the fused path when it computes what ``lm_head(hidden)`` would and all the
    gradient the loss needs, else ``None``.

    It reads the weight directly, so the head must be a plain, bias-free ``nn.Linear`` (not a bitsandbytes or LoRA
    layer, whose forward does more) on the states' device (not offloaded), and get no gradient; or such a linear
    wrapped by peft's trainable token rows (``row_index``, ``rows``: the active adapters' rows, which replace the
    frozen ones and get their gradient). Otherwise the chunks are recomputed, through the head's own forward.
    """
    from peft.utils.other import TrainableTokensWrapper

    row_index = rows = None
    if isinstance(lm_head, TrainableTokensWrapper):
        layer = lm_head.token_adapter
        if layer.merged or layer.disable_adapters or not layer.active_adapters:
            return None  # peft's forward unmerges or skips the rows first: left to it
        names = layer.active_adapters  # peft refuses overlapping rows, so they are replaced in one go
        row_index = torch.tensor([i for name in names for i in layer.token_indices[name]], device=hidden.device)
        lm_head = layer.base_layer
        rows = torch.cat([layer.trainable_tokens_delta[name] for name in names]).to(lm_head.weight.dtype)
    fusable = (
        type(lm_head) is torch.nn.Linear
        and lm_head.bias is None
        and lm_head.weight.device == hidden.device
        and not (torch.is_grad_enabled() and lm_head.weight.requires_grad)
    )
    return (lm_head.weight, row_index, rows) if fusable else None


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Module,
    *,
    softcap: float | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Next-token cross-entropy from the final (normed) hidden states, equal to the plain causal-LM loss.

    ``labels`` are aligned with the inputs (shifted here, -100 ignored). The summed loss is divided by
    ``num_items_in_batch`` when given, the trained tokens of the whole accumulated batch, as transformers'
    ``ForCausalLMLoss`` does, so gradient accumulation weighs every token alike; otherwise by this batch's count.
    A frozen, bias-free ``nn.Linear`` head takes the fused path, also with peft's trainable token rows; any other
    head (trainable, or a LoRA layer) recomputes each chunk in the backward pass.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    selected = hidden_states[:, :-1][trained]
    targets = targets[trained]
    fused = _fused_head(lm_head, selected)
    if fused is not None:
        weight, row_index, rows = fused
        total = _FusedLinearCrossEntropy.apply(selected, weight, targets, softcap, chunk_size, row_index, rows)
    else:
        total = selected[:0].float().sum()  # zero, but on the graph: a batch with no label still backpropagates
        for start in range(0, targets.numel(), chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = (selected[rows], targets[rows], lm_head, softcap)
            total = total + checkpoint(_chunk_nll_sum, *chunk, use_reentrant=False)
    if num_items_in_batch is None:
        num_items_in_batch = targets.numel()
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def lean_model_loss(
    model: torch.nn.Module,
    labels: torch.Tensor,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **inputs,
) -> torch.Tensor:
    """:func:`chunked_causal_lm_loss` of ``model`` (a Gemma causal LM, possibly wrapped by peft, DDP or accelerate)
    on ``inputs``, with its LM head and final-logit soft-cap: what the trainer and ``perplexity()`` compute."""
    from accelerate.utils import extract_model_from_parallel
    from transformers.trainer_utils import unwrap_peft_model

    from persian_qlora.families import family_of

    causal_lm = unwrap_peft_model(extract_model_from_parallel(model))
    return chunked_causal_lm_loss(
        final_hidden_states(model, causal_lm, **inputs),
        labels,
        causal_lm.get_output_embeddings(),
        softcap=family_of(causal_lm).final_logit_softcap(causal_lm.config),
        num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
    )
