"""Peak memory and time of merging a LoRA adapter into a real-size Gemma: the streaming merge against the old
in-memory merge and peft's ``merge_and_unload``, each side in a fresh process, for both merge bases.

Models (random bf16 weights at published dimensions, written as the hub serves them; no download):
  gemma3-1b     Gemma 3 1B: hidden 1152, 26 layers, intermediate 6912, 4 heads / 1 KV head, head_dim 256,
                vocabulary 262,144; one ~2 GB model.safetensors, as google/gemma-3-1b-it.
  gemma3n-e4b   Gemma 3n E4B's language model (Gemma3nTextConfig's defaults are E4B's text config) cut to
                --layers layers, without KV sharing (num_kv_shared_layers=0, so any depth is valid): is the
                streaming peak the same at every depth?
The adapter: LoRA r=8, alpha=16 on all seven projections of every layer (persian-qlora's defaults), A and B random,
in peft's file format. Its base_loading.json is what QLoRA training on a CPU records (NF4, blocks of 64, double
quantisation, quantised from fp32), written here from those values rather than by a 4-bit training run.

Sides (output bf16 in all):
  streaming   persian_qlora.merge_to_fp16 (this version).
  old         the in-memory merge persian-qlora shipped before the streaming one, copied below as the comparison side
              only: base loaded whole in fp32; for "nf4" a 4-bit load dequantized into it; peft's merge_and_unload;
              cast; save_pretrained.
  peft        the plain peft recipe: base loaded in bf16 (for "nf4": loaded 4-bit from fp32 as in training, then
              transformers' dequantize() and a cast to bf16), PeftModel.from_pretrained, merge_and_unload,
              save_pretrained.

Memory: the process's peak resident set size during the merge, from the kernel's high-water mark (VmHWM, reset
through /proc/self/clear_refs just before the merge starts, so it is exact and not sampled). Reported absolute and
above the process's RSS just before the merge (after every import). Every side imports the same modules first.
Time: until the output is on disk. The streaming merge fsyncs every file it writes (a merge that returned is a merge
that survives a crash); save_pretrained does not, so each side ends with os.sync() inside the timed region, and
the disk's write speed counts alike for every side.

    python benchmarks/merge_memory.py --workdir /tmp/merge-bench                       # gemma3-1b, every side
    python benchmarks/merge_memory.py --model gemma3n-e4b --layers 2 4 8 --sides streaming peft

Run it with a CPU-only torch (the CUDA build's import alone holds ~1 GB more RSS). Big files are written under
--workdir (about 2 GB per base, 2 GB per output, removed after each side; the bases are removed at the end unless
--keep).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gpu_scale import GEMMA3_1B  # Gemma 3 1B's published dimensions (benchmarks/gpu_scale.py)

SIDES = ("streaming", "old", "peft")
BASES = ("original", "nf4")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _config(model: str, layers: int | None):
    from transformers import Gemma3nTextConfig, Gemma3TextConfig

    if model == "gemma3-1b":
        return Gemma3TextConfig(**GEMMA3_1B, dtype="bfloat16")
    layers = layers or 35
    return Gemma3nTextConfig(
        num_hidden_layers=layers,
        layer_types=Gemma3nTextConfig().layer_types[:layers],
        activation_sparsity_pattern=Gemma3nTextConfig().activation_sparsity_pattern[:layers],
        num_kv_shared_layers=0,
        dtype="bfloat16",
    )


def build_base(model: str, layers: int | None, directory: Path) -> Path:
    """Write a random bf16 checkpoint at real dimensions, tensor by tensor (never the whole model in memory)."""
    return write_checkpoint(_config(model, layers), directory)


def write_checkpoint(config, directory: Path) -> Path:
    """Write a random bf16 checkpoint of ``config`` with the tiny tokenizer, tensor by tensor."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from persian_qlora._shards import PlannedTensor, ShardWriter, plan_shards
    from persian_qlora.testing import build_tiny_tokenizer

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    named = list(meta.named_parameters())  # tied weights once: no lm_head, as on the hub
    directory.mkdir(parents=True, exist_ok=True)
    planned = [PlannedTensor(name, torch.bfloat16, tuple(p.shape)) for name, p in named]
    writer = ShardWriter(directory, plan_shards(planned, 10 * 2**30))  # one shard, as gemma-3-1b-it's
    generator = torch.Generator().manual_seed(0)
    for name, param in named:
        rows = param.shape[0]
        step = max(1, (32 * 2**20) // max(1, param[0].numel() * 2)) if param.dim() else 1
        for start in range(0, rows, step) if param.dim() else [0]:
            shape = (min(step, rows - start), *param.shape[1:]) if param.dim() else ()
            writer.write(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    config.save_pretrained(directory)
    GenerationConfig(bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0).save_pretrained(directory)
    build_tiny_tokenizer(save_dir=directory)  # the merge copies tokenizer files; their vocabulary does not matter here
    return directory


def build_adapter(base: Path, directory: Path) -> Path:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from persian_qlora.families import never_quantised
    from persian_qlora.loading import BaseLoading

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    targets = [n for n, m in meta.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS]
    LoraConfig(
        r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM", base_model_name_or_path=str(base)
    ).save_pretrained(directory)
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name in targets:
        linear = meta.get_submodule(name)
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(8, linear.in_features, generator=generator) * 0.01
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(linear.out_features, 8, generator=generator) * 0.01
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    BaseLoading(
        base=str(base),
        model_type=config.model_type,
        architecture=type(meta).__name__,
        text_only=False,
        load_dtype="float32",
        compute_dtype="float32",
        quantization={
            "method": "bitsandbytes",
            "quant_type": "nf4",
            "blocksize": 64,
            "double_quant": True,
            "double_quant_blocksize": 256,
            "quant_storage": "uint8",
            "quantized_on": "cpu",
            "skip_modules": never_quantised(),
        },
    ).save(directory)
    return directory


# ---- the old in-memory merge (persian-qlora before the streaming merge), kept here only as a comparison side ----
def old_in_memory_merge(base: str, adapter: str, output_dir: str, merge_base: str) -> None:
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from persian_qlora.loading import default_bnb_config

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    if merge_base == "nf4":
        quantized = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32, quantization_config=default_bnb_config(torch.float32), use_safetensors=True
        )
        targets = dict(model.named_modules())
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                targets[name].weight.data.copy_(weight.to(torch.float32))
        del quantized
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model = model.to(torch.bfloat16)
    model.save_pretrained(output_dir, max_shard_size="2GB")


# ---- end of the old merge ----


def peft_merge(base: str, adapter: str, output_dir: str, merge_base: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from persian_qlora.loading import default_bnb_config

    if merge_base == "nf4":
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32, quantization_config=default_bnb_config(torch.float32), use_safetensors=True
        )
        model = model.dequantize().to(torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, use_safetensors=True)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(output_dir, max_shard_size="2GB")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(side: str, base: str, adapter: str, output_dir: str, merge_base: str) -> None:
    """One side, in this fresh process: every import first, then the measured merge."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from persian_qlora.merging import merge_to_fp16

    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    started = time.perf_counter()
    if side == "streaming":
        merge_to_fp16(base, adapter, output_dir, merge_base=merge_base, dtype=torch.bfloat16)
    elif side == "old":
        old_in_memory_merge(base, adapter, output_dir, merge_base)
    else:
        peft_merge(base, adapter, output_dir, merge_base)
    os.sync()  # until the output is on disk: the streaming merge fsyncs its files, save_pretrained leaves them cached
    seconds = time.perf_counter() - started
    print(json.dumps({"rss_before": before, "peak": _status("VmHWM"), "seconds": seconds}))


def run_side(side: str, base: Path, adapter: Path, output: Path, merge_base: str) -> dict:
    command = [sys.executable, __file__, "--child", side, str(base), str(adapter), str(output), merge_base]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    shutil.rmtree(output, ignore_errors=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gemma3-1b", "gemma3n-e4b"], default="gemma3-1b")
    parser.add_argument("--layers", type=int, nargs="+", default=[None], help="gemma3n-e4b: depths to cut to")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge-memory-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the generated bases and adapters")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    gb = 1e9
    rows = []
    for layers in args.layers:
        label = args.model if layers is None else f"{args.model} ({layers} layers)"
        base = args.workdir / f"{args.model}-{layers or 'all'}" / "base"
        adapter = base.parent / "adapter"
        if not (base / "config.json").exists():
            build_base(args.model, layers, base)
        if not (adapter / "adapter_config.json").exists():
            build_adapter(base, adapter)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / gb
        print(f"{label}: base checkpoint {size:.2f} GB", flush=True)
        for merge_base in args.bases:
            for side in args.sides:
                result = run_side(side, base, adapter, base.parent / f"out-{side}", merge_base)
                rows.append((label, merge_base, side, result))
                if "error" in result:
                    print(f"  {merge_base:8} {side:9} failed: {result['error']}", flush=True)
                    continue
                above = (result["peak"] - result["rss_before"]) / gb
                print(
                    f"  {merge_base:8} {side:9} peak RSS {result['peak'] / gb:6.2f} GB, {above:6.2f} GB above the "
                    f"{result['rss_before'] / gb:.2f} GB before the merge, {result['seconds']:7.1f} s",
                    flush=True,
                )
        if not args.keep:
            shutil.rmtree(base.parent, ignore_errors=True)

    print("\nratios (streaming / peft, same model and base):")
    results = {(label, mb, side): r for label, mb, side, r in rows if "error" not in r}
    for (label, mb, side), r in results.items():
        peft = results.get((label, mb, "peft"))
        if side == "streaming" and peft:
            growth = (r["peak"] - r["rss_before"]) / (peft["peak"] - peft["rss_before"])
            print(
                f"  {label}, {mb}: peak x{r['peak'] / peft['peak']:.2f} (growth above start x{growth:.2f}), "
                f"time x{r['seconds'] / peft['seconds']:.2f}"
            )


if __name__ == "__main__":
    main()
