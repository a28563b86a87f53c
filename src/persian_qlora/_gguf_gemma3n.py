"""Gemma 3n's language model as llama.cpp's ``gemma3n`` architecture (src/models/gemma3n.cpp).

What goes in follows llama.cpp's converter (conversion/gemma.py, ``Gemma3NModel``): Gemma 3's keys plus AltUp's,
the per-layer width, the KV-sharing count, the sparsity scales and the sliding-window pattern as an array; the norms
stored as they are (Gemma 3n's RMSNorm multiplies by ``w``, as llama.cpp's does); the three AltUp projections and
the three unembedding projections each stacked into one tensor; the AltUp coefficient matrices in F32. llama.cpp
scales the token and per-layer embeddings itself (by sqrt(hidden) and sqrt(per-layer width)), as transformers'
scaled embeddings do, so the tables are written unscaled.

Where the file differs from the checkpoint, and why (each a :class:`Generated` tensor):

- the per-layer table has a row per token, as llama.cpp indexes it by token id. transformers reads row 0 for a token
  past ``vocab_size_per_layer_input`` (``get_per_layer_inputs``), so those rows are row 0's (llama.cpp's converter
  pads zeros instead, which would run those tokens differently);
- transformers saves no k/v projections and no k norm in the KV-shared layers (they reuse an earlier layer's keys
  and values), while llama.cpp requires ``attn_k``, ``attn_v`` and ``attn_k_norm`` in every layer. In a shared layer
  (``!hparams.has_kv(il)`` in gemma3n.cpp) llama.cpp computes only the query and attends over the cache of layer
  18 or 19, so it never reads them: they are written as zeros of the right shape.

llama.cpp fixes much of 3n's structure instead of reading it (llama-hparams.h, models.h, gemma3n.cpp):
:func:`problems` names every part of a checkpoint that differs, and such a checkpoint is refused.
"""

from __future__ import annotations

import torch

from persian_qlora._gguf_gemma3 import write_keys as write_gemma3_keys
from persian_qlora._gguf_plan import Architecture, Generated, Source, sentencepiece_vocabulary
from persian_qlora._shards import StoredTensor, read_tensor

# What llama.cpp's Gemma 3n assumes instead of reading it from the file.
_KV_FROM_START = 20  # n_layer_kv_from_start: layers 20 onwards reuse the KV of layer 18 (sliding) or 19 (full)
_SPARSE_LAYERS = 10  # n_layer_sparsity: Gaussian top-k activation sparsity in the first 10 layers...
_SPARSITY = 0.95  # ... at f_sparsity_std_mul = icdf(0.95), in every one of them
_ALTUP_INPUTS = 4  # n_altup
_ALTUP_ACTIVE = 0  # i_altup_act
_LAUREL_RANK = 64  # laurel_rank
_PER_LAYER_WIDTH = 256  # n_embd_altup
_SOFTCAP = 30.0  # f_final_logit_softcapping: not read from the file for gemma3n
_LAYER_TYPES = ("sliding_attention", "full_attention")


def _llama_cpp_kv_source(layer_type: str) -> int:
    return _KV_FROM_START - (2 if layer_type == "sliding_attention" else 1)


def problems(config) -> list[str]:
    """Where a Gemma 3n differs from the structure llama.cpp would run instead (E2B's and E4B's)."""
    found = []
    layers, types = config.num_hidden_layers, list(config.layer_types)
    if set(types) - set(_LAYER_TYPES):
        found.append(f"layer_types {sorted(set(types) - set(_LAYER_TYPES))} (llama.cpp has sliding and full layers)")
    first_shared = layers - config.num_kv_shared_layers
    if first_shared != _KV_FROM_START:
        found.append(
            f"KV sharing from layer {first_shared} ({layers} layers, num_kv_shared_layers "
            f"{config.num_kv_shared_layers}; llama.cpp shares from layer {_KV_FROM_START}, as E2B and E4B do)"
        )
    else:
        for index in range(first_shared, layers):
            source = max((j for j in range(first_shared) if types[j] == types[index]), default=None)
            if source != _llama_cpp_kv_source(types[index]):
                found.append(
                    f"layer_types {types} (KV-shared layer {index} reads layer {source}'s keys and values; llama.cpp "
                    f"reads layer {_llama_cpp_kv_source(types[index])}'s)"
                )
                break
    sparsity = [_SPARSITY] * min(layers, _SPARSE_LAYERS) + [0.0] * max(0, layers - _SPARSE_LAYERS)
    if [float(s) for s in config.activation_sparsity_pattern] != sparsity:
        found.append(
            f"activation_sparsity_pattern {list(config.activation_sparsity_pattern)} (llama.cpp keeps the top 5 % "
            f"of the gate in the first {_SPARSE_LAYERS} layers and no sparsity after)"
        )
    fixed = {
        "altup_num_inputs": _ALTUP_INPUTS,
        "altup_active_idx": _ALTUP_ACTIVE,
        "altup_correct_scale": True,
        "laurel_rank": _LAUREL_RANK,
        "hidden_size_per_layer_input": _PER_LAYER_WIDTH,
        "final_logit_softcapping": _SOFTCAP,
        "hidden_activation": "gelu_pytorch_tanh",
    }
    for key, value in fixed.items():
        if getattr(config, key) != value:
            found.append(f"{key} {getattr(config, key)!r} (llama.cpp uses {value!r})")
    for layer_type, rope in config.rope_parameters.items():
        if rope.get("rope_type", "default") != "default":
            found.append(f"{layer_type} RoPE {rope} (llama.cpp runs Gemma 3n's RoPE unscaled)")
    return found


def write_keys(writer, config) -> None:
    """Gemma 3's keys, then what llama.cpp's converter adds for 3n (those llama.cpp does not read, such as the AltUp
    sizes, are written as the converter writes them, for other readers)."""
    write_gemma3_keys(writer, config)
    writer.add_altup_active_idx(config.altup_active_idx)
    writer.add_altup_num_inputs(config.altup_num_inputs)
    writer.add_embedding_length_per_layer_input(config.hidden_size_per_layer_input)
    writer.add_shared_kv_layers(config.num_kv_shared_layers)
    normal = torch.distributions.normal.Normal(0, 1)
    writer.add_activation_sparsity_scale(
        [float(normal.icdf(torch.tensor(s, dtype=torch.float32))) for s in config.activation_sparsity_pattern]
    )
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])


def _stacked(parts: list[StoredTensor]) -> Generated:
    """Three AltUp projections as the one {n_embd, n_embd, 3} tensor llama.cpp multiplies by."""
    return Generated(
        (len(parts), *parts[0].shape),
        lambda rows: torch.stack([read_tensor(part) for part in parts[rows]]),
        f"{parts[0].name} to {parts[-1].name}, stacked",
    )


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, why: str) -> Generated:
    return Generated(shape, lambda rows: torch.zeros((rows.stop - rows.start, *shape[1:]), dtype=dtype), why)


def _per_layer_rows(table: StoredTensor, tokens: int) -> Source:
    """The per-layer table with one row per token: a token past the table reads row 0, as in transformers."""
    if table.shape[0] == tokens:
        return table

    def rows(block: slice) -> torch.Tensor:
        inside = slice(min(block.start, table.shape[0]), min(block.stop, table.shape[0]))
        past = block.stop - block.start - (inside.stop - inside.start)
        parts = [read_tensor(table, inside)] if inside.stop > inside.start else []
        if past:
            parts.append(read_tensor(table, slice(0, 1)).expand(past, -1))
        return torch.cat(parts)

    return Generated((tokens, *table.shape[1:]), rows, f"{table.name}, row 0 for tokens past its {table.shape[0]}")


def sources(tensors: dict[str, Source], config, vocabulary_size: int) -> dict[str, Source]:
    """The file's tensors from the language model's: stacked AltUp projections, the per-layer table a row per
    token, zero k/v (and k norm) in the KV-shared layers, and ``correct_output_scale`` named as a weight."""
    out: dict[str, Source] = {}
    first_shared = config.num_hidden_layers - config.num_kv_shared_layers
    kv_width = config.num_key_value_heads * config.head_dim
    for name, source in tensors.items():
        if name.startswith(("model.altup_projections.", "model.altup_unembed_projections.")):
            stacked = name.rsplit(".", 2)[0] + ".weight"
            if stacked not in out:
                prefix = name.rsplit(".", 2)[0]
                out[stacked] = _stacked([tensors[f"{prefix}.{i}.weight"] for i in range(config.altup_num_inputs - 1)])
            continue
        if name == "model.embed_tokens_per_layer.weight":
            source = _per_layer_rows(source, vocabulary_size)
        out[name + ".weight" if name.endswith("correct_output_scale") else name] = source
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer is not None and int(layer) >= first_shared and name.endswith(("q_proj.weight", "q_norm.weight")):
            attention = f"model.layers.{layer}.self_attn"
            why = "zeros: llama.cpp requires it in a KV-shared layer but never reads it there"
            if name.endswith("q_proj.weight"):
                for projection in ("k_proj", "v_proj"):
                    shape = (kv_width, config.hidden_size)
                    out[f"{attention}.{projection}.weight"] = _zeros(shape, source.dtype, why)
            else:
                out[f"{attention}.k_norm.weight"] = _zeros((config.head_dim,), source.dtype, why)
    return out


GEMMA3N = Architecture(
    gguf_arch="GEMMA3N",
    problems=problems,
    write_keys=write_keys,
    vocabulary=sentencepiece_vocabulary,
    sources=sources,
    kept_f32=("ALTUP_CORRECT_COEF", "ALTUP_PREDICT_COEF"),  # as llama.cpp's converter and quantizer keep them
)
