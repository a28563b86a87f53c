"""Peak memory and time of the GGUF export of a real-size Gemma 3: the streaming export against the in-memory export
it replaced, each side in a fresh process.

Models (random bf16 weights at published dimensions, written as merge_memory.py writes them; no download):
  gemma3-1b   Gemma 3 1B: hidden 1152, 26 layers, intermediate 6912, 4 heads / 1 KV head, head_dim 256, one
              ~2 GB model.safetensors; with --layers, the same widths cut to that many layers (is the streaming
              peak the same at every depth?).
  gemma3n-e4b Gemma 3n E4B's language model (transformers' Gemma3nTextConfig defaults are google/gemma-3n-E4B-it's)
              cut to --layers layers, text-only. llama.cpp fixes E4B's structure (KV sharing from layer 20, so at
              least 21 layers), and the export refuses a cut model as llama.cpp would run it differently; for this
              memory benchmark alone the child replaces the gemma3n entry's structure check by one that finds
              nothing, so the export writes the cut model as it would write the whole one. Streaming side only.
The tokenizer is the test kit's, grown to Gemma's 262,144 tokens (testing.complete_merges), so that the embedding is
written whole at its real size (the export cuts the embedding to the tokenizer's rows).

Sides:
  streaming   persian_qlora.export_gguf (this version).
  in-memory   the export persian-qlora shipped before the streaming one (AutoModelForCausalLM.from_pretrained, then
              tensor by tensor from the loaded model), read from git at --old-commit into the work folder and
              imported from there.

Memory: the process's peak resident set size during the export, from the kernel's high-water mark (VmHWM, reset
through /proc/self/clear_refs just before the export starts), reported above the process's RSS just before the
export (after every import). Time: until the file is on disk (os.sync() inside the timed region), wall and CPU
(user + system, all threads of the process; less sensitive to other jobs on the machine than the wall time).

    python benchmarks/export_memory.py --workdir /tmp/export-bench                      # 1B, both sides, bf16 + q8_0
    python benchmarks/export_memory.py --layers 2 4 8 --sides streaming --quantizations bf16
    python benchmarks/export_memory.py --model gemma3n-e4b --layers 2 4 8 --sides streaming --quantizations bf16

Run it with a CPU-only torch. Big files go under --workdir (about 2 GB per base, 2 GB per output, removed after each
side; the bases are removed at the end unless --keep).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gpu_scale import GEMMA3_1B  # Gemma 3 1B's published dimensions (benchmarks/gpu_scale.py)
from merge_memory import _status, write_checkpoint

SIDES = ("streaming", "in-memory")
QUANTIZATIONS = ("bf16", "q8_0")
OLD_COMMIT = "d3972ed"  # a commit on main with the in-memory export (the one measured in docs/export.md)
VOCABULARY = 262_144


MODELS = ("gemma3-1b", "gemma3n-e4b")


def build_base(model: str, layers: int | None, directory: Path) -> Path:
    from transformers import Gemma3nTextConfig, Gemma3TextConfig

    from persian_qlora.testing import complete_merges

    if model == "gemma3n-e4b":
        e4b = Gemma3nTextConfig()
        layers = layers or e4b.num_hidden_layers
        config = Gemma3nTextConfig(
            num_hidden_layers=layers,
            layer_types=e4b.layer_types[:layers],
            activation_sparsity_pattern=list(e4b.activation_sparsity_pattern)[:layers],
            num_kv_shared_layers=max(0, layers - 20),  # E4B: layers 20 onwards share
            dtype="bfloat16",
        )
    else:
        config = Gemma3TextConfig(**dict(GEMMA3_1B, num_hidden_layers=layers or 26), dtype="bfloat16")
    write_checkpoint(config, directory)
    return complete_merges(directory, VOCABULARY)


def old_export_module(workdir: Path, commit: str) -> Path:
    """The in-memory export's source, from git, as a file in the work folder."""
    path = workdir / f"export_{commit}.py"
    if not path.exists():
        root = Path(__file__).resolve().parents[1]
        source = subprocess.run(
            ["git", "-C", str(root), "show", f"{commit}:src/persian_qlora/export.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        path.write_text(source, encoding="utf-8")
    return path


def child(side: str, base: str, output: str, quantization: str, old_module: str) -> None:
    """One side, in this fresh process: every import first, then the measured export."""
    import dataclasses

    import gguf  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    if side == "streaming":
        from persian_qlora import export
        from persian_qlora.export import export_gguf

        if json.loads((Path(base) / "config.json").read_text())["model_type"] == "gemma3n_text":
            # A cut E4B is not the structure llama.cpp fixes: measure its export as the whole one's (see the docstring).
            gemma3n = export._ARCHITECTURES["gemma3n"]
            export._ARCHITECTURES["gemma3n"] = dataclasses.replace(gemma3n, problems=lambda config: [])
    else:
        spec = importlib.util.spec_from_file_location("old_export", old_module)
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_export"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        export_gguf = module.export_gguf
    from transformers import AutoModelForCausalLM  # noqa: F401 (what the in-memory side imports inside)

    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    started, cpu_started = time.perf_counter(), time.process_time()
    result = export_gguf(base, output, quantization=quantization)
    os.sync()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    size = result.path.stat().st_size
    print(
        json.dumps(
            {"rss_before": before, "peak": _status("VmHWM"), "seconds": seconds, "cpu": cpu_seconds, "bytes": size}
        )
    )


def run_side(side: str, base: Path, output: Path, quantization: str, old_module: Path) -> dict:
    command = [sys.executable, __file__, "--child", side, str(base), str(output), quantization, str(old_module)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for leftover in (output, output.with_suffix(".Modelfile")):
        leftover.unlink(missing_ok=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default=MODELS[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[None], help="depths to cut the model to")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--quantizations", nargs="+", choices=QUANTIZATIONS, default=list(QUANTIZATIONS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/export-memory-bench"))
    parser.add_argument("--old-commit", default=OLD_COMMIT, help="a commit whose export.py is the in-memory one")
    parser.add_argument("--keep", action="store_true", help="keep the generated bases")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    gb = 1e9
    args.workdir.mkdir(parents=True, exist_ok=True)
    old_module = old_export_module(args.workdir, args.old_commit)
    for layers in args.layers:
        label = f"{args.model} ({layers or 'all'} layers)"
        base = args.workdir / f"{args.model}-{layers or 'all'}" / "base"
        if not (base / "config.json").exists():
            build_base(args.model, layers, base)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / gb
        print(f"{label}: checkpoint {size:.2f} GB", flush=True)
        for quantization in args.quantizations:
            for side in args.sides:
                result = run_side(side, base, base.parent / f"out-{side}.gguf", quantization, old_module)
                if "error" in result:
                    print(f"  {quantization:5} {side:9} failed: {result['error']}", flush=True)
                    continue
                above = (result["peak"] - result["rss_before"]) / gb
                print(
                    f"  {quantization:5} {side:9} peak RSS {result['peak'] / gb:6.2f} GB, {above:6.2f} GB above the "
                    f"{result['rss_before'] / gb:.2f} GB before the export, {result['seconds']:7.1f} s "
                    f"({result['cpu']:.1f} s of CPU), "
                    f"file {result['bytes'] / gb:.2f} GB",
                    flush=True,
                )
        if not args.keep:
            shutil.rmtree(base.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
