"""Training: the reference recipe as a typed config, the trainer factory, and a run-metrics callback.

We use transformers' ``Trainer`` rather than TRL's ``SFTTrainer``: our dataset is already tokenized with Gemma turn
labels and our collator pads it, so SFTTrainer's own dataset preparation (and its chat-template swap for
``assistant_only_loss``) would only re-do, differently, what is done.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.trainer_callback import ExportableState

from persian_qlora._files import atomic_write_text
from persian_qlora.collator import GemmaChatCollator
from persian_qlora.errors import ConfigError, NonFiniteError
from persian_qlora.loss import DEFAULT_CHUNK_SIZE, lean_model_loss
from persian_qlora.masking import IGNORE_INDEX
from persian_qlora.measure import PhaseMeter
from persian_qlora.modeling import LoraSettings
from persian_qlora.normalize import DEFAULT_NORMALIZER, NormalizerConfig, save_normalization

__all__ = [
    "RunConfig",
    "RunMetricsCallback",
    "TrainConfig",
    "make_trainer",
    "run_training",
    "latest_checkpoint",
    "write_training_charts",
]

logger = logging.getLogger("persian_qlora")

METRICS_FILE = "metrics.json"


@dataclass
class TrainConfig:
    """Training hyperparameters; the defaults are the reference recipe.

    ``extra`` takes any other ``transformers.TrainingArguments`` field (e.g. ``{"bf16": True}``); it wins over the
    fields here. ``max_length`` is applied by the dataset, not the trainer.

    Three settings beyond the recipe save time and memory without changing what is learnt (docs/benchmarks.md has
    the measurements): ``padding_free`` puts each micro-batch's conversations in one row with no padding (off, the
    trainer groups conversations of similar length instead); ``lean_loss`` projects only the labelled positions onto
    the vocabulary, ``loss_chunk_size`` rows at a time (:func:`~persian_qlora.loss.chunked_causal_lm_loss`).

    With an evaluation set (``make_trainer(eval_dataset=...)``, or :class:`RunConfig`'s ``eval_data`` /
    ``eval_fraction``), the held-out loss ``eval_loss`` is computed every ``eval_steps`` optimizer steps (default:
    ``save_steps``, so that every evaluation has its checkpoint), at the training batch size.
    ``load_best_model_at_end`` ends on the checkpoint of lowest ``eval_loss``; ``early_stopping_patience`` stops
    after that many evaluations in a row without a lower one (transformers' ``EarlyStoppingCallback``).

    ``report_to`` sends the Trainer's logs to ``"tensorboard"`` (event files under ``output_dir/runs``),
    ``"wandb"`` or any other transformers integration whose package is installed; ``"none"`` (default) to none.
    """

    output_dir: str = "runs/persian-qlora"
    learning_rate: float = 2e-5
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 10
    weight_decay: float = 0.01
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    num_train_epochs: float = 1.0
    max_steps: int = -1
    seed: int = 3407
    max_length: int = 4000
    optim: str = "adamw_bnb_8bit"
    logging_steps: int = 1
    report_to: str | list[str] = "none"
    save_steps: int = 50
    save_total_limit: int | None = 2
    padding_free: bool = True
    lean_loss: bool = True
    loss_chunk_size: int = DEFAULT_CHUNK_SIZE
    eval_steps: int | None = None
    load_best_model_at_end: bool = False
    early_stopping_patience: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def training_arguments(self, *, evaluate: bool = False) -> TrainingArguments:
        """The ``TrainingArguments`` of this config; ``evaluate``: with an evaluation set."""
        known = {f.name for f in fields(TrainingArguments)}
        unknown = sorted(set(self.extra) - known)
        if unknown:
            raise ValueError(f"not TrainingArguments fields: {unknown}")
        values = {k: v for k, v in asdict(self).items() if k not in _NOT_TRAINING_ARGUMENTS}
        values.update(
            # Without packing, batching conversations of similar length keeps padding down.
            train_sampling_strategy="random" if self.padding_free else "group_by_length",
            save_strategy="steps",
            label_names=["labels"],  # a PeftModel hides the forward signature Trainer would read them from
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        if evaluate:
            values.update(
                eval_strategy="steps",
                eval_steps=self.eval_steps or self.save_steps,
                per_device_eval_batch_size=self.per_device_train_batch_size,  # no more memory than a training step
                metric_for_best_model="eval_loss",
                greater_is_better=False,
            )
        elif self.load_best_model_at_end or self.early_stopping_patience is not None:
            raise ConfigError(
                "load_best_model_at_end and early_stopping_patience need an evaluation set: set eval_data or "
                "eval_fraction (RunConfig), or pass eval_dataset to make_trainer"
            )
        values.update(self.extra)
        _check_report_to(values["report_to"])
        _refuse_fp16(values)
        eval_steps = values.get("eval_steps")
        if (
            evaluate
            and values["load_best_model_at_end"]
            and isinstance(eval_steps, int)
            and values["save_steps"] % eval_steps
        ):
            raise ConfigError(
                f"load_best_model_at_end loads the best checkpoint, so save_steps ({values['save_steps']}) must "
                f"be a multiple of eval_steps ({eval_steps}): leave eval_steps unset (it then equals "
                "save_steps) or pick a divisor of save_steps"
            )
        return TrainingArguments(**values)


def _check_report_to(report_to: str | list[str] | None) -> None:
    """Refuse an integration whose package is missing now: transformers would only fail once the model is loaded."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    wanted = [report_to] if isinstance(report_to, str) else list(report_to or [])
    available = get_available_reporting_integrations()
    for name in wanted:
        if name in INTEGRATION_TO_CALLBACK and name not in available:
            raise ConfigError(
                f"report_to {name!r}: transformers finds no {name} package here; install it (e.g. pip install {name}) "
                "or leave report_to at 'none'"
            )


def _refuse_fp16(values: dict[str, Any]) -> None:
    """Unsloth's T4 notebooks set ``fp16=True``; passed on, Gemma's activations overflow fp16 mid-run (inf/NaN)."""
    chosen = [name for name in ("fp16", "fp16_full_eval") if values.get(name)]
    if chosen:
        raise ConfigError(
            f"{' and '.join(chosen)}=True is refused for Gemma: its activations overflow fp16 (inf/NaN losses, as "
            "seen on T4 GPUs). Remove it: on a T4 (no bf16 hardware) persian-qlora computes in fp32 with the weights "
            "in 4-bit, and on a GPU with bf16 (A100, L4, H100) in bf16 (docs/training.md)"
        )


_NOT_TRAINING_ARGUMENTS = (
    "extra",
    "max_length",
    "padding_free",
    "lean_loss",
    "loss_chunk_size",
    "early_stopping_patience",
)


class RunMetricsCallback(TrainerCallback, ExportableState):
    """Records wall time, peak memory and trained tokens/s, and writes ``metrics.json`` and charts at the end.

    Peak memory is measured over ``train()`` by :class:`~persian_qlora.measure.PhaseMeter` on the model's device:
    CUDA's max allocated and reserved on a GPU, the sampled peak resident set size on CPU; ``memory_by_rank`` holds
    every process's, each naming its device. Trained tokens are label tokens that carry loss, summed over all
    processes; token and time totals survive a resume from checkpoint.
    """

    def __init__(self) -> None:
        self.trained_tokens = 0
        self.train_seconds = 0.0  # completed seconds: restored on resume, final after train()
        self._memory_by_rank: list[dict[str, Any]] = []
        self._started: float | None = None

    def elapsed(self) -> float:
        """Training seconds so far, across resumes."""
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self.train_seconds + running

    def state(self) -> dict[str, Any]:  # saved in every checkpoint
        return {"args": {}, "attributes": {"trained_tokens": self.trained_tokens, "train_seconds": self.elapsed()}}

    def on_train_begin(self, args, state, control, *, model, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict):  # resumed: continue the totals
            for name, value in saved.get("attributes", {}).items():
                setattr(self, name, value)
        self._meter = PhaseMeter(next(model.parameters()).device).__enter__()
        self._started = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        from accelerate.utils import gather_object

        self.train_seconds, self._started = self.elapsed(), None
        self._meter.__exit__(None, None, None)
        self._memory_by_rank = gather_object([self._meter.result.memory])  # every process takes part
        if state.is_world_process_zero:
            output = Path(args.output_dir)
            output.mkdir(parents=True, exist_ok=True)
            atomic_write_text(output / METRICS_FILE, json.dumps(self.summary(state), indent=2))
            write_training_charts(state.log_history, output)

    def summary(self, state) -> dict[str, Any]:
        steps = [
            {k: entry[k] for k in ("step", "loss", "grad_norm", "learning_rate") if k in entry}
            for entry in state.log_history
            if "loss" in entry
        ]
        return {
            "global_step": state.global_step,
            "train_seconds": self.train_seconds,
            "trained_tokens": self.trained_tokens,
            "trained_tokens_per_second": self.trained_tokens / self.train_seconds if self.train_seconds else None,
            "final_loss": steps[-1]["loss"] if steps else None,
            "memory": self._meter.result.memory,
            "memory_by_rank": self._memory_by_rank,
            "log": steps,
            "eval_log": [
                {"step": e["step"], "eval_loss": e["eval_loss"]} for e in state.log_history if "eval_loss" in e
            ],
            "best_eval_loss": state.best_metric,
            "best_checkpoint": state.best_model_checkpoint,
        }


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """The newest *complete* ``checkpoint-N`` in ``output_dir``, or None.

    Trainer writes a checkpoint in place and ``trainer_state.json`` last; a checkpoint whose state file is missing
    or unreadable was cut off while saving (a kill, a full disk) and is skipped, where transformers'
    ``get_last_checkpoint`` would pick it and fail to resume.
    """
    candidates = []
    for path in Path(output_dir).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and path.is_dir():
            candidates.append((int(step), path))
    for _, path in sorted(candidates, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("ignoring %s: it was interrupted while being saved", path)
            continue
        return str(path)
    return None


class _Trainer(Trainer):
    """``Trainer`` that computes the lean loss (in training, and in evaluations that ask for no logits), weighs
    every trained token alike under gradient accumulation, counts trained tokens, stops on a non-finite loss or
    gradient norm before the optimizer step, resumes only from complete checkpoints, and saves how the base was
    loaded beside every adapter it saves."""

    def __init__(
        self, *args: Any, run_metrics: RunMetricsCallback, lean_loss: bool, loss_chunk_size: int, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.run_metrics = run_metrics
        self.loss_chunk_size = loss_chunk_size
        # FSDP and ZeRO-3 shard the LM head's weight outside the model's forward, where the lean loss calls it.
        sharded = self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        if lean_loss and sharded:
            logger.warning("lean_loss is off under FSDP and DeepSpeed ZeRO-3: the plain loss is used")
        self.lean_loss = lean_loss and not sharded
        # Our compute_loss divides by the trained tokens of the whole accumulated batch for every family. Trainer
        # would otherwise pass no num_items_in_batch to the multimodal classes (accepts_loss_kwargs is False for
        # Gemma3nForConditionalGeneration) and average micro-batch means instead.
        self.model_accepts_loss_kwargs = True
        self._step_tokens: torch.Tensor | None = None
        self._step_loss: torch.Tensor | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                logger.warning("no complete checkpoint in %s: training from the start", self.args.output_dir)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # No KV cache in training: with one, sdpa/eager attention would cross packed conversations' boundaries.
        inputs = {**inputs, "use_cache": False}
        if "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = None
        if self.lean_loss and not return_outputs:
            chunk = self.loss_chunk_size
            loss = lean_model_loss(model, labels, num_items_in_batch=num_items_in_batch, chunk_size=chunk, **inputs)
        else:  # the plain loss over full logits, computed here so that every family is normalised alike
            outputs = model(**inputs)
            loss = ForCausalLMLoss(
                outputs.logits, labels, vocab_size=outputs.logits.shape[-1], num_items_in_batch=num_items_in_batch
            )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: DDP averages the gradients
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        loading = getattr(self.accelerator.unwrap_model(self.model), "base_loading", None)
        if not self.args.should_save:  # the writing rank only, as Trainer._save
            return
        if loading is not None:
            loading.save(output_dir or self.args.output_dir)
        data = getattr(self.train_dataset, "dataset", self.train_dataset)  # a random_split part: its whole set
        if hasattr(data, "normalize"):
            save_normalization(output_dir or self.args.output_dir, data.normalize)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation without ``compute_metrics`` asks for the loss alone: compute it lean. Trainer's own step asks
        ``compute_loss`` for the outputs too, i.e. logits over the whole vocabulary at every position."""
        if not (self.lean_loss and prediction_loss_only and "labels" in inputs):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)  # as Trainer's step
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        return loss.detach().mean(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Accumulated on the device, read once per optimizer step below: no extra sync per micro-step.
        trained = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
        self._step_tokens = trained if self._step_tokens is None else self._step_tokens + trained
        self._step_loss = loss.detach() if self._step_loss is None else self._step_loss + loss.detach()
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """Called once per optimizer step, before the update: count tokens, and stop on a non-finite value."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        tokens, loss = self._step_tokens, self._step_loss
        self._step_tokens = self._step_loss = None
        if tokens is not None:  # every rank counted its own batches: the run trained their sum
            self.run_metrics.trained_tokens += int(self.accelerator.reduce(tokens, reduction="sum"))
        # Trainer's logging_nan_inf_filter only hides a NaN loss from the logs; here it stops the run.
        for what, value in (("loss", loss), ("gradient norm", grad_norm)):
            if value is not None and not math.isfinite(float(value)):
                step = self.state.global_step + 1
                raise NonFiniteError(step, what, float(value), latest_checkpoint(self.args.output_dir))
        return grad_norm


def make_trainer(
    model,
    tokenizer,
    train_dataset,
    eval_dataset=None,
    config: TrainConfig | None = None,
    *,
    callbacks: list[TrainerCallback] | None = None,
) -> Trainer:
    """A ``transformers.Trainer`` for a model from :func:`build_qlora_model` / :func:`build_lora_model`.

    It uses :class:`GemmaChatCollator` (padding-free by default, with ``token_type_ids`` where the model needs
    them) and the lean loss (see :class:`TrainConfig`), logs loss, grad
    norm and learning rate every step, checkpoints every ``save_steps``, evaluates ``eval_dataset`` (held-out
    conversations, as ``train_dataset``; optional) every ``eval_steps``, and records run metrics
    (:class:`RunMetricsCallback`, also at ``trainer.run_metrics``). ``trainer.train(resume_from_checkpoint=True)``
    resumes the latest checkpoint in ``output_dir``. Save the adapter and tokenizer with ``trainer.save_model()``.
    """
    config = config if config is not None else TrainConfig()
    run_metrics = RunMetricsCallback()
    callbacks = [run_metrics, *(callbacks or [])]
    if config.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    return _Trainer(
        model=model,
        args=config.training_arguments(evaluate=eval_dataset is not None),
        data_collator=GemmaChatCollator.for_model(tokenizer, model, padding_free=config.padding_free),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        run_metrics=run_metrics,
        lean_loss=config.lean_loss,
        loss_chunk_size=config.loss_chunk_size,
    )


def write_training_charts(log_history: list[dict[str, Any]], output_dir: str | Path) -> list[Path]:
    """Write ``loss.png``, ``grad_norm.png`` and, with evaluation, ``eval_loss.png`` (per optimizer step) from a
    Trainer log history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, title in (("loss", "training loss"), ("grad_norm", "gradient norm"), ("eval_loss", "held-out loss")):
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None)
        ax.set(xlabel="optimizer step", ylabel=key, title=title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(output_dir) / f"{key}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


@dataclass
class RunConfig:
    """One fine-tuning run: what to train, on what, and how. Read from YAML with :meth:`load`.

    ``tiny=True`` is the offline preset: a tiny random Gemma 3 from :mod:`persian_qlora.tiny` and the bundled
    corpus, in place of ``model`` and ``data``. ``gguf_file`` names a GGUF checkpoint in (or instead of)
    ``model``, converted once into a cached ordinary checkpoint (:func:`~persian_qlora.bases.gguf_base`).

    Held-out evaluation during training (see :class:`TrainConfig` for when and what): ``eval_data``, a dataset
    name or file as ``data``, read at ``eval_split``; or ``eval_fraction``, that share of the training
    conversations, drawn with ``train.seed`` and not trained on. Never the test split of the training data, which
    is kept for the final evaluation (``compare``). ``on_error``, ``data_format``, ``columns`` and ``normalize`` are
    :class:`PersianChatDataset`'s, for every set the run reads.

    ``text_only``, ``attn_implementation``, ``device_map`` and ``per_layer_embeddings_on_host`` go to the model
    builder (:func:`~persian_qlora.build_qlora_model`; None leaves the library's default).
    """

    method: Literal["qlora", "lora"] = "qlora"
    model: str = "google/gemma-3-1b-it"
    data: str = "mshojaei77/persian-gk"
    split: str = "train"
    eval_data: str | None = None
    eval_split: str = "validation"
    eval_fraction: float = 0.0
    on_error: Literal["raise", "skip"] = "raise"
    data_format: str | None = None  # one of persian_qlora.dataset.DATA_FORMATS; None detects it
    columns: dict[str, str] | None = None  # our field name -> the dataset's own
    normalize: NormalizerConfig | None = DEFAULT_NORMALIZER
    tiny: bool = False
    gguf_file: str | None = None
    quant_storage: str | None = None  # QLoRA only: "bfloat16" for FSDP-QLoRA (see docs/multi-gpu.md)
    text_only: bool = True
    attn_implementation: str | None = None
    device_map: str | dict[str, Any] | None = None
    per_layer_embeddings_on_host: bool | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def load(cls, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
        """Recipe defaults, then the YAML file's keys, then ``overrides`` (e.g. from the command line).

        Keys are flat: the fields above; ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules`` (any
        :class:`LoraSettings` field with ``lora_`` before it); any :class:`TrainConfig` field; and any other
        ``TrainingArguments`` field (kept in ``train.extra``). Or they are grouped in sections, as axolotl and
        LLaMA-Factory users write them: ``model:`` (``name_or_path`` for ``model``, and the model settings),
        ``data:`` (``name_or_path`` for ``data``, the data settings and ``max_length``), ``lora:`` (``r``,
        ``alpha``...) and ``train:``; :data:`SECTIONS` lists them. An unknown key is a :class:`ConfigError` naming
        the nearest valid one. ``normalize`` is true (the default normaliser), false, or a mapping of
        :class:`NormalizerConfig` fields.
        """
        import yaml

        values: dict[str, Any] = {}
        if yaml_path is not None:
            loaded = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{yaml_path}: expected a mapping of settings, got {type(loaded).__name__}")
            values.update(_flatten(loaded, str(yaml_path)))
        values.update(_flatten(overrides or {}, "overrides"))

        config = cls()
        hf_defaults = {f.name: f.default for f in fields(TrainingArguments)}
        for key, value in values.items():
            where = _FLAT_KEYS.get(key)
            if where is None and key not in hf_defaults:
                raise ConfigError(f"unknown setting {key!r}{_nearest_key(key)}")
            if key == "normalize":
                config.normalize = _normalizer(value)
            elif where == "run":
                setattr(config, key, _like(getattr(config, key), value, key))
            elif where == "lora":
                name = key.removeprefix("lora_")
                value = tuple(value) if name == "target_modules" else _like(getattr(config.lora, name), value, key)
                setattr(config.lora, name, value)
            elif where == "train":
                setattr(config.train, key, _like(getattr(config.train, key), value, key))
            else:
                config.train.extra[key] = _like(hf_defaults.get(key), value, key)
        config.train.output_dir = str(_checked_output_dir(config.train.output_dir))
        if config.method not in ("qlora", "lora"):
            raise ValueError(f"method must be 'qlora' or 'lora', got {config.method!r}")
        config.check_data_settings()
        # Fail now, not hours later, on a misspelt TrainingArguments field or contradictory evaluation settings.
        config.train.training_arguments(evaluate=config.eval_data is not None or config.eval_fraction > 0)
        return config

    def training_source(self) -> str:
        """Where the training conversations come from: ``data``, or the bundled corpus with ``tiny``."""
        from persian_qlora.dataset import bundled_corpus_path

        return str(bundled_corpus_path("train")) if self.tiny else self.data

    def model_settings(self) -> dict[str, Any]:
        """The model builder's keyword arguments from this config (those left at None are not passed)."""
        settings = {
            "attn_implementation": self.attn_implementation,
            "device_map": self.device_map,
            "per_layer_embeddings_on_host": self.per_layer_embeddings_on_host,
        }
        return {"text_only": self.text_only, **{k: v for k, v in settings.items() if v is not None}}

    def dataset_settings(self) -> dict[str, Any]:
        """:class:`PersianChatDataset`'s keyword arguments from this config, for every set the run reads."""
        return {
            "max_length": self.train.max_length,
            "on_error": self.on_error,
            "normalize": self.normalize,
            "data_format": self.data_format,
            "columns": self.columns,
        }

    def check_data_settings(self) -> None:
        """Refuse data settings that cannot work, before anything is loaded."""
        from persian_qlora.dataset import bundled_corpus_path, check_columns, check_data_format

        check_data_format(self.data_format)
        check_columns(self.columns)
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be at least 0 and below 1, got {self.eval_fraction}")
        if self.eval_data is None:
            return
        if self.eval_fraction:
            raise ConfigError("set eval_data or eval_fraction, not both")
        source = self.training_source()
        same = _same_source(self.eval_data, source)
        in_file = Path(source).is_file()  # a file has no splits: all of it is training data
        bundled_test = _same_source(source, bundled_corpus_path("train")) and _same_source(
            self.eval_data, bundled_corpus_path("test")
        )
        if bundled_test or (same and not in_file and self.eval_split == "test"):
            raise ConfigError(
                f"eval_data {self.eval_data!r} (split {self.eval_split!r}) is the test split of the training data, "
                "kept for the final evaluation: evaluate during training on a validation split or file, or hold "
                "out eval_fraction of the training conversations"
            )
        if same and (in_file or self.eval_split == self.split):
            raise ConfigError(
                f"eval_data {self.eval_data!r} is the training data itself: name a validation split or file, or "
                "hold out eval_fraction of the training conversations"
            )

    def load_datasets(self, tokenizer) -> tuple[Any, Any]:
        """The training conversations and the held-out evaluation set (None without one), tokenized."""
        from persian_qlora.dataset import PersianChatDataset

        self.check_data_settings()
        settings = self.dataset_settings()
        train = PersianChatDataset(self.training_source(), tokenizer, split=self.split, **settings)
        logger.info("training data:\n%s", train.stats)
        if self.eval_data is not None:
            return train, PersianChatDataset(self.eval_data, tokenizer, split=self.eval_split, **settings)
        if not self.eval_fraction:
            return train, None
        held_out = round(len(train) * self.eval_fraction)
        if not 0 < held_out < len(train):
            raise ConfigError(
                f"eval_fraction {self.eval_fraction} of {len(train)} conversations holds out {held_out}: "
                "choose a fraction that leaves at least one conversation on each side"
            )
        generator = torch.Generator().manual_seed(self.train.seed)
        train_part, eval_part = torch.utils.data.random_split(train, [len(train) - held_out, held_out], generator)
        logger.info("held out %d of %d conversations for evaluation", held_out, len(train))
        return train_part, eval_part


# The sectioned form of a run's YAML: each section's keys and the flat key each stands for.
SECTIONS: dict[str, dict[str, str]] = {
    "model": {
        "name_or_path": "model",
        **{
            key: key
            for key in (
                "method",
                "tiny",
                "gguf_file",
                "quant_storage",
                "text_only",
                "attn_implementation",
                "device_map",
                "per_layer_embeddings_on_host",
            )
        },
    },
    "data": {
        "name_or_path": "data",
        **{
            key: key
            for key in (
                "split",
                "eval_data",
                "eval_split",
                "eval_fraction",
                "on_error",
                "data_format",
                "columns",
                "normalize",
                "max_length",
            )
        },
    },
    "lora": {f.name: f"lora_{f.name}" for f in fields(LoraSettings)},
    "train": {f.name: f.name for f in fields(TrainConfig) if f.name not in ("extra", "max_length")},
}
# Every flat key but TrainingArguments' own, and which config holds it.
_FLAT_KEYS: dict[str, str] = {
    **{f.name: "run" for f in fields(RunConfig) if f.name not in ("lora", "train")},
    **{f"lora_{f.name}": "lora" for f in fields(LoraSettings)},
    **{f.name: "train" for f in fields(TrainConfig) if f.name != "extra"},
}


def _flatten(values: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """Sectioned settings as flat keys; flat keys pass through. A key set twice is refused."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("lora", "train") and not isinstance(value, Mapping):
            raise ConfigError(f"{origin}: {key!r} is a section: a mapping of settings, not {value!r}")
        if key in SECTIONS and isinstance(value, Mapping):
            items = [
                (SECTIONS[key].get(sub) or _unknown_in_section(key, sub), sub_value) for sub, sub_value in value.items()
            ]
        else:
            items = [(key, value)]
        for name, item in items:
            if name in flat:
                raise ConfigError(f"{origin}: {name!r} is set twice (in a section and at the top level)")
            flat[name] = item
    return flat


def _unknown_in_section(section: str, key: str) -> str:
    """The flat key of a ``train:`` key that is a ``TrainingArguments`` field; else a ConfigError with a hint."""
    hf_fields = [f.name for f in fields(TrainingArguments)]
    if section == "train" and key in hf_fields:
        return key
    for other, keys in SECTIONS.items():
        for sub, flat in keys.items():
            if other != section and key in (sub, flat):
                raise ConfigError(f"{key!r} is not a {section}: setting; it belongs in the {other}: section as {sub!r}")
    candidates = [*SECTIONS[section], *(hf_fields if section == "train" else [])]
    guess = difflib.get_close_matches(key, candidates, n=1)
    hint = f"; did you mean {guess[0]!r}?" if guess else f"; the {section}: section takes {sorted(SECTIONS[section])}"
    raise ConfigError(f"unknown setting {key!r} in the {section}: section{hint}")


# What axolotl and LLaMA-Factory call some of these settings, for the hint on an unknown key.
_OTHER_TOOLS_NAMES = {
    "base_model": "model",
    "model_name_or_path": "model",
    "dataset": "data",
    "datasets": "data",
    "lora_rank": "lora_r",
    "lora_target": "lora_target_modules",
    "cutoff_len": "max_length",
    "sequence_len": "max_length",
    "micro_batch_size": "per_device_train_batch_size",
    "num_epochs": "num_train_epochs",
    "lr_scheduler": "lr_scheduler_type",
}


def _nearest_key(key: str) -> str:
    """A hint for an unknown flat key: our name for another tool's, the flat name of a section key, or the
    nearest flat key."""
    if key in _OTHER_TOOLS_NAMES:
        return f"; did you mean {_OTHER_TOOLS_NAMES[key]!r}?"
    for keys in SECTIONS.values():
        if keys.get(key, key) != key:
            return f"; did you mean {keys[key]!r}?"
    candidates = [*_FLAT_KEYS, *(f.name for f in fields(TrainingArguments))]
    guess = difflib.get_close_matches(key, candidates, n=1)
    return f"; did you mean {guess[0]!r}?" if guess else ""


def _normalizer(value: Any) -> NormalizerConfig | None:
    """``normalize`` from YAML: true (the default normaliser), false or null (none), or NormalizerConfig fields."""
    if isinstance(value, NormalizerConfig) or value is None:
        return value
    if isinstance(value, bool):
        return DEFAULT_NORMALIZER if value else None
    if isinstance(value, Mapping):
        known = [f.name for f in fields(NormalizerConfig)]
        for key in value:
            if key not in known:
                guess = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {guess[0]!r}?" if guess else ""
                raise ConfigError(f"normalize: unknown setting {key!r}, expected some of {known}{hint}")
        return NormalizerConfig(**value)
    raise ConfigError(
        f"normalize must be true, false or a mapping of {NormalizerConfig.__name__} fields, got {value!r}"
    )


def _same_source(a: str | Path, b: str | Path) -> bool:
    """Whether two dataset names or paths name the same data (paths compared resolved)."""
    first, second = Path(a).expanduser(), Path(b).expanduser()
    if first.exists() and second.exists():
        return first.resolve() == second.resolve()
    return str(a) == str(b)


def _checked_output_dir(value: str | Path) -> Path:
    """Resolve ``output_dir`` (``~`` and relative parts) and refuse places that cannot be a run directory.

    Everything a run writes (checkpoints, adapter, metrics, a tiny base) goes under this one directory.
    """
    path = Path(value).expanduser().resolve()
    if path.is_file():
        raise ValueError(f"output_dir {path} is a file, not a directory")
    if path == Path(path.anchor) or path == Path.home():
        raise ValueError(f"output_dir {path} would scatter a run over a root or home directory; use a subdirectory")
    return path


def _like(default: Any, value: Any, key: str) -> Any:
    """Give ``value`` the numeric type of ``default``: YAML reads ``2e-5`` (no dot) as a string."""
    if isinstance(default, bool) or value is None or not isinstance(default, (int, float)):
        return value
    try:
        return type(default)(value) if isinstance(default, float) or float(value).is_integer() else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None


def run_training(config: RunConfig, *, resume: bool = False, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Load data and model, train, and save the adapter, tokenizer, metrics and charts to ``output_dir``.

    ``resume=True`` continues from the latest checkpoint in ``output_dir`` when there is one.
    """
    from transformers import AutoTokenizer, set_seed

    from persian_qlora.modeling import build_lora_model, build_qlora_model, default_bnb_config

    output_dir = Path(config.train.output_dir)
    model_path = config.model
    if config.tiny:
        from accelerate import PartialState

        from persian_qlora.tiny import build_tiny_gemma

        model_path = str(output_dir / "tiny-base")
        with PartialState().main_process_first():  # under `accelerate launch`, rank 0 builds it, the others wait
            if not (output_dir / "tiny-base" / "config.json").exists():
                build_tiny_gemma(model_path, "gemma3")
    elif config.gguf_file is not None:
        from persian_qlora.bases import gguf_base

        model_path = str(gguf_base(model_path, config.gguf_file))  # the same checkpoint for QLoRA and LoRA

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, held_out = config.load_datasets(tokenizer)
    builder = build_qlora_model if config.method == "qlora" else build_lora_model
    extra: dict[str, Any] = config.model_settings()
    if config.method == "qlora" and config.quant_storage:
        extra["bnb_config"] = default_bnb_config(quant_storage=config.quant_storage)
    set_seed(config.train.seed)  # LoRA's A matrices are random: the same seed gives the same run
    model = builder(model_path, lora=config.lora, **extra)
    trainer = make_trainer(model, tokenizer, train, held_out, config=config.train, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model()
    return output_dir
