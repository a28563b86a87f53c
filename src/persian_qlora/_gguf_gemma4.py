"""Gemma 4's language model as llama.cpp's ``gemma4`` architecture (``src/models/gemma4.cpp`` in llama.cpp).

Unlike Gemma 3, llama.cpp reads most of Gemma 4's structure from the file: which layers slide (an array of
booleans), how many trailing layers reuse earlier keys and values, the per-layer embedding width, the full and
sliding head sizes and rotary widths, per-layer KV head counts and feed-forward widths, both RoPE bases and the
soft-cap. What is stored differently from the checkpoint:

- the RMSNorm weights as they are: ``Gemma4RMSNorm`` multiplies by ``w``, as llama.cpp does (Gemma 3's ``1 + w``
  is gone);
- the full layers' proportional RoPE, which rotates only the first ``partial_rotary_factor`` of each head's
  frequency pairs and leaves the others still, as llama.cpp's ``rope_freqs`` divisors (a generated F32 tensor):
  1 for a rotated pair, 1e30 (an angle of 0) for a still one, as llama.cpp's converter writes them;
- ``layer_scalar`` (a buffer, one number a layer) as ``blk.N.layer_output_scale.weight``;
- the vocabulary as BPE with its merges (tokenizer model ``gemma4``), not SentencePiece pieces and scores.

What llama.cpp fixes instead of reading, and so refuses here where a checkpoint differs (:func:`problems`): a query
scale of 1 (transformers' Gemma 4 has it fixed too), tanh-approximated GELU, no attention biases, causal text
attention, the KV-shared layers reading the cache of the layer two before the first shared one (sliding) or one
before it (full), one head size per layer type, unscaled RoPE. The export refuses the mixture-of-experts variant
(26B-A4B) before it gets here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import torch

from persian_qlora._gguf_plan import Architecture, Generated, Source, Vocabulary, import_gguf
from persian_qlora.errors import PersianQLoRAError

SLIDING, FULL = "sliding_attention", "full_attention"
# Pairs the full layers leave still get this divisor of their angle, as llama.cpp's converter writes it.
_STILL = 1e30
# Control tokens llama.cpp's converter marks USER_DEFINED, so that llama.cpp prints them: its Gemma 4 chat parser
# reads the thinking channel and tool calls from the generated text.
_PRINTED_CONTROL = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>")
_PRINTED_CONTROL += ('<|"|>',)
_CONTROL, _USER_DEFINED, _BYTE, _NORMAL = 3, 4, 6, 1  # gguf.TokenType
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_NO_SCORE = -1000.0  # llama.cpp's BPE reads no score; its converter writes this one for every Gemma 4 token


def _per_layer(config, attribute: str) -> list[Any]:
    """A config attribute as each layer sees it: Gemma 4's full layers override ``head_dim`` (and, with
    ``attention_k_eq_v``, ``num_key_value_heads``) through ``per_layer_config``."""
    layers = getattr(config, "per_layer_config", None)
    return [getattr(layers[i] if layers is not None else config, attribute) for i in range(config.num_hidden_layers)]


def _by_type(config, attribute: str) -> dict[str, set]:
    found: dict[str, set] = {}
    for kind, value in zip(config.layer_types, _per_layer(config, attribute), strict=True):
        found.setdefault(kind, set()).add(value)
    return found


def head_size(config, kind: str) -> int:
    """The head size of the ``kind`` layers (one per type, as llama.cpp reads it); the full layers' where a model
    has no layer of that type, as transformers' rotary embedding does."""
    sizes = _by_type(config, "head_dim")
    return next(iter(sizes.get(kind) or sizes[FULL]))


def _feed_forward_widths(config) -> list[int]:
    """Each layer's MLP width: twice ``intermediate_size`` in the KV-shared layers of a double-wide model."""
    first_shared = config.num_hidden_layers - config.num_kv_shared_layers
    double = getattr(config, "use_double_wide_mlp", False)
    return [
        config.intermediate_size * (2 if double and i >= first_shared else 1) for i in range(config.num_hidden_layers)
    ]


def _one_or_each(values: Sequence[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else list(values)


def problems(config) -> list[str]:
    """Where llama.cpp would run this Gemma 4 language model differently from transformers, each naming the part;
    empty when it runs it as transformers does."""
    found = []
    kinds = set(config.layer_types)
    if not kinds <= {SLIDING, FULL}:
        found.append(f"layer types {sorted(kinds - {SLIDING, FULL})} (llama.cpp has sliding and full layers only)")
    for kind, sizes in _by_type(config, "head_dim").items():
        if len(sizes) > 1:
            found.append(f"{kind} layers with head sizes {sorted(sizes)} (llama.cpp reads one per layer type)")
    first_shared = config.num_hidden_layers - config.num_kv_shared_layers
    if first_shared < 2:  # llama.cpp asserts it, whether or not any layer shares
        found.append(f"{first_shared} layers computing keys and values (llama.cpp needs at least 2)")
    else:
        # transformers: a shared layer reads the last unshared layer of its own type; llama.cpp: the layer two
        # before the first shared one if it slides, the one just before it if it is full.
        reads = {SLIDING: first_shared - 2, FULL: first_shared - 1}
        for kind in sorted(set(config.layer_types[first_shared:])):
            source = max((i for i in range(first_shared) if config.layer_types[i] == kind), default=None)
            if kind in reads and source != reads[kind]:
                found.append(
                    f"KV sharing: the shared {kind} layers read layer {source}'s keys and values, llama.cpp's layer "
                    f"{reads[kind]}'s"
                )
    if config.hidden_activation != "gelu_pytorch_tanh":
        found.append(f"activation {config.hidden_activation} (llama.cpp uses tanh-approximated GELU)")
    if config.attention_bias:
        found.append("attention biases (llama.cpp's Gemma 4 loads none)")
    if getattr(config, "use_bidirectional_attention", None) == "all":
        found.append("bidirectional attention on text (an embedding model; llama.cpp's Gemma 4 is causal on text)")
    rope = config.rope_parameters
    sliding, full = rope.get(SLIDING) or {}, rope.get(FULL) or {}
    if SLIDING in kinds and sliding.get("rope_type", "default") != "default":
        found.append(f"sliding-layer RoPE {sliding} (llama.cpp rotates every pair there, unscaled)")
    if full.get("rope_type", "default") not in ("default", "proportional"):
        found.append(f"full-layer RoPE {full} (llama.cpp reads default or proportional RoPE)")
    for kind, parameters in ((SLIDING, sliding), (FULL, full)):
        if parameters.get("factor", 1.0) != 1.0:
            found.append(f"{kind} RoPE scaled by {parameters['factor']} (llama.cpp's Gemma 4 reads no scaling)")
    return found


def rope_divisors(config) -> torch.Tensor:
    """llama.cpp's ``rope_freqs`` for the full layers: with ``n_rot`` = the head size, llama.cpp turns pair ``i``
    by ``position · base^(-2i/head) / divisor_i``. transformers' proportional RoPE turns the first
    ``int(partial_rotary_factor · head // 2)`` pairs by ``position · base^(-2i/head)`` and the others not at all;
    default RoPE turns them all."""
    head = head_size(config, FULL)
    parameters = config.rope_parameters.get(FULL) or {}
    share = parameters.get("partial_rotary_factor", 1.0) if parameters.get("rope_type") == "proportional" else 1.0
    turned = int(share * head // 2)
    return torch.tensor([1.0] * turned + [_STILL] * (head // 2 - turned), dtype=torch.float32)


def sources(tensors: dict[str, Source], config, vocabulary_size: int) -> dict[str, Source]:
    """The checkpoint's tensors under the names gguf's ``GEMMA4`` map knows, and the full layers' ``rope_freqs``
    (:func:`rope_divisors`). ``layer_scalar`` is a buffer without ``.weight``, which llama.cpp's converter adds, as
    llama.cpp names every stored tensor ``*.weight``."""
    gguf = import_gguf()
    divisors = rope_divisors(config)
    rope_freqs = f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight"
    generated = Generated(tuple(divisors.shape), lambda rows: divisors[rows], "the full layers' RoPE divisors")
    renamed = {f"{name}.weight" if name.endswith(".layer_scalar") else name: t for name, t in tensors.items()}
    return {rope_freqs: generated, **renamed}


def write_keys(writer, config) -> None:
    """The ``gemma4.*`` keys llama.cpp's Gemma 4 reads (``load_arch_hparams`` and the shared ones)."""
    full, sliding = head_size(config, FULL), head_size(config, SLIDING)
    rope = config.rope_parameters
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(_one_or_each(_feed_forward_widths(config)))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_one_or_each(_per_layer(config, "num_key_value_heads")))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(full)
    writer.add_value_length(full)
    writer.add_key_length_swa(sliding)
    writer.add_value_length_swa(sliding)
    writer.add_rope_dimension_count(full)  # the still pairs are rope_freqs' business
    writer.add_rope_dimension_count_swa(sliding)
    writer.add_rope_freq_base(rope[FULL]["rope_theta"])
    if rope.get(SLIDING):
        writer.add_rope_freq_base_swa(rope[SLIDING]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([kind == SLIDING for kind in config.layer_types])
    writer.add_shared_kv_layers(config.num_kv_shared_layers)
    writer.add_embedding_length_per_layer_input(config.hidden_size_per_layer_input or 0)
    # Always written: without the key llama.cpp's Gemma 4 caps at 30, and 0 turns the cap off.
    writer.add_final_logit_softcapping(config.final_logit_softcapping or 0.0)


def _check_llama_cpp_splits_like_transformers(backend, tokenizer_json: dict[str, Any], normalized_space: str) -> None:
    """Refuse a tokenizer that llama.cpp's Gemma 4 BPE would split differently from transformers.

    llama.cpp replaces spaces with ``▁``, cuts the text at runs of newlines, takes a run the vocabulary holds as one
    token whole, and applies the file's merges, best rank first, to every other piece. transformers applies the same
    merges to the whole normalised text. The two agree when spaces become ``▁``, nothing else cuts the text, no
    merge joins a newline to another character, and the merges build every newline run the vocabulary holds; a
    merge's two halves must also hold no space, since llama.cpp reads ``"left right"`` back by its first space.
    """
    model = tokenizer_json["model"]
    reasons = []
    for piece in model.get("vocab", {}):
        if piece and set(piece) == {"\n"} and len(backend.model.tokenize(piece)) != 1:
            reasons.append(f"its merges do not build the newline run {piece!r}, which llama.cpp takes whole")
            break
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        reasons.append(f"it is a {model.get('type')} model without Gemma's byte fallback")
    if normalized_space != "'▁'":
        reasons.append(f"it writes a space as {normalized_space}, not as '▁' alone")
    for left, right in (tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model.get("merges", [])):
        both = left + right
        if " " in both or ("\n" in both and set(both) != {"\n"}):
            reasons.append(f"its merge {left!r} + {right!r} joins a newline or holds a space")
            break
    if reasons:
        raise PersianQLoRAError(
            "the tokenizer cannot be written as the Gemma 4 vocabulary llama.cpp reads; llama.cpp would split some "
            f"text differently: {'; '.join(reasons)}. Gemma 4's own tokenizer passes this check"
        )


def vocabulary(tokenizer) -> Vocabulary:
    """Tokens, scores, types and merges as llama.cpp's converter writes Gemma 4's: the pieces as the tokenizer has
    them, special tokens CONTROL (the thinking and tool markers USER_DEFINED, so llama.cpp prints them), other
    added tokens USER_DEFINED, ``<0xXX>`` BYTE, the rest NORMAL; the merges in rank order. llama.cpp adds ``<bos>``
    to every Gemma 4 prompt whatever the file says (``add_bos_token`` is overridden with a warning), so the file
    says so, as the converter's does."""
    backend = tokenizer.backend_tokenizer
    tokenizer_json = json.loads(backend.to_str())
    space = repr(backend.normalizer.normalize_str(" ") if backend.normalizer is not None else " ")
    if backend.pre_tokenizer is not None and len(backend.pre_tokenizer.pre_tokenize_str("a▁b.c")) != 1:
        space = "'▁' and then cuts the text at it"  # a word-splitting pre-tokenizer: merges never cross words
    _check_llama_cpp_splits_like_transformers(backend, tokenizer_json, space)
    added, special = tokenizer.added_tokens_decoder, set(tokenizer.all_special_ids)
    tokens, types = [], []
    for index, piece in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer)))):
        if index in added and piece in _PRINTED_CONTROL:
            token_type = _USER_DEFINED
        elif index in special or (index in added and added[index].special):
            token_type = _CONTROL
        elif index in added:
            token_type = _USER_DEFINED
        elif _BYTE_PIECE.fullmatch(piece):
            token_type = _BYTE
        else:
            token_type = _NORMAL
        tokens.append(piece)
        types.append(token_type)
    merges = [" ".join(m) if isinstance(m, list) else m for m in tokenizer_json["model"].get("merges", [])]
    scores = [_NO_SCORE] * len(tokens)
    special_ids = ("bos", "eos", "unk", "pad", "mask")  # what the converter's SpecialVocab writes for Gemma 4
    return Vocabulary(tokens, scores, types, "gemma4", None, merges, adds_bos=True, special=special_ids)


GEMMA4 = Architecture(
    gguf_arch="GEMMA4",
    problems=problems,
    write_keys=write_keys,
    vocabulary=vocabulary,
    sources=sources,
)
