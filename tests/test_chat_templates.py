"""The built-in chat templates (`model.chat_template: <name>`, models.CHAT_TEMPLATES): each one renders what its
family's official template renders, written out by hand below with the file it comes from; the generation prompt is
an exact prefix of the full conversation and an assistant turn ends with the family's end-of-turn token, in text and
in the token ids of a real 32K SentencePiece tokenizer (Mistral 7B's, ../shared/fixtures)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError

from sdpo_cli.config import CHAT_TEMPLATE_NAMES, ModelConfig
from sdpo_cli.data.tokenize import common_prefix_length, encode_pair, tokenize_pair
from sdpo_cli.models import CHAT_TEMPLATES, DEFAULT_CHAT_TEMPLATE, load_tokenizer
from tests.conftest import SHARED_FIXTURES, build_tokenizer

S, U, A = "You are terse.", "What is 2 plus 3?", "It is 5."
SYSTEM_USER = [{"role": "system", "content": S}, {"role": "user", "content": U}]
FULL = [*SYSTEM_USER, {"role": "assistant", "content": A}]

# name -> (the official template it follows, the family's BOS and EOS, the full conversation FULL, its generation
# prompt SYSTEM_USER + add_generation_prompt), written by hand from the official files.
EXPECTED = {
    "solar": (  # plus BOS, and EOS after the assistant (the official template has neither)
        "upstage/SOLAR-10.7B-Instruct-v1.0 tokenizer_config.json", ("<s>", "</s>"),
        "<s>### System:\nYou are terse.\n\n### User:\nWhat is 2 plus 3?\n\n### Assistant:\nIt is 5.</s>",
        "<s>### System:\nYou are terse.\n\n### User:\nWhat is 2 plus 3?\n\n### Assistant:\n"),
    "chatml": (
        "teknium/OpenHermes-2.5-Mistral-7B tokenizer_config.json", ("<s>", "<|im_end|>"),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 5.<|im_end|>\n",
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n"),
    "qwen2": (
        "Qwen/Qwen2-7B-Instruct tokenizer_config.json", (None, "<|im_end|>"),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 5.<|im_end|>\n",
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n"),
    "zephyr": (
        "HuggingFaceH4/zephyr-7b-beta tokenizer_config.json", ("<s>", "</s>"),
        "<|system|>\nYou are terse.</s>\n<|user|>\nWhat is 2 plus 3?</s>\n<|assistant|>\nIt is 5.</s>\n",
        "<|system|>\nYou are terse.</s>\n<|user|>\nWhat is 2 plus 3?</s>\n<|assistant|>\n"),
    "llama3": (
        "meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json", ("<|begin_of_text|>", "<|eot_id|>"),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 5.<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "mistral": (  # the system text opens the first user message
        "mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json (2024 revision)", ("<s>", "</s>"),
        "<s> [INST] You are terse.\n\nWhat is 2 plus 3? [/INST] It is 5.</s>",
        "<s> [INST] You are terse.\n\nWhat is 2 plus 3? [/INST]"),
    "gemma": (  # Gemma 2 raises on a system message; Gemma 3's rule: it opens the first user turn
        "google/gemma-2-9b-it tokenizer_config.json; system: google/gemma-3-4b-it", ("<bos>", "<eos>"),
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2 plus 3?<end_of_turn>\n"
        "<start_of_turn>model\nIt is 5.<end_of_turn>\n",
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2 plus 3?<end_of_turn>\n<start_of_turn>model\n"),
    "phi3": (
        "microsoft/Phi-3-mini-4k-instruct tokenizer_config.json", ("<s>", "<|endoftext|>"),
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\nIt is 5.<|end|>\n"
        "<|endoftext|>",
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\n"),
    "vicuna": (  # the system message replaces FastChat's default one
        "FastChat fastchat/conversation.py, conversation 'vicuna_v1.1' (lmsys/vicuna-7b-v1.5 ships no template)",
        ("<s>", "</s>"),
        "<s>You are terse. USER: What is 2 plus 3? ASSISTANT: It is 5.</s>",
        "<s>You are terse. USER: What is 2 plus 3? ASSISTANT:"),
}

# What each family's assistant turn ends with, after its text (the end-of-turn token, then what the template adds).
END_OF_TURN = {"solar": ["</s>"], "chatml": ["<|im_end|>", "\n"], "qwen2": ["<|im_end|>", "\n"],
               "zephyr": ["</s>", "\n"], "llama3": ["<|eot_id|>"], "mistral": ["</s>"],
               "gemma": ["<end_of_turn>", "\n"], "phi3": ["<|end|>", "\n", "</s>"], "vicuna": ["</s>"]}
# What the assistant's text follows in the full conversation, after the generation prompt.
LEAD = {"mistral": " ", "vicuna": " "}
# The markers that are special tokens in the family's own vocabulary (added to Mistral's for the id tests).
MARKERS = {"chatml": ["<|im_start|>", "<|im_end|>"], "qwen2": ["<|im_start|>", "<|im_end|>"],
           "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
           "gemma": ["<start_of_turn>", "<end_of_turn>"],
           "phi3": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]}


def render(name: str, messages: list[dict], generation: bool = False, tokens: tuple | None = None) -> str:
    bos, eos = tokens or EXPECTED[name][1]
    special = {"bos_token": bos, "eos_token": eos} if bos else {"eos_token": eos}
    return build_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                                 chat_template=CHAT_TEMPLATES[name], **special)


def test_the_names_are_listed_once():
    assert tuple(CHAT_TEMPLATES) == CHAT_TEMPLATE_NAMES and DEFAULT_CHAT_TEMPLATE in CHAT_TEMPLATE_NAMES
    assert set(EXPECTED) == set(CHAT_TEMPLATE_NAMES) == set(END_OF_TURN)
    assert {"llama3", "chatml", "mistral", "gemma", "phi3", "zephyr", "solar", "vicuna"} <= set(CHAT_TEMPLATE_NAMES)


def test_the_first_built_ins_are_unchanged():
    # The split fingerprint hashes the template's text: changing one of these would make every finished run that
    # used it (and every run of a tokenizer without a template: solar is the default) stale.
    digests = {name: hashlib.sha256(CHAT_TEMPLATES[name].encode()).hexdigest()[:16] for name in
               ("solar", "chatml", "zephyr")}
    assert digests == {"solar": "f44c200c1c752c83", "chatml": "448b526c04bda278", "zephyr": "c7e5f342fcbc7d66"}


@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_renders_what_the_official_template_renders(name):
    source, _, full, prompt = EXPECTED[name]
    assert source
    assert render(name, FULL) == full
    assert render(name, SYSTEM_USER, generation=True) == prompt


@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_prompt_is_a_prefix_and_the_turn_ends_with_the_end_of_turn_token(name):
    bos, eos = EXPECTED[name][1]
    ends = "".join(eos if piece == "</s>" else piece for piece in END_OF_TURN[name])
    for history in ([], [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]):
        for messages in ([*SYSTEM_USER[:1], *history, SYSTEM_USER[1]], [*history, SYSTEM_USER[1]]):
            prompt = render(name, messages, generation=True)
            full = render(name, [*messages, {"role": "assistant", "content": A}])
            assert full.startswith(prompt) and full[len(prompt):] == LEAD.get(name, "") + A + ends, (messages, full)


def test_default_system_messages_and_where_a_system_message_goes():
    assert render("qwen2", [{"role": "user", "content": U}], generation=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render("vicuna", [{"role": "user", "content": U}], generation=True) == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: What is 2 plus 3? ASSISTANT:")
    turns = [*FULL, {"role": "user", "content": "And 3 plus 4?"}]
    assert render("mistral", turns, generation=True) == (
        "<s> [INST] You are terse.\n\nWhat is 2 plus 3? [/INST] It is 5.</s> [INST] And 3 plus 4? [/INST]")
    assert render("gemma", turns, generation=True) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2 plus 3?<end_of_turn>\n<start_of_turn>model\n"
        "It is 5.<end_of_turn>\n<start_of_turn>user\nAnd 3 plus 4?<end_of_turn>\n<start_of_turn>model\n")
    # llama3 and gemma trim the contents, as the official templates do
    assert render("llama3", [{"role": "user", "content": "  Hi \n"}], generation=True).count("\n\nHi<|eot_id|>") == 1


@pytest.mark.parametrize("name", ["mistral", "gemma"])
def test_roles_must_alternate_where_the_official_template_says_so(name):
    with pytest.raises(TemplateError, match="alternate"):
        render(name, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], generation=True)


# Real tokenisation: Mistral 7B's 32K SentencePiece vocabulary (the paper's SOLAR has the same size), loaded as the
# fixtures README says, through sdpo's own load_tokenizer.


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory) -> Path:
    pytest.importorskip("sentencepiece", reason="the SentencePiece tokenizer needs sentencepiece (the dev extra)")
    pytest.importorskip("google.protobuf", reason="the SentencePiece tokenizer needs protobuf (the dev extra)")
    model = SHARED_FIXTURES / "mistral-7b-v0.1-tokenizer" / "tokenizer.model"
    if not model.is_file():
        pytest.skip("../shared/fixtures/mistral-7b-v0.1-tokenizer is absent (a user's fresh clone)")
    folder = tmp_path_factory.mktemp("mistral-tokenizer")
    shutil.copy(model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    return folder


def mistral_tokenizer(folder: Path, name: str):
    tok = load_tokenizer(ModelConfig(base=str(folder), chat_template=name))
    assert tok.chat_template == CHAT_TEMPLATES[name] and len(tok) == 32000
    if name in MARKERS:  # the family's own vocabulary has them as special tokens
        tok.add_special_tokens({"additional_special_tokens": MARKERS[name]})
        assert all(len(tok.encode(m, add_special_tokens=False)) == 1 for m in MARKERS[name])
    return tok


def real_prompts() -> list[list[dict]]:
    """Real rows of the fixtures: Orca (system + question) and UltraFeedback (a user message), as sdpo renders them."""
    orca = [json.loads(line) for line in (SHARED_FIXTURES / "orca_dpo_pairs.sample.jsonl").open()][:3]
    uf = [json.loads(line) for line in (SHARED_FIXTURES / "ultrafeedback_binarized.sample.jsonl").open()][:3]
    return ([[{"role": "system", "content": r["system"]}, {"role": "user", "content": r["question"]}] for r in orca]
            + [[{"role": "user", "content": r["prompt"]}] for r in uf])


def ids(tok, messages: list[dict], generation: bool = False) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=generation)["input_ids"])


@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_on_a_real_sentencepiece_vocabulary_the_prompt_ids_are_a_prefix(mistral_folder, name):
    tok = mistral_tokenizer(mistral_folder, name)
    end = [tok.convert_tokens_to_ids(piece) if piece != "\n" else tok.convert_tokens_to_ids("<0x0A>")
           for piece in END_OF_TURN[name]]
    for prompt in real_prompts():
        chosen, rejected = "Yes. It is 5.", "No idea\n, sorry!"
        prompt_ids = ids(tok, prompt, generation=True)
        p, c, r = tokenize_pair(tok, prompt, chosen, rejected, "chat")  # as `sdpo split` does
        assert p == prompt_ids  # the whole rendered prompt: nothing of it is cut off into the completions
        assert ids(tok, [*prompt, {"role": "assistant", "content": chosen}]) == prompt_ids + c
        assert c[-len(end):] == end and r[-len(end):] == end  # the completion teaches the model to stop
        assert tok.decode(c[:-len(end)]).strip() == chosen


def test_mistral_gives_the_inst_ids_of_mistral_common(mistral_folder):
    import sentencepiece

    tok = mistral_tokenizer(mistral_folder, "mistral")
    conversation = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]
    # <s> ▁[ INST ] ▁Hello ▁[ / INST ] ▁Hi ▁there </s>: [INST] is "▁[INST]" (733 16289 28793) after <s> as well
    assert ids(tok, conversation) == [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793, 15359, 736, 2]
    # mistral_common's v1 instruct layout: BOS, then each message encoded on its own by SentencePiece, then EOS
    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_folder / "tokenizer.model"))
    assert ids(tok, conversation) == [1, *sp.encode("[INST] Hello [/INST]"), *sp.encode("Hi there"), 2]
    with_system = ids(tok, [{"role": "system", "content": S}, *conversation])
    assert with_system[:4] == [1, 733, 16289, 28793]
    assert with_system == [1, *sp.encode(f"[INST] {S}\n\nHello [/INST]"), *sp.encode("Hi there"), 2]


def _common_suffix(a: list[int], b: list[int]) -> int:
    return common_prefix_length(a[::-1], b[::-1])


@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_a_prompt_cut_to_max_prompt_length_keeps_the_templates_framing(mistral_folder, name):
    """data.max_prompt_length cuts text from the left of the prompt's content, never its framing: the cut prompt
    starts with the tokens before the first message's text (BOS, the first header) and ends with those after the
    last one (the assistant header), fits the cap, and is still a token prefix of prompt + reply."""
    tok = mistral_tokenizer(mistral_folder, name)
    cap = 48
    for prompt in real_prompts():
        prompt = [*prompt[:-1], {**prompt[-1], "content": prompt[-1]["content"] * 8}]
        whole = ids(tok, prompt, generation=True)
        assert len(whole) > cap
        framing = ids(tok, [{**m, "content": ""} for m in prompt], generation=True)
        head, tail = common_prefix_length(framing, whole), _common_suffix(framing, whole)
        e = encode_pair(tok, prompt, "Yes. It is 5.", "No idea\n, sorry!", "chat", max_prompt_length=cap)
        assert e.fits and e.prompt_cut and e.lost is None and cap - 8 <= len(e.prompt_ids) <= cap
        assert e.prompt_ids[:head] == whole[:head] and e.prompt_ids[-tail:] == whole[-tail:]
        assert whole[0] != tok.bos_token_id or e.prompt_ids[0] == tok.bos_token_id
