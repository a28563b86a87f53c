"""Inference: loading merged or base+adapter models (also 4-bit/8-bit), streaming, and the chat command."""

import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch

from persian_qlora import PersianChatDataset
from persian_qlora.chat import ChatSession
from persian_qlora.generation import evaluation_pairs, generate, load_for_inference, stream_reply

GREEDY = {"do_sample": False}


@pytest.fixture(scope="module")
def loaded(tiny_gemma3_path):
    return load_for_inference(tiny_gemma3_path)


@pytest.fixture(scope="module")
def prompts(loaded):
    _, tokenizer = loaded
    return evaluation_pairs(PersianChatDataset.bundled(tokenizer, "test").conversations[:3])[0]


def test_streaming_yields_the_same_text_as_generate(loaded, prompts):
    model, tokenizer = loaded
    for prompt in prompts:
        streamed = "".join(stream_reply(model, tokenizer, prompt, max_new_tokens=16))
        assert streamed.rstrip() == generate(model, tokenizer, [prompt], max_new_tokens=16).texts[0]


def test_generation_config_stops_on_eos_and_end_of_turn(loaded):
    model, tokenizer = loaded
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}
    assert set(model.generation_config.eos_token_id) == stops and not model.training


@pytest.mark.parametrize(("load_in", "layer"), [("4bit", bnb.nn.Linear4bit), ("8bit", bnb.nn.Linear8bitLt)])
def test_quantized_loading_generates_on_cpu(tiny_gemma3_path, prompts, load_in, layer):
    model, tokenizer = load_for_inference(tiny_gemma3_path, load_in=load_in)
    assert isinstance(model.model.layers[0].self_attn.q_proj, layer)
    assert type(model.lm_head) is torch.nn.Linear
    result = generate(model, tokenizer, prompts[:2], max_new_tokens=6)
    assert len(result.texts) == 2 and all(n > 0 for n in result.new_tokens)


def test_fp16_is_refused(tiny_gemma3_path):
    from persian_qlora import PersianQLoRAError

    with pytest.raises(PersianQLoRAError, match="fp16"):
        load_for_inference(tiny_gemma3_path, dtype=torch.float16)


def test_chat_session_keeps_history_and_resets(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, system="کوتاه پاسخ بده.", sampling=GREEDY, max_new_tokens=8)
    first = "".join(session.send("سلام"))
    "".join(session.send("حالت چطوره؟"))
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first.strip()
    rendered = tokenizer.apply_chat_template(session.messages(), tokenize=False)
    assert rendered.index("سلام") < rendered.index("حالت چطوره؟")  # the second turn saw the first
    session.reset()
    assert session.messages() == [{"role": "system", "content": "کوتاه پاسخ بده."}]


def _chat_command(path):
    return [sys.executable, "-m", "persian_qlora.cli", "chat", "--model", str(path), "--max-new-tokens", "6"]


def test_chat_answers_two_turns_through_a_pipe(tiny_gemma3_path):
    result = subprocess.run(
        [*_chat_command(tiny_gemma3_path), "--greedy"],
        input="سلام\nحالت چطوره؟\n/exit\nاین خط خوانده نمی‌شود\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("مدل> ") == 2


def test_chat_in_a_real_terminal(tiny_gemma3_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        _chat_command(tiny_gemma3_path)[0], _chat_command(tiny_gemma3_path)[1:], encoding="utf-8", timeout=120
    )
    child.expect("/exit quits")
    child.expect("شما> ")
    child.sendline("سلام")
    child.expect("مدل> ")
    child.expect("شما> ")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.fixture(scope="module")
def fp4_adapter(tiny_gemma3_path, tmp_path_factory):
    """A QLoRA adapter whose base was quantised with non-default settings (FP4, no double quantisation)."""
    from transformers import BitsAndBytesConfig

    from persian_qlora.modeling import build_qlora_model

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False, llm_int8_skip_modules=["lm_head"]
    )
    model = build_qlora_model(tiny_gemma3_path, bnb_config=bnb_config)
    directory = tmp_path_factory.mktemp("fp4-adapter")
    model.save_pretrained(directory)
    model.base_loading.save(directory)
    return directory


def test_4bit_inference_quantises_the_base_as_training_did(tiny_gemma3_path, fp4_adapter):
    model, _ = load_for_inference(tiny_gemma3_path, fp4_adapter, quantization="4bit")
    state = model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer().weight.quant_state
    assert (state.quant_type, state.nested) == ("fp4", False)


def test_an_adapter_is_refused_on_a_base_of_another_model_type(tiny_gemma3_path, fp4_adapter, tmp_path):
    import json
    import shutil

    from persian_qlora import PersianQLoRAError

    moved = shutil.copytree(fp4_adapter, tmp_path / "adapter")
    record = json.loads((moved / "base_loading.json").read_text())
    (moved / "base_loading.json").write_text(json.dumps({**record, "model_type": "gemma3n_text"}))
    with pytest.raises(PersianQLoRAError, match="trained on a gemma3n_text checkpoint.*is gemma3_text"):
        load_for_inference(tiny_gemma3_path, moved)


# Arabic yeh and kaf, as an Arabic keyboard layout types them, against the Persian letters training saw.
ARABIC_TYPED, PERSIAN = "آيا كتاب را خواندي؟", "آیا کتاب را خواندی؟"


def _prompt_ids(model, send):
    """The token ids the model is first called with while ``send()`` runs: the prompt as the model sees it."""
    seen = []
    hook = model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()) if not seen else None, with_kwargs=True
    )
    try:
        send()
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("way", ["generate", "stream_reply", "ChatSession"])
def test_arabic_yeh_and_kaf_reach_the_model_as_persian(loaded, way):
    model, tokenizer = loaded

    def prompt_ids(text, system="كوتاه", **normalize):
        conversation = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        sends = {
            "generate": lambda: generate(model, tokenizer, [conversation], max_new_tokens=1, **normalize),
            "stream_reply": lambda: list(stream_reply(model, tokenizer, conversation, max_new_tokens=1, **normalize)),
            "ChatSession": lambda: list(
                ChatSession(model, tokenizer, system=system, sampling=GREEDY, max_new_tokens=1, **normalize).send(text)
            ),
        }
        return _prompt_ids(model, sends[way])

    assert prompt_ids(ARABIC_TYPED) == prompt_ids(PERSIAN, system="کوتاه")
    assert prompt_ids(ARABIC_TYPED, normalize=None) != prompt_ids(PERSIAN, system="کوتاه", normalize=None)


def test_the_adapter_records_its_normalisation_and_inference_applies_it(tiny_gemma3_path, tmp_path):
    from transformers import AutoTokenizer

    from persian_qlora.modeling import build_lora_model
    from persian_qlora.normalize import NormalizerConfig, read_normalization
    from persian_qlora.training import TrainConfig, make_trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3_path)
    no_spacing = NormalizerConfig(spacing=False)
    data = PersianChatDataset.bundled(tokenizer, max_length=128, normalize=no_spacing)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, extra={"disable_tqdm": True, "save_strategy": "no"})
    trainer = make_trainer(build_lora_model(tiny_gemma3_path), tokenizer, data, config=config)
    trainer.train()
    trainer.save_model()
    assert read_normalization(tmp_path) == no_spacing
    model, _ = load_for_inference(tiny_gemma3_path, tmp_path)
    assert model.text_normalizer == no_spacing
