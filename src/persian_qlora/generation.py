"""Batched generation from chat conversations, shared by evaluation, the comparison and (later) chat.

Prompts are left-padded (a decoder-only model continues from the right edge), batched by similar length so little
padding is computed, and stop on both ``<eos>`` and the turn end of the tokenizer's turn format (``<end_of_turn>``;
Gemma 4's ``<turn|>``).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from persian_qlora._deprecation import renamed_arguments
from persian_qlora.measure import PhaseMeter
from persian_qlora.normalize import DEFAULT_NORMALIZER, NormalizerConfig, normalize_persian, read_normalization

__all__ = [
    "REFERENCE_SAMPLING",
    "AS_TRAINED",
    "GenerationResult",
    "evaluation_pairs",
    "generate",
    "load_for_inference",
    "normalized_prompt",
    "stop_token_ids",
    "stream_reply",
]

Conversation = list[dict[str, str]]
# The reference project's sampling settings: what chat uses, and what the GGUF export and its Modelfile carry.
REFERENCE_SAMPLING: dict[str, Any] = {"do_sample": True, "temperature": 0.1, "top_p": 0.95, "top_k": 64}

# The default prompt normalisation: the one recorded beside the model's adapter (text_normalization.json, read by
# load_for_inference), else the training default. Training normalises ي→ی, ك→ک, ZWNJ...; a prompt typed on an
# Arabic keyboard layout would otherwise reach the model in letters it never saw in training.
AS_TRAINED = "as trained"
PromptNormalization = NormalizerConfig | None | Literal["as trained"]


def normalized_prompt(model, conversation: Conversation, normalize: PromptNormalization = AS_TRAINED) -> Conversation:
    """``conversation`` with its user and system text normalised (``normalize=None``: as written). Model turns are
    the model's own words and stay as they are."""
    config = getattr(model, "text_normalizer", DEFAULT_NORMALIZER) if normalize == AS_TRAINED else normalize
    if config is None:
        return list(conversation)
    return [
        {**m, "content": normalize_persian(m["content"], config)} if m["role"] in ("user", "system") else m
        for m in conversation
    ]


@dataclass
class GenerationResult:
    texts: list[str]  # in the order of the input conversations
    new_tokens: list[int]
    ended_turn: list[bool]  # whether each reply stopped on <end_of_turn>/<eos> (not on the token limit)
    seconds: float
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / self.seconds if self.seconds else 0.0


def evaluation_pairs(conversations: Sequence[Conversation]) -> tuple[list[Conversation], list[str]]:
    """Split each conversation at its last model turn: (all turns before it, that turn's text)."""
    prompts, references = [], []
    for index, conversation in enumerate(conversations):
        last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError(f"conversation {index} has no model turn to evaluate against")
        prompts.append(list(conversation[:last]))
        references.append(conversation[last]["content"])
    return prompts, references


def stop_token_ids(tokenizer) -> list[int]:
    """``<eos>`` and the turn end of the tokenizer's turn format (``<end_of_turn>``, Gemma 4's ``<turn|>``): Gemma
    ends a turn with the latter, and a base model may emit the former."""
    from persian_qlora.families import turn_format_of

    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(turn_format_of(tokenizer).end_of_turn)]
    return [i for i in dict.fromkeys(ids) if i is not None and i != tokenizer.unk_token_id]


class _SuppressTokens:
    """A logits processor that sets the scores of ``token_ids`` to -inf, as transformers' ``suppress_tokens`` does.

    transformers' ``SuppressTokensLogitsProcessor`` rebuilds a vocabulary-sized mask with ``torch.isin`` at every
    step: with Gemma's 262,144 rows and its 6,000-odd untrained ids, that cost more than the rest of a decoding step
    of Gemma 3 270M on a CPU. Here the ids are turned into an index once and filled in place of the scores. Passed
    as ``logits_processor``, it runs where transformers' own would (after the other processors, before sampling's
    temperature, top-k and top-p), so replies are the same. Ids beyond the head's rows (a tokenizer larger than the
    model's vocabulary) are left out, as ``torch.isin`` leaves them out.
    """

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)
        self._index: dict[tuple[torch.device, int], torch.Tensor] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        key = (scores.device, scores.shape[-1])
        if key not in self._index:
            self._index[key] = self.token_ids[self.token_ids < scores.shape[-1]].to(scores.device)
        return scores.index_fill(-1, self._index[key], float("-inf"))


def _with_suppression(tokenizer, generate_kwargs: dict[str, Any], suppress_untrained: bool) -> dict[str, Any]:
    """``generate_kwargs`` with any ``suppress_tokens`` given, and the untrained tokens, suppressed by
    :class:`_SuppressTokens` (appended to any ``logits_processor`` given)."""
    from transformers import LogitsProcessorList

    from persian_qlora.tokens import untrained_token_ids

    kwargs = dict(generate_kwargs)
    suppressed = set(kwargs.pop("suppress_tokens", None) or [])
    if suppress_untrained:
        suppressed.update(untrained_token_ids(tokenizer))
    if not suppressed:
        return kwargs
    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    processors.append(_SuppressTokens(sorted(suppressed)))
    return {**kwargs, "logits_processor": processors}


def generate(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    progress: bool = False,
    suppress_untrained: bool = True,
    normalize: PromptNormalization = AS_TRAINED,
    **generate_kwargs: Any,
) -> GenerationResult:
    """Generate the next model turn of each conversation; return the texts in input order, whether each ended its
    turn (stopped on ``<end_of_turn>``/``<eos>`` rather than at ``max_new_tokens``), timing and memory.

    Greedy by default. Each prompt is rendered with the tokenizer's chat template and ``add_generation_prompt``;
    the reply is decoded without special tokens and stripped. ``suppress_untrained`` never lets the model emit a
    token no fine-tune trains (``<unused*>``, media placeholders, padding; see :mod:`persian_qlora.tokens`): a
    fine-tuned base model otherwise emits them where its turn should end. Extra keyword arguments go to
    ``model.generate``. User and system text is normalised as the training text was (:func:`normalized_prompt`;
    ``normalize=None`` sends it as written, or pass a :class:`~persian_qlora.NormalizerConfig`).
    """
    from tqdm.auto import tqdm

    prompts = [normalized_prompt(model, c, normalize) for c in conversations]
    rendered = tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    generate_kwargs = _with_suppression(tokenizer, generate_kwargs, suppress_untrained)
    texts: list[str] = [""] * len(encoded)
    counts: list[int] = [0] * len(encoded)
    ended_turn: list[bool] = [False] * len(encoded)
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    with PhaseMeter(device) as meter, torch.no_grad():
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding
                input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention[row, width - len(encoded[i]) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                eos_token_id=stops,
                pad_token_id=pad,
                **sampling,
                **generate_kwargs,
            )
            for row, i in enumerate(batch):
                new = output[row, width:].tolist()
                ended = next((k for k, t in enumerate(new) if t in stops), None)
                new = new if ended is None else new[: ended + 1]
                counts[i], ended_turn[i] = len(new), ended is not None
                texts[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    if was_training:
        model.train()
    return GenerationResult(
        texts=texts,
        new_tokens=counts,
        ended_turn=ended_turn,
        seconds=meter.result.seconds,
        memory=meter.result.memory,
    )


@renamed_arguments(path_or_id="model", quantization="load_in")
def load_for_inference(
    model: str | Path,
    adapter: str | Path | None = None,
    *,
    load_in: Literal["8bit", "4bit"] | None = None,
    dtype=None,
    text_only: bool | None = None,
    allow_pickle: bool = False,
    gguf_file: str | Path | None = None,
    **load_kwargs: Any,
):
    """Load ``model`` (hub id or directory: a merged model, or the base of ``adapter``) and its tokenizer, ready to
    generate.

    ``dtype``: bf16 on a GPU with native bf16, else fp32; fp16 is refused for Gemma (see ``resolve_dtype``).
    ``load_in="8bit"`` (LLM.int8) or ``"4bit"`` (NF4) loads the weights quantised with bitsandbytes, leaving
    the LM head, Gemma 3n's AltUp linears and any tower unquantised as in training. A multimodal checkpoint loads
    its language model alone unless ``text_only=False``; with an adapter, the default is how the adapter's base was
    loaded in training (its ``base_loading.json``), and a contradicting ``text_only`` is refused, since the
    adapter's weights are named after that model; so is a base of another ``model_type`` than the record's. With
    ``load_in="4bit"`` and a QLoRA adapter, the base is quantised with the recorded settings (quant type, double
    quantisation, storage dtype, skipped modules) from the recorded load dtype unless ``dtype`` is given: the NF4
    base the adapter was trained on. Without ``load_in`` the base loads in 16 bits, whatever training did.
    The model lands on the GPU when there is one. The generation config stops on ``<eos>`` and ``<end_of_turn>``.
    The tokenizer comes from the adapter directory when training saved one there. Weights and adapters load from
    safetensors only unless ``allow_pickle=True``. A ``gguf_file``
    (as in transformers) is converted once into a cached checkpoint (:func:`~persian_qlora.bases.gguf_base`), which
    is loaded like any other. The adapter's recorded text normalisation (``text_normalization.json``) becomes the
    model's ``text_normalizer``, which :func:`generate` and :func:`stream_reply` apply to prompts by default.
    Returns ``(model, tokenizer)``.
    """
    from transformers import AutoTokenizer, BitsAndBytesConfig

    from persian_qlora.errors import PersianQLoRAError
    from persian_qlora.families import never_quantised
    from persian_qlora.loading import default_bnb_config, load_base, read_provenance, resolve_dtype
    from persian_qlora.modeling import load_adapter

    trained = read_provenance(adapter) if adapter is not None else None
    recorded_nf4 = load_in == "4bit" and trained is not None and trained.quantization is not None
    # NF4 of a bf16 weight and of its fp32 copy differ: re-make the 4-bit base from the dtype training loaded it in.
    dtype = resolve_dtype(dtype if dtype is not None or not recorded_nf4 else trained.torch_dtype("load_dtype"))
    if trained is not None:
        if text_only is not None and text_only != trained.text_only:
            how = "its language model alone" if trained.text_only else "the whole model"
            raise PersianQLoRAError(
                f"the adapter in {adapter} was trained on {how} ({trained.architecture}); load it with "
                f"text_only={trained.text_only}, or leave text_only unset"
            )
        text_only = trained.text_only
    if recorded_nf4:
        load_kwargs["quantization_config"] = trained.bnb_config(dtype)
    elif load_in == "4bit":
        load_kwargs["quantization_config"] = default_bnb_config(dtype)
    elif load_in == "8bit":
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=never_quantised()
        )
        # LLM.int8 always multiplies in fp16 internally and warns about it on every call.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    elif load_in is not None:
        raise ValueError(f"load_in must be None, '8bit' or '4bit', got {load_in!r}")
    load_kwargs.setdefault("use_safetensors", None if allow_pickle else True)  # None: either format
    model, loading = load_base(
        model, text_only=True if text_only is None else text_only, dtype=dtype, gguf_file=gguf_file, **load_kwargs
    )
    if trained is not None and loading.model_type != trained.model_type:
        raise PersianQLoRAError(
            f"the adapter in {adapter} was trained on a {trained.model_type} checkpoint ({trained.base}), but "
            f"{loading.base} is {loading.model_type}; load it onto the base it was trained on"
        )
    tokenizer_source = loading.base
    if adapter is not None:
        model = load_adapter(model, adapter, allow_pickle=allow_pickle)
        model.text_normalizer = read_normalization(adapter)  # how its training text was normalised
        if (Path(adapter) / "tokenizer_config.json").exists():
            tokenizer_source = adapter
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.config.use_cache = True
    return model.eval(), tokenizer


def stream_reply(
    model,
    tokenizer,
    conversation: Conversation,
    *,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    suppress_untrained: bool = True,
    normalize: PromptNormalization = AS_TRAINED,
    **generate_kwargs: Any,
) -> Iterator[str]:
    """Yield the next model turn of one conversation piece by piece, as it is generated.

    Uses transformers' ``TextIteratorStreamer``: generation runs in a background thread and the decoded text
    arrives here. Joined, the pieces equal the text :func:`generate` returns for the same settings
    (``suppress_untrained`` and ``normalize`` included).
    """
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    prompt = normalized_prompt(model, conversation, normalize)
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    generate_kwargs = _with_suppression(tokenizer, generate_kwargs, suppress_untrained)
    device = next(model.parameters()).device
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(
                    input_ids=ids["input_ids"].to(device),
                    attention_mask=ids["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    eos_token_id=stop_token_ids(tokenizer),
                    pad_token_id=tokenizer.pad_token_id,
                    streamer=streamer,
                    **sampling,
                    **generate_kwargs,
                )
        except BaseException as err:  # re-raised in the caller's thread below
            errors.append(err)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    first = True
    for piece in streamer:
        if first:  # generate() strips the reply; a stream can only strip its start
            piece, first = piece.lstrip(), not piece.strip()
        if piece:
            yield piece
    worker.join()
    if errors:
        raise errors[0]
