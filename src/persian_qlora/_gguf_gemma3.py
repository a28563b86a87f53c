"""Gemma 3 as llama.cpp's ``gemma3`` architecture: what llama.cpp's ``convert_hf_to_gguf.py`` writes for it.

The architecture keys llama.cpp reads, and the RMSNorm weights stored as ``1 + w`` (Gemma 3's norm multiplies by
``1 + w``, llama.cpp's by ``w``). llama.cpp fixes some of Gemma 3's shape instead of reading it (every 6th layer
global, local RoPE base 10000, query scale 1/sqrt(head_dim)); :func:`problems` names where a checkpoint differs.
"""

from __future__ import annotations

from persian_qlora._gguf_plan import Architecture, import_gguf, sentencepiece_vocabulary

# What llama.cpp's Gemma 3 (llama-model.cpp, LLM_ARCH_GEMMA3) assumes instead of reading it from the file.
_LLAMA_CPP_GLOBAL_EVERY = 6  # set_swa_pattern(6): layers 5, 11, 17, ... attend globally, the others locally
_LLAMA_CPP_LOCAL_ROPE_BASE = 10_000.0  # rope_freq_base_train_swa
_LLAMA_CPP_27B_LAYERS = 62  # the one size whose query scale is 1/sqrt(hidden/heads) instead of 1/sqrt(head_dim)


def problems(config) -> list[str]:
    """Where a Gemma 3 differs from the fixed Gemma 3 shape llama.cpp would silently run instead."""
    found = []
    expected_layers = [
        "full_attention" if (i + 1) % _LLAMA_CPP_GLOBAL_EVERY == 0 else "sliding_attention"
        for i in range(config.num_hidden_layers)
    ]
    if list(config.layer_types) != expected_layers:
        found.append(f"layer_types {list(config.layer_types)} (llama.cpp makes every 6th layer global)")
    rope = config.rope_parameters
    local = rope.get("sliding_attention", {})
    if local.get("rope_theta") != _LLAMA_CPP_LOCAL_ROPE_BASE or local.get("rope_type", "default") != "default":
        found.append(f"local RoPE {local} (llama.cpp uses base 10000, unscaled)")
    if rope.get("full_attention", {}).get("rope_type", "default") not in ("default", "linear"):
        found.append(f"global RoPE {rope['full_attention']} (llama.cpp reads default or linear scaling)")
    per_head = config.hidden_size // config.num_attention_heads
    scalar = per_head if config.num_hidden_layers == _LLAMA_CPP_27B_LAYERS else config.head_dim
    if config.query_pre_attn_scalar != scalar:
        found.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} (llama.cpp uses {scalar})")
    if config.attn_logit_softcapping is not None:
        found.append("attention soft-capping (Gemma 3 has none; llama.cpp ignores it)")
    if getattr(config, "use_bidirectional_attention", False):
        found.append("bidirectional attention (an embedding model, not a chat model)")
    if config.hidden_activation != "gelu_pytorch_tanh":
        found.append(f"activation {config.hidden_activation} (llama.cpp uses tanh-approximated GELU)")
    return found


def write_keys(writer, config) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    global_rope = config.rope_parameters["full_attention"]
    writer.add_rope_freq_base(global_rope["rope_theta"])
    writer.add_rope_freq_base_swa(config.rope_parameters["sliding_attention"]["rope_theta"])  # as the converter does
    if global_rope.get("rope_type") == "linear":
        gguf = import_gguf()
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(global_rope["factor"])
    if config.sliding_window:
        writer.add_sliding_window(config.sliding_window)
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


GEMMA3 = Architecture(
    gguf_arch="GEMMA3",
    problems=problems,
    write_keys=write_keys,
    vocabulary=sentencepiece_vocabulary,
    norm_offset=1.0,  # Gemma3RMSNorm multiplies by 1 + w
)
