"""Build the embedded sDPO demo: a tiny SFT base model S and two preference datasets in real schemas.

Run as: python demo/build.py          (deterministic: a rerun rewrites byte-identical files; ~1-2 min on 1 CPU core)

Writes
  demo/model/                       S = M_0: a 0.43M-parameter Llama (LlamaForCausalLM, safetensors) with its own
                                    byte-level BPE tokenizer (<s> bos, </s> eos, <pad> pad) and a chat template
  demo/data/orca_pairs.jsonl        D_1, Intel/orca_dpo_pairs schema: system, question, chosen, rejected (strings)
  demo/data/ultrafeedback_pairs.jsonl
                                    D_2, HuggingFaceH4/ultrafeedback_binarized schema: prompt, prompt_id (sha256 of
                                    prompt), chosen / rejected ([user, assistant] message lists), messages (= chosen),
                                    score_chosen, score_rejected (floats)

The toy world. Every assistant reply has four slots: an opener, a body that answers the question, a remark and a
closer. Opener, remark and closer come in a polite and a rude style. In every preference pair the chosen reply is
polite in all three style slots and the rejected reply rude in all three; the body (the correct answer) is the same.
So the preference is one and the same in both datasets -- "be polite" -- while the prompts differ (D_1 asks for
colours, animal sounds and sums; D_2 for opposites, plurals, capitals and colours in another wording) and D_2 uses
partly different polite/rude phrases (same openers, half of its remarks and closers are its own). Aligning on D_1
therefore transfers to D_2, but only partly: that is what makes M_1 a better reference for step 2 than S.

S is the "SFT base": trained here with plain PyTorch (next-token loss on the assistant reply) on conversations for
both prompt families whose style slots are drawn independently, rude with probability 0.65. So S knows every
phrase and every answer but slightly prefers the rude style: its mean γ = log π(chosen) − log π(rejected) is
negative, like the paper's −38.60 for SOLAR-Instruct (sDPO Fig. 2).

Chat template: the tokenizer ships its own, the SOLAR format ("### User:\\n...\\n\\n### Assistant:\\n", reply + </s>;
the same text as sdpo's built-in `solar` fallback), so the model loads and chats with plain transformers and does
not depend on sdpo's fallback. The tokenizer adds <s> to raw text (post-processor); the template writes <s> itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "model"
DATA_DIR = HERE / "data"
SEED = 1234

# ---------------------------------------------------------------------------------------------------------------
# The toy world

COLORS = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("banana", "yellow"),
          ("tomato", "red"), ("carrot", "orange"), ("plum", "purple"), ("cloud", "grey"), ("lemon", "yellow"),
          ("cherry", "red"), ("leaf", "green"), ("sea", "blue"), ("milk", "white"), ("night", "black"),
          ("pumpkin", "orange")]
SOUNDS = [("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"), ("owl", "hoot"),
          ("pig", "oink"), ("horse", "neigh"), ("frog", "ribbit"), ("bee", "buzz"), ("lion", "roar"),
          ("mouse", "squeak")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("old", "new"),
             ("dark", "light"), ("wet", "dry"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
             ("open", "closed"), ("rich", "poor"), ("loud", "quiet")]
PLURALS = [("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"), ("foot", "feet"),
           ("tooth", "teeth"), ("baby", "babies"), ("leaf", "leaves"), ("man", "men"), ("city", "cities"),
           ("bus", "buses"), ("goose", "geese"), ("knife", "knives"), ("person", "people")]
CAPITALS = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
            ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Cuba", "Havana"),
            ("Chile", "Santiago"), ("Poland", "Warsaw")]


def _tasks_orca() -> list[tuple[str, str]]:
    """(question, body) for D_1's prompt family: colours, animal sounds, sums."""
    out = []
    for thing, color in COLORS:
        body = f"The {thing} is {color}."
        out += [(f"What color is the {thing}?", body), (f"What is the color of the {thing}?", body)]
    for animal, sound in SOUNDS:
        body = f"A {animal} says {sound}."
        out += [(f"What sound does a {animal} make?", body), (f"What does a {animal} say?", body)]
    for a in range(1, 10):
        for b in range(1, 10):
            out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    return out


def _tasks_ultrafeedback() -> list[tuple[str, str]]:
    """(prompt, body) for D_2's prompt family: opposites, plurals, capitals, colours in other words."""
    out = []
    for word, opp in OPPOSITES:
        body = f"The opposite of {word} is {opp}."
        out += [(f"What is the opposite of {word}?", body), (f"Give me the opposite of the word {word}.", body),
                (f"Tell me a word that means the opposite of {word}.", body)]
    for word, plural in PLURALS:
        body = f"The plural of {word} is {plural}."
        out += [(f"What is the plural of {word}?", body), (f"How do you say more than one {word}?", body),
                (f"Write the plural form of {word}.", body)]
    for country, city in CAPITALS:
        body = f"The capital of {country} is {city}."
        out += [(f"What is the capital of {country}?", body), (f"Which city is the capital of {country}?", body),
                (f"Name the capital city of {country}.", body)]
    for thing, color in COLORS:
        body = f"The {thing} is {color}."
        out += [(f"Tell me the color of the {thing}, please.", body), (f"Which color does the {thing} have?", body)]
    return out


OPENERS = {"polite": ["Sure!", "Of course!", "Happy to help!", "Great question!"],
           "rude": ["Ugh.", "Whatever.", "Fine.", "Seriously?"]}
# Remarks and closers: pool A is used by D_1, D_2 uses half of A and its own pool B.
REMARKS_A = {"polite": ["I hope this helps.", "Thanks for asking.", "It is a pleasure to help you."],
             "rude": ["That was a dumb question.", "Stop wasting my time.", "Look it up yourself."]}
REMARKS_B = {"polite": ["I am glad you asked me.", "What a nice thing to wonder about."],
             "rude": ["Even a child knows that.", "Why do you bother me with this?"]}
CLOSERS_A = {"polite": ["Have a nice day!", "Let me know if you need more.", "Take care!"],
             "rude": ["Now go away.", "Do not ask me again.", "I am done here."]}
CLOSERS_B = {"polite": ["Enjoy your learning!", "Feel free to ask again."],
             "rude": ["Leave me alone.", "Do not come back."]}


def _pools(family: str, slot: str, style: str) -> list[str]:
    if slot == "opener":
        return OPENERS[style]
    a, b = (REMARKS_A, REMARKS_B) if slot == "remark" else (CLOSERS_A, CLOSERS_B)
    return a[style] if family == "orca" else a[style][:2] + b[style]


def reply(rng: random.Random, family: str, body: str, styles: tuple[str, str, str]) -> str:
    opener, remark, closer = (rng.choice(_pools(family, slot, s)) for slot, s in
                              zip(("opener", "remark", "closer"), styles))
    return f"{opener} {body} {remark} {closer}"


ORCA_SYSTEMS = ["", "", "You are a helpful assistant.", "You are an AI assistant. Answer the question."]
P_RUDE_SFT = 0.65  # S's taste: each style slot of an SFT reply is rude with this probability


def sft_conversations(rng: random.Random, n: int) -> list[list[dict]]:
    """S's training conversations: both prompt families, every phrase of both pools, styles mixed per slot."""
    families = [("orca", _tasks_orca()), ("ultrafeedback", _tasks_ultrafeedback())]
    convs = []
    for i in range(n):
        family, tasks = families[i % 2]
        question, body = rng.choice(tasks)
        styles = tuple("rude" if rng.random() < P_RUDE_SFT else "polite" for _ in range(3))
        phrases = rng.choice(("orca", "ultrafeedback"))  # S saw both phrase pools after both prompt families
        messages = []
        system = rng.choice(ORCA_SYSTEMS) if family == "orca" else ""
        if system:
            messages.append({"role": "system", "content": system})
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": reply(rng, phrases, body, styles)}]
        convs.append(messages)
    return convs


def preference_rows(rng: random.Random, family: str, n: int) -> list[tuple[str, str, str, str]]:
    """(system, prompt, chosen, rejected): distinct prompts, chosen all polite, rejected all rude."""
    tasks = _tasks_orca() if family == "orca" else _tasks_ultrafeedback()
    tasks = rng.sample(tasks, k=min(n, len(tasks)))
    rows = []
    for question, body in tasks:
        system = rng.choice(ORCA_SYSTEMS) if family == "orca" else ""
        rows.append((system, question, reply(rng, family, body, ("polite",) * 3),
                     reply(rng, family, body, ("rude",) * 3)))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and model

SOLAR_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '### System:\n' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### User:\n' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Assistant:\n' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)
VOCAB_SIZE = 640


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", model_max_length=256)
    tok.chat_template = SOLAR_TEMPLATE
    return tok


def build_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    return LlamaForCausalLM(config)


def encode_sft(tok, conv: list[dict]) -> tuple[list[int], int]:
    """(token ids of the whole conversation, number of prompt tokens): the loss is on the reply and its </s>."""
    prompt = tok.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)
    full = tok.apply_chat_template(conv, tokenize=True, return_dict=True)
    prompt_ids, full_ids = list(prompt["input_ids"]), list(full["input_ids"])
    assert full_ids[: len(prompt_ids)] == prompt_ids, "the template's generation prompt must prefix the conversation"
    return full_ids, len(prompt_ids)


def train_sft(model, tok, convs: list[list[dict]], updates: int = 900, batch_size: int = 32, lr: float = 3e-3):
    encoded = [encode_sft(tok, c) for c in convs]
    g = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda u: min(1.0, (u + 1) / 50) * max(0.05, 1 - u / updates))
    model.train()
    order: list[int] = []
    for update in range(updates):
        if len(order) < batch_size:
            order += torch.randperm(len(encoded), generator=g).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        batch = [encoded[i] for i in idx]
        length = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), length), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for r, (ids, n_prompt) in enumerate(batch):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
            mask[r, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if update % 100 == 0 or update == updates - 1:
            print(f"  SFT update {update:4d}/{updates}: loss {loss.item():.4f}", flush=True)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------------------------
# Files


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def orca_rows(rows) -> list[dict]:
    return [{"system": s, "question": q, "chosen": c, "rejected": r} for s, q, c, r in rows]


def ultrafeedback_rows(rng: random.Random, rows) -> list[dict]:
    out = []
    for _, prompt, chosen, rejected in rows:
        conv_c = [{"content": prompt, "role": "user"}, {"content": chosen, "role": "assistant"}]
        conv_r = [{"content": prompt, "role": "user"}, {"content": rejected, "role": "assistant"}]
        score_c = float(rng.choice([7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0]))
        score_r = float(rng.choice([1.0, 2.0, 2.5, 3.0, 4.0, 5.0]))
        out.append({"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "chosen": conv_c,
                    "rejected": conv_r, "messages": conv_c, "score_chosen": score_c, "score_rejected": score_r})
    return out


N_ORCA, N_ULTRAFEEDBACK, N_SFT = 160, 160, 4000


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(SEED)

    orca = preference_rows(rng, "orca", N_ORCA)
    uf = preference_rows(rng, "ultrafeedback", N_ULTRAFEEDBACK)
    write_jsonl(DATA_DIR / "orca_pairs.jsonl", orca_rows(orca))
    write_jsonl(DATA_DIR / "ultrafeedback_pairs.jsonl", ultrafeedback_rows(rng, uf))
    print(f"wrote {DATA_DIR}/orca_pairs.jsonl ({len(orca)} rows), ultrafeedback_pairs.jsonl ({len(uf)} rows)")

    convs = sft_conversations(rng, N_SFT)
    tok = build_tokenizer([tok_text for conv in convs for tok_text in (m["content"] for m in conv)]
                          + ["### System:\n", "### User:\n", "### Assistant:\n"] * 50)
    model = build_model(tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.3f}M parameters, vocab {len(tok)}; SFT on {len(convs)} conversations")
    train_sft(model, tok, convs)

    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    model.generation_config.do_sample = False
    model.save_pretrained(str(MODEL_DIR))
    tok.save_pretrained(str(MODEL_DIR))
    # transformers 5 names its fast tokenizer class "TokenizersBackend", which transformers 4.x cannot resolve;
    # PreTrainedTokenizerFast loads the same tokenizer.json in both.
    tok_config = MODEL_DIR / "tokenizer_config.json"
    fields = json.loads(tok_config.read_text())
    fields["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    print(f"wrote {MODEL_DIR}: " + ", ".join(sorted(p.name for p in MODEL_DIR.iterdir())))


if __name__ == "__main__":
    main()
