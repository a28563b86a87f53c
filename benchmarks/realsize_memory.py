"""What Gemma checkpoints hold on the accelerator under QLoRA, counted from their published configs.

Part 0 (always) is the table of docs/models.md: every Gemma 3, Gemma 3n and Gemma 4 E2B/E4B/31B checkpoint, its language
model built on the meta device from its published text configuration (what a text-only load builds, so no timm),
and the bytes its weights hold on the accelerator under persian-qlora's default QLoRA (text-only, NF4 + double
quantisation, LoRA r=8, the per-layer embeddings of Gemma 3n and Gemma 4 E-models on the host). The parameter count
of each is printed beside the one Google publishes for it, where published (keras-hub's presets), as a check on the
configuration.

Part 1 builds each whole multimodal model on the meta device (no weights, no GPU) and counts the bytes each
parameter would hold on the accelerator, for:

- QLoRA text-only (persian-qlora's default): the language model alone, linears in NF4 with double quantisation,
  everything else in bf16, LoRA r=8 on the 7 projections in fp32;
- QLoRA whole-model (``text_only=False``): the same plus the towers in bf16 (never quantised);
- peft's default preparation: the whole model as ``AutoModelForCausalLM`` loads it, with only the LM head, AltUp and
  nothing else skipped by bitsandbytes (so the towers' linears are 4-bit too), then
  ``prepare_model_for_kbit_training``, which casts every parameter that is not 4-bit to fp32;

each with Gemma 3n's per-layer embeddings on the accelerator and on the host. The NF4 byte count is checked against
a real 4-bit load of a tiny model on the CPU. Activations, optimizer state and the CUDA context are not counted:
these are the weights alone.

Part 2 (``--rss``) measures the CPU resident memory of loading a real-width Gemma 3n E4B cut to a few language
layers (random bf16 weights, the hub's layout, with the real-size vision and audio towers), text-only against
whole-model, each in a fresh process. Whole-model needs timm.

    python benchmarks/realsize_memory.py
    python benchmarks/realsize_memory.py --rss --layers 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GB = 1e9

# google/gemma-3-4b-it's published config.json (text and SigLIP vision).
GEMMA3_4B_TEXT = dict(
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=34,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    vocab_size=262_208,
    query_pre_attn_scalar=256,
    sliding_window=1024,
)
GEMMA3_4B_VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=896,
    patch_size=14,
    vision_use_head=False,
)


# The language models of the other checkpoints: google/gemma-3-{270m,1b}-it and the text configs of
# google/gemma-3-{12b,27b}-it (their published config.json files). Every other field is transformers' default.
GEMMA3_TEXT = {
    "Gemma 3 270M": dict(
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262_144,
        query_pre_attn_scalar=256,
        sliding_window=512,
    ),
    "Gemma 3 1B": dict(
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262_144,
        query_pre_attn_scalar=256,
        sliding_window=512,
    ),
    "Gemma 3 4B": GEMMA3_4B_TEXT,
    "Gemma 3 12B": dict(
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        vocab_size=262_208,
        query_pre_attn_scalar=256,
        sliding_window=1024,
    ),
    "Gemma 3 27B": dict(
        hidden_size=5376,
        intermediate_size=21504,
        num_hidden_layers=62,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        vocab_size=262_208,
        query_pre_attn_scalar=168,
        sliding_window=1024,
    ),
}
# The parameters of each language model as Google publishes them in keras-hub's Gemma 3 presets (the text-only
# presets: the language model alone), to check the configurations above against.
PUBLISHED_TEXT_PARAMETERS = {
    "Gemma 3 270M": 268_098_176,
    "Gemma 3 1B": 999_885_952,
    "Gemma 3 4B": 3_880_099_328,
    "Gemma 3 12B": 11_765_788_416,
    "Gemma 3 27B": 27_009_002_240,
}
CHECKPOINTS = {
    "Gemma 3 270M": ("google/gemma-3-270m-it", "gemma3_text"),
    "Gemma 3 1B": ("google/gemma-3-1b-it", "gemma3_text"),
    "Gemma 3 4B": ("google/gemma-3-4b-it", "gemma3"),
    "Gemma 3 12B": ("google/gemma-3-12b-it", "gemma3"),
    "Gemma 3 27B": ("google/gemma-3-27b-it", "gemma3"),
    "Gemma 3n E2B": ("google/gemma-3n-E2B-it", "gemma3n"),
    "Gemma 3n E4B": ("google/gemma-3n-E4B-it", "gemma3n"),
    "Gemma 4 E2B": ("google/gemma-4-E2B-it", "gemma4"),
    "Gemma 4 E4B": ("google/gemma-4-E4B-it", "gemma4"),
    "Gemma 4 31B": ("google/gemma-4-31B-it", "gemma4"),
}


def e2b_text_config():
    """Gemma 3n E2B's language model: E4B's (transformers' defaults) with 30 layers of intermediate size 8192, 10 of
    them sharing their KV cache, and activation sparsity in the first 10."""
    from transformers import Gemma3nTextConfig

    default = Gemma3nTextConfig()
    return Gemma3nTextConfig(
        num_hidden_layers=30,
        intermediate_size=8192,
        num_kv_shared_layers=10,
        layer_types=default.layer_types[:30],
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * 20,
    )


def text_config(name: str):
    """The language model's configuration of checkpoint ``name``: what a text-only load builds."""
    from transformers import Gemma3nTextConfig, Gemma3TextConfig, Gemma4TextConfig

    if name in GEMMA4_TEXT:
        return Gemma4TextConfig(**GEMMA4_TEXT[name])
    if name == "Gemma 3n E4B":
        return Gemma3nTextConfig()
    if name == "Gemma 3n E2B":
        return e2b_text_config()
    return Gemma3TextConfig(**GEMMA3_TEXT[name])


# Gemma 4 E2B and E4B's language models, from their published dimensions: E2B from the GGUF metadata of Ollama's
# gemma4:e2b (35 blocks, width 1536, 8 query heads and 1 KV head, key length 256 sliding / 512 global, 20 KV-shared
# layers, window 512, pattern of 4 sliding then 1 global, feed-forward 6144 doubled in the KV-shared layers, per-layer
# width 256), E4B from NVIDIA Megatron-Bridge's Gemma 4 recipe (42 layers, width 2560, feed-forward 10240, 8 query and
# 2 KV heads, head 256 sliding / 512 global, 5 sliding then 1 global, per-layer width 256, KV shared across the last
# 18 layers). Both have 262,144 tokens and a final soft-cap of 30. Their towers are transformers' Gemma4VisionConfig
# and Gemma4AudioConfig defaults ("similar to google/gemma-4-e2b-it").
GEMMA4_E2B_TEXT = dict(
    hidden_size=1536,
    intermediate_size=6144,
    num_hidden_layers=35,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=256,
    global_head_dim=512,
    num_kv_shared_layers=20,
    use_double_wide_mlp=True,
    sliding_window=512,
    layer_types=["sliding_attention" if (i + 1) % 5 else "full_attention" for i in range(35)],
    hidden_size_per_layer_input=256,
    final_logit_softcapping=30.0,
)
GEMMA4_E4B_TEXT = dict(
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=42,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=256,
    global_head_dim=512,
    num_kv_shared_layers=18,
    sliding_window=512,
    layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(42)],
    hidden_size_per_layer_input=256,
    final_logit_softcapping=30.0,
)

# Gemma 4 31B's language model, from google/gemma-4-31B-it's config.json as several independent projects quote it
# (the hub is out of reach here): 60 layers, width 5376, feed-forward 21504, 32 query heads, 16 KV heads of 256 in the
# sliding layers and 4 of 512 in the global ones, whose keys double as values (attention_k_eq_v), 5 sliding then 1
# global, window 1024, no per-layer embeddings, no KV sharing, a tied head, soft-cap 30. Built on the meta device it
# has 30,697,345,280 parameters, the 30.7 B Google's model card gives for the 31B.
GEMMA4_31B_TEXT = dict(
    hidden_size=5376,
    intermediate_size=21504,
    num_hidden_layers=60,
    num_attention_heads=32,
    num_key_value_heads=16,
    num_global_key_value_heads=4,
    head_dim=256,
    global_head_dim=512,
    attention_k_eq_v=True,
    num_kv_shared_layers=0,
    sliding_window=1024,
    layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(60)],
    hidden_size_per_layer_input=0,
    max_position_embeddings=262_144,
    final_logit_softcapping=30.0,
)

GEMMA4_TEXT = {"Gemma 4 E2B": GEMMA4_E2B_TEXT, "Gemma 4 E4B": GEMMA4_E4B_TEXT, "Gemma 4 31B": GEMMA4_31B_TEXT}


def gemma4_config(text: dict):
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    return Gemma4Config(
        text_config=Gemma4TextConfig(**text), vision_config=Gemma4VisionConfig(), audio_config=Gemma4AudioConfig()
    )


def e4b_config(text_layers: int | None = None):
    """Gemma 3n E4B: transformers' ``Gemma3nConfig`` defaults are google/gemma-3n-E4B-it's."""
    from transformers import Gemma3nConfig, Gemma3nTextConfig

    if text_layers is None:
        return Gemma3nConfig()
    default = Gemma3nTextConfig()
    text = Gemma3nTextConfig(
        num_hidden_layers=text_layers,
        layer_types=default.layer_types[:text_layers],
        activation_sparsity_pattern=list(default.activation_sparsity_pattern)[:text_layers],
        num_kv_shared_layers=0,
    )
    return Gemma3nConfig(text_config=text)


def gemma3_4b_config():
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    return Gemma3Config(
        text_config=Gemma3TextConfig(**GEMMA3_4B_TEXT), vision_config=SiglipVisionConfig(**GEMMA3_4B_VISION)
    )


def nf4_bytes(numel: int) -> float:
    """bitsandbytes NF4 with double quantisation, blocks of 64: 4 bits a weight, an 8-bit absmax a block, and an
    fp32 absmax (plus offset) for every 256 of those."""
    blocks = -(-numel // 64)
    return numel / 2 + blocks + 4 * -(-blocks // 256) + 4


def count(
    model, *, skip: list[str], language_only: bool, peft_default: bool, ple_on_host: bool, text_model: bool = False
) -> dict:
    """Bytes each parameter would hold, by part. ``language_only``: the text-only load (towers not built) and LoRA
    confined to the language model; ``peft_default``: every parameter that is not 4-bit in fp32, LoRA wherever a
    linear's name ends with a target (peft's suffix matching, towers included); ``text_model``: ``model`` is a text
    family's causal LM, all of it language model."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    parts = dict.fromkeys(("nf4", "weights", "per-layer embeddings", "lora", "host"), 0.0)
    seen = set()
    for module_name, module in model.named_modules():
        in_language_model = text_model or ".language_model." in f".{module_name}." or module_name == "lm_head"
        if language_only and not in_language_model:
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied: the LM head is the embedding
                continue
            seen.add(id(param))
            if isinstance(module, torch.nn.Linear) and should_convert_module(module_name, skip):
                parts["nf4"] += nf4_bytes(param.numel())
                if module_name.rsplit(".", 1)[-1] in LORA_TARGETS and (in_language_model or peft_default):
                    parts["lora"] += 4 * 8 * (module.in_features + module.out_features)
                continue
            size = param.numel() * (4 if peft_default else 2)
            if "embed_tokens_per_layer" in f"{module_name}.{param_name}":
                parts["host" if ple_on_host else "per-layer embeddings"] += size
            else:
                parts["weights"] += size
    parts["accelerator"] = sum(v for k, v in parts.items() if k != "host")
    return parts


def check_nf4_formula() -> str:
    """A real 4-bit load of a tiny Gemma on the CPU holds exactly what :func:`nf4_bytes` counts."""
    import bitsandbytes as bnb

    from persian_qlora.modeling import build_qlora_model
    from persian_qlora.testing import build_tiny_gemma

    with tempfile.TemporaryDirectory() as tmp:
        model = build_qlora_model(build_tiny_gemma(tmp, "gemma3"))
        real = predicted = 0.0
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                state = module.weight.quant_state
                tensors = [module.weight.data, state.absmax, state.state2.absmax, state.offset]
                real += sum(t.numel() * t.element_size() for t in tensors)
                predicted += nf4_bytes(int(state.shape.numel()))
    assert abs(real - predicted) < 1, (real, predicted)
    return f"NF4 byte count checked against a real 4-bit load: {real:.0f} bytes, predicted {predicted:.0f}"


def checkpoint_table() -> None:
    """Every checkpoint's language model under the default QLoRA: the table of docs/models.md."""
    from persian_qlora.families import FAMILIES

    print(
        "| checkpoint | family | language-model parameters | published | on the accelerator (GB) | on the host (GB) |"
    )
    print("|---|---|---|---|---|---|")
    for name, (repo, model_type) in CHECKPOINTS.items():
        family = FAMILIES[model_type].text()
        with torch.device("meta"):
            model = family.model_class()(text_config(name))
        parameters = sum(p.numel() for p in model.parameters())
        published = PUBLISHED_TEXT_PARAMETERS.get(name)
        parts = count(
            model,
            skip=list(family.never_quantised),
            language_only=False,
            peft_default=False,
            ple_on_host=bool(family.per_layer_embeddings),
            text_model=True,
        )
        print(
            f"| `{repo}` | {model_type} | {parameters:,} | {f'{published:,}' if published else 'not published'} "
            f"| **{parts['accelerator'] / GB:.2f}** | {parts['host'] / GB:.2f} |"
        )


def accelerator_table() -> None:
    from transformers import (
        Gemma3ForConditionalGeneration,
        Gemma3nForConditionalGeneration,
        Gemma4ForConditionalGeneration,
    )

    from persian_qlora.families import FAMILIES

    print(check_nf4_formula())
    for name, family, make in (
        ("Gemma 3n E4B", FAMILIES["gemma3n"], lambda: Gemma3nForConditionalGeneration(e4b_config())),
        ("Gemma 3 4B", FAMILIES["gemma3"], lambda: Gemma3ForConditionalGeneration(gemma3_4b_config())),
        ("Gemma 4 E2B", FAMILIES["gemma4"], lambda: Gemma4ForConditionalGeneration(gemma4_config(GEMMA4_E2B_TEXT))),
        ("Gemma 4 E4B", FAMILIES["gemma4"], lambda: Gemma4ForConditionalGeneration(gemma4_config(GEMMA4_E4B_TEXT))),
    ):
        try:
            with torch.device("meta"):
                model = make()
        except ImportError as err:  # E4B's vision tower is a timm model
            print(f"\n{name}: whole-model tables skipped: {str(err).strip().splitlines()[0]}")
            continue
        total = sum(p.numel() for p in model.parameters())
        print(f"\n{name}: {total / 1e9:.2f} B parameters (tied head counted once)")
        print(
            "| setting | per-layer embeddings | NF4 linears (GB) | other weights, bf16 or peft's fp32 (GB) "
            "| per-layer embeddings on the accelerator (GB) | LoRA (GB) | on the accelerator (GB) | on the host (GB) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        ours = list(family.never_quantised)
        settings = {
            "QLoRA text-only (default)": dict(skip=ours, language_only=True, peft_default=False),
            "QLoRA whole-model": dict(skip=ours, language_only=False, peft_default=False),
            "peft default preparation": dict(skip=["lm_head"], language_only=False, peft_default=True),
        }
        for label, kwargs in settings.items():
            for ple_on_host in (False, True) if family.per_layer_embeddings else (False,):
                parts = count(model, ple_on_host=ple_on_host, **kwargs)
                where = "host" if ple_on_host else ("accelerator" if family.per_layer_embeddings else "-")
                print(
                    f"| {label} | {where} | {parts['nf4'] / GB:.2f} | {parts['weights'] / GB:.2f} "
                    f"| {parts['per-layer embeddings'] / GB:.2f} | {parts['lora'] / GB:.3f} "
                    f"| **{parts['accelerator'] / GB:.2f}** | {parts['host'] / GB:.2f} |"
                )


_LOAD = """
import json, resource, sys, psutil, torch
from persian_qlora.loading import load_base
path, text_only = sys.argv[1], sys.argv[2] == "text"
before = psutil.Process().memory_info().rss
model, record = load_base(path, text_only=text_only, dtype=torch.float32, per_layer_embeddings_on_host=False)
params = sum(p.numel() for p in model.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"class": record.architecture, "parameters": params, "rss_before": before, "peak": peak}))
"""


def build_cut_e4b(path: Path, layers: int) -> Path:
    """Real-width Gemma 3n E4B (vision and audio towers whole) with ``layers`` language layers, bf16, hub layout."""
    from transformers import Gemma3nForConditionalGeneration

    from persian_qlora.testing import build_tiny_tokenizer

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16 directly: half the memory of building in fp32
    try:
        model = Gemma3nForConditionalGeneration(e4b_config(layers))
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(path, max_shard_size="2GB")
    build_tiny_tokenizer(save_dir=path)
    return path


def rss_table(layers: int) -> None:
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        path = build_cut_e4b(Path(tmp) / "e4b", layers)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(f"\nGemma 3n E4B at real widths, {layers} language layers, bf16 on disk: {size / GB:.2f} GB")
        print("| load | class | parameters (B) | RSS before (GB) | peak RSS (GB) | peak above before (GB) |")
        print("|---|---|---|---|---|---|")
        for mode in ("text", "whole"):
            done = subprocess.run(
                [sys.executable, "-c", _LOAD, str(path), mode], capture_output=True, text=True, check=True
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"| {mode} | {row['class']} | {row['parameters'] / 1e9:.3f} | {row['rss_before'] / GB:.2f} "
                f"| {row['peak'] / GB:.2f} | {(row['peak'] - row['rss_before']) / GB:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rss", action="store_true", help="also measure loading a real-width E4B cut to a few layers")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    checkpoint_table()
    accelerator_table()
    if args.rss:
        rss_table(args.layers)


if __name__ == "__main__":
    main()
