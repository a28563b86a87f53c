"""What `peft.prepare_model_for_kbit_training` costs in memory, against persian-qlora's preparation.

peft's helper casts every bf16/fp16 parameter that is not 4-bit to fp32. On Gemma that is mostly the embedding
(and, on Gemma 3n, the per-layer embeddings). persian-qlora only freezes the base and turns on checkpointing.

1. Measured: build the tiny Gemma 3n in 4-bit with bf16 unquantised weights, prepare it both ways, and sum the
   bytes of parameters and buffers.
2. Extrapolated: count, on the meta device (no memory used), the parameters of the real Gemma 3n E4B language
   model (published config) that the 4-bit loader leaves unquantised; each would grow from 2 to 4 bytes.

Run: python benchmarks/kbit_preparation_memory.py
"""

import copy
import tempfile

import torch
from peft import prepare_model_for_kbit_training
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig
from transformers.quantizers.quantizers_utils import should_convert_module

from persian_qlora.families import never_quantised
from persian_qlora.modeling import build_qlora_model
from persian_qlora.testing import build_tiny_gemma


def tensor_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


with tempfile.TemporaryDirectory() as tmp:
    path = build_tiny_gemma(tmp, "gemma3n")
    ours = build_qlora_model(path, dtype=torch.bfloat16).get_base_model()
    peft_prepared = prepare_model_for_kbit_training(copy.deepcopy(ours))
    a, b = tensor_bytes(ours), tensor_bytes(peft_prepared)
    print("tiny Gemma 3n, 4-bit NF4 + bf16 (measured, parameters and buffers)")
    print(f"  persian-qlora preparation        {a / 2**20:8.3f} MiB")
    print(f"  peft.prepare_model_for_kbit      {b / 2**20:8.3f} MiB   (+{(b - a) / 2**20:.3f} MiB, x{b / a:.2f})")

# Gemma 3n E4B's language model, from its published config (Gemma3nTextConfig defaults are E4B's text config).
config = Gemma3nTextConfig()
with torch.device("meta"):
    e4b = Gemma3nForCausalLM(config)
quantised = 0
for name, module in e4b.named_modules():
    if isinstance(module, torch.nn.Linear) and should_convert_module(name, never_quantised()):
        quantised += module.weight.numel()
tied = e4b.lm_head.weight is e4b.get_input_embeddings().weight
total = sum(p.numel() for p in e4b.parameters())  # tied weights counted once
unquantised = total - quantised
print("\nGemma 3n E4B language model (config counted on the meta device, no weights)")
print(f"  parameters                       {total / 1e9:8.3f} B (lm_head tied to the embedding: {tied})")
print(f"  4-bit linears                    {quantised / 1e9:8.3f} B")
print(f"  left unquantised (bf16)          {unquantised / 1e9:8.3f} B = {unquantised * 2 / 2**30:.2f} GiB")
print(f"  the same after peft's fp32 cast  {unquantised * 4 / 2**30:8.2f} GiB (+{unquantised * 2 / 2**30:.2f} GiB)")
per_layer = e4b.model.embed_tokens_per_layer.weight.numel()
print(f"    of which per-layer embeddings  {per_layer / 1e9:8.3f} B (+{per_layer * 2 / 2**30:.2f} GiB)")
print(f"    of which token embedding       {e4b.model.embed_tokens.weight.numel() / 1e9:8.3f} B")
