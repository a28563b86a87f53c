"""`compare`: QLoRA against LoRA against the untouched base, on the same data, seed and hyperparameters.

Each method runs in its own fresh process, so that its memory figures are its own: load the base (4-bit for
QLoRA, 16-bit for LoRA), generate on the test prompts before training, train, generate after, optionally merge
into bf16 and generate with the merged model. Every phase is timed and its peak memory measured
(:class:`~persian_qlora.measure.PhaseMeter`). The two runs differ only in the base's quantisation.
"""

from __future__ import annotations

import copy
import logging
import pickle
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from persian_qlora.errors import PersianQLoRAError
from persian_qlora.training import RunConfig

__all__ = ["CompareConfig", "compare", "demo_config"]

TINY_BASE_LABEL = "tiny Gemma 3 (2.8M parameters) pretrained on the plain text of the bundled train split"

logger = logging.getLogger("persian_qlora")


@dataclass
class CompareConfig:
    """What to compare and how to evaluate. ``run`` is the shared training setup (its ``method`` is ignored).

    ``test_data=None`` evaluates on ``test_split`` of the training source. With ``run.tiny``, the base is
    :func:`~persian_qlora.tiny.build_tiny_persian_lm` (cached in ``output_dir``) and the data the bundled
    corpus's fixed splits. The runs in ``merge_methods`` are merged into bf16 once per base in ``merge_bases``
    (``"original"``, ``"nf4"``; see :func:`~persian_qlora.merge_to_fp16`), and each merged model is evaluated too.
    ``perplexity=True`` adds the test conversations' model-turn perplexity to every evaluation.
    ``model_label`` names the base in the report (default: its path).
    """

    run: RunConfig = field(default_factory=RunConfig)
    output_dir: str = "runs/compare"
    methods: tuple[str, ...] = ("qlora", "lora")
    test_data: str | None = None
    test_split: str = "test"
    max_eval: int | None = None
    max_new_tokens: int = 256
    eval_batch_size: int = 8
    merge_methods: tuple[str, ...] = ("qlora",)
    merge_bases: tuple[str, ...] = ("original",)
    perplexity: bool = False
    model_label: str | None = None
    samples: int = 3
    generation: dict[str, Any] = field(default_factory=dict)  # extra model.generate settings, same for every run


# The real-model demo's training settings, fixed before any run on the test split. On 2 CPU cores, evaluating the
# models (before/after for QLoRA and LoRA, the merge) on the 49 test conversations takes most of the time, so
# training gets the rest of half an hour: 20 updates of 2 conversations (~8.5 s each) per method. Against the
# recipe: the QLoRA paper's lr 2e-4 (the recipe's 2e-5 would barely move an adapter in 20 steps), no gradient
# accumulation (4 times the updates for the same compute), warmup scaled to the run, and a max length that keeps
# all but 12 of the 269 training conversations whole (the recipe's 4000 changes nothing else). See
# docs/real-model.md.
REAL_DEMO_OVERRIDES: dict[str, Any] = {
    "learning_rate": 2e-4,
    "gradient_accumulation_steps": 1,
    "max_steps": 20,
    "warmup_steps": 2,
    "max_length": 512,
    "save_strategy": "no",
}


def demo_config(
    output_dir: str = "runs/demo", *, base: str = "tiny", overrides: dict[str, Any] | None = None
) -> CompareConfig:
    """The offline demo on the bundled corpus: ``base="tiny"`` (a tiny Persian LM) or a real base such as
    ``"gemma3-270m"`` (prepared and cached on first use, see :func:`~persian_qlora.bases.prepare_base`).

    Tiny: the reference recipe's lr 2e-5 is tuned for billion-parameter models; a 3M-parameter model needs a
    larger step. Every other training setting is the recipe's (one epoch). ``repetition_penalty=1.3`` keeps a tiny
    model's greedy decoding from looping on one token; it applies to every run alike, before and after. Up to 160
    new tokens: the test split's last model turns are 100 tiny-tokenizer tokens at the median and 143 at the 90th
    percentile, so a reply that learned when to stop can end its turn. All settings were chosen on a validation
    slice of the train split (docs/comparison.md).
    Real: the recipe with :data:`REAL_DEMO_OVERRIDES` (sized to half an hour on 2 CPU cores, docs/results.md),
    plain greedy decoding of up to 128 new tokens with the 49 test prompts in one batch (on a CPU, bitsandbytes
    dequantises every 4-bit weight at every decoding step, whatever the batch), perplexity everywhere, and the
    QLoRA adapter merged into the original base.
    ``overrides`` are training settings (as for ``persian-qlora train``) applied last, e.g. ``{"max_steps": 2}``
    for a smoke run.
    """
    if base == "tiny":
        settings = {
            "tiny": True,
            "learning_rate": 1e-2,
            "warmup_steps": 5,
            "max_length": 512,
            "lora_r": 16,
            "lora_alpha": 32,
            "save_strategy": "no",
        }
        return CompareConfig(
            run=RunConfig.load(None, {**settings, **(overrides or {})}),
            output_dir=output_dir,
            max_new_tokens=160,
            eval_batch_size=64,  # the 49 test prompts in one batch: a tiny model's decoding is per-step overhead
            generation={"repetition_penalty": 1.3},
        )
    from persian_qlora.bases import KNOWN_BASES, prepare_base
    from persian_qlora.dataset import bundled_corpus_path

    model = str(prepare_base(base))
    settings = {"model": model, "data": str(bundled_corpus_path("train")), **REAL_DEMO_OVERRIDES}
    return CompareConfig(
        run=RunConfig.load(None, {**settings, **(overrides or {})}),
        output_dir=output_dir,
        test_data=str(bundled_corpus_path("test")),
        max_new_tokens=128,  # the 95th percentile of the train split's last model turns: 127 Gemma tokens
        eval_batch_size=64,
        merge_bases=("original",),
        perplexity=True,
        model_label=KNOWN_BASES[base].description,
    )


def _scores(result, references, normalize) -> dict[str, Any]:
    from persian_qlora.behaviour import behaviour_scores
    from persian_qlora.metrics import corpus_scores

    return {
        **corpus_scores(result.texts, references, normalize=normalize).as_dict(),
        **behaviour_scores(result.texts, references, result.ended_turn, normalize=normalize).as_dict(),
        "seconds": result.seconds,
        "new_tokens": sum(result.new_tokens),
        "tokens_per_second": result.tokens_per_second,
        "memory": result.memory,
        "texts": result.texts,
        "ended_turn": result.ended_turn,
    }


def _run_method(method: str, config: CompareConfig, model_path: str, test_source: str) -> dict:
    """One method, start to end, in a fresh process. Returns plain data for the report."""
    import torch
    from transformers import AutoTokenizer, set_seed

    from persian_qlora.dataset import PersianChatDataset
    from persian_qlora.generation import evaluation_pairs, generate, load_for_inference
    from persian_qlora.measure import PhaseMeter
    from persian_qlora.merging import merge_to_fp16
    from persian_qlora.modeling import build_lora_model, build_qlora_model
    from persian_qlora.normalize import DEFAULT_NORMALIZER
    from persian_qlora.perplexity import perplexity
    from persian_qlora.training import make_trainer

    run = config.run
    output = Path(config.output_dir) / method
    train_config = copy.deepcopy(run.train)
    train_config.output_dir = str(output)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, held_out = run.load_datasets(tokenizer)  # held_out: None unless eval_data or eval_fraction is set
    test = PersianChatDataset(test_source, tokenizer, split=config.test_split, **run.dataset_settings())
    prompts, references = evaluation_pairs(test.conversations[: config.max_eval])
    scored = [test[i] for i in range(len(prompts))]  # the same conversations, tokenized with their labels

    def evaluate(model) -> dict[str, Any]:
        result = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.eval_batch_size,
            use_cache=True,
            progress=True,
            normalize=test.normalize,  # the prompts as the training text was normalised
            **config.generation,
        )
        scores = _scores(result, references, DEFAULT_NORMALIZER)
        if config.perplexity:
            scores["perplexity"] = perplexity(model, tokenizer, scored)
        return scores

    set_seed(train_config.seed)  # the same LoRA initialisation for every method
    builder = build_qlora_model if method == "qlora" else build_lora_model
    # On a GPU the base loads straight onto it (LoRA's 16-bit base too), so the load is measured where it runs.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    placement = {"device_map": {"": device}} if device.type == "cuda" else {}
    with PhaseMeter(device) as load:
        model = builder(model_path, lora=run.lora, **{**placement, **run.model_settings()})
    before = evaluate(model)  # LoRA B starts at zero: this is the base model as loaded
    trainer = make_trainer(model, tokenizer, train, held_out, config=train_config)
    trainer.train()  # its RunMetricsCallback measures the phase: time, peak memory, tokens/s
    trainer.save_model()
    after = evaluate(model)
    result = {
        "method": method,
        "load": asdict(load.result),
        "train": trainer.run_metrics.summary(trainer.state),
        "before": before,
        "after": after,
        "references": references,
        "prompts": prompts,
        "train_conversations": len(train),
        "prompt_normalization": asdict(test.normalize) if test.normalize is not None else None,
    }
    if method in config.merge_methods:
        del model, trainer
        result["merged"] = []
        for merge_base in config.merge_bases:
            merged_dir = Path(config.output_dir) / f"{method}-merged-{merge_base}"
            with PhaseMeter("cpu") as merging:  # the merge runs on the CPU
                # "nf4" re-makes the base as training quantised it, from the adapter's base_loading.json
                merge_to_fp16(model_path, output, merged_dir, merge_base=merge_base, overwrite=True)
            merged, _ = load_for_inference(merged_dir)
            scores = evaluate(merged)
            del merged
            result["merged"].append({**scores, "merge": asdict(merging.result), "merge_base": merge_base})
        if method == "qlora" and "original" in config.merge_bases and "lora" not in config.methods:
            # An original-base merge is held against the 16-bit base; without a LoRA run, evaluate it here.
            base, _ = load_for_inference(model_path)
            result["base_16bit"] = evaluate(base)
    return result


def _in_fresh_process(method: str, *args: Any) -> dict[str, Any]:
    """Run :func:`_run_method` in a new Python process, so that its peak memory is its own.

    A plain subprocess rather than multiprocessing: spawn would re-import the caller's ``__main__``, which re-runs
    an unguarded user script.
    """
    logger.info("comparison: running %s in a fresh process", method)
    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        job.write_bytes(pickle.dumps((method, *args)))
        code = "import sys; from persian_qlora.compare import _worker; _worker(sys.argv[1], sys.argv[2])"
        done = subprocess.run([sys.executable, "-c", code, str(job), str(result)], check=False)
        if done.returncode != 0 or not result.exists():
            raise PersianQLoRAError(f"the {method} run failed (exit code {done.returncode}); its error is above")
        return pickle.loads(result.read_bytes())


def _worker(job: str, result: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # see cli.main
    Path(result).write_bytes(pickle.dumps(_run_method(*pickle.loads(Path(job).read_bytes()))))


def compare(config: CompareConfig) -> dict[str, Any]:
    """Run every method of ``config`` and write ``report.md``, ``report.json`` and charts to ``output_dir``.

    Returns the report data (also in ``report.json``).
    """
    from persian_qlora.dataset import bundled_corpus_path
    from persian_qlora.report import write_report

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path, train_source = config.run.model, config.run.training_source()
    test_source = config.test_data or config.run.data
    if config.run.tiny:
        from persian_qlora.tiny import build_tiny_persian_lm

        model_path = str(output_dir / "tiny-base")
        if not (output_dir / "tiny-base" / "config.json").exists():
            logger.info("pretraining the tiny Persian base model on the train split's text (a few minutes)")
            build_tiny_persian_lm(model_path)
        test_source = config.test_data or str(bundled_corpus_path("test"))
    elif config.run.gguf_file is not None:
        from persian_qlora.bases import gguf_base

        model_path = str(gguf_base(model_path, config.run.gguf_file))

    runs = [_in_fresh_process(method, config, model_path, test_source) for method in config.methods]
    report = {
        "config": {
            "model": config.model_label or (TINY_BASE_LABEL if config.run.tiny else model_path),
            "train_data": train_source,
            "test_data": test_source,
            "lora": asdict(config.run.lora),
            "train": {k: v for k, v in asdict(config.run.train).items() if k != "output_dir"},
            "max_new_tokens": config.max_new_tokens,
            "generation": config.generation,
            "merge_bases": list(config.merge_bases),
            "perplexity": config.perplexity,
        },
        "runs": runs,
    }
    write_report(report, output_dir, samples=config.samples)
    return report
