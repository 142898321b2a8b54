"""Helpers shared by the tests of scoring and of the speed paths: the tiny Llama's rows with choices, a naive
unbatched reference, seeded random adapters, other tiny architectures built from configs, a fake second process."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from conftest import FACTS
from heft.config.schema import LoraConfig, PositionsConfig, ReftConfig
from heft.data.tokens import Encoded
from heft.methods.lora import attach
from heft.methods.model import decoder_layers, hidden_size
from heft.methods.reft import ReftModel
from heft.training.runtime import Runtime

CPU = Runtime(torch.device("cpu"))

# choices of 1 to 4 tokens in the fixture tokenizer's vocabulary; rows take 2, 3 or 4 of them
CHOICES = ["yes", "no", "it is true", "the answer is false", "false", "cats sleep", "true ."]


def make_rows(tok: Any, n: int) -> tuple[list[Encoded], list[list[str]]]:
    """`n` rows with prompts of different lengths and 2, 3 or 4 choices of 1-4 tokens; also the choice texts."""
    rows, texts = [], []
    for i in range(n):
        passage, question, _ = FACTS[i % len(FACTS)]
        prompt = tok(f"{passage} {'It is noted here .' * (i % 3)} Question : {question} ? Answer :")["input_ids"]
        k = 2 + i % 3
        choice_texts = [CHOICES[(i + j) % len(CHOICES)] for j in range(k)]  # lm-eval's doc_to_choice strings
        answers = tuple(tok(" " + t, add_special_tokens=False)["input_ids"] for t in choice_texts)
        rows.append(Encoded(prompt, answers, i % k, False))
        texts.append(choice_texts)
    assert len({len(r.prompt) for r in rows}) > 2 and {len(r.answers) for r in rows} == {2, 3, 4}
    assert {len(a) for r in rows for a in r.answers} == {1, 2, 3, 4}
    return rows, texts


@torch.no_grad()
def naive(model: nn.Module, prompt: list[int], choice: list[int], edited: int | None = None) -> tuple[float, bool]:
    """(sum of log p(choice tokens | prompt), every choice token the argmax) from one unpadded full pass.

    ReFT edits the first `edited` tokens as the prompt (default: the prompt itself)."""
    ids = torch.tensor([prompt + choice])
    if isinstance(model, ReftModel):
        logits = model(ids, torch.tensor([0]), torch.tensor([len(prompt) if edited is None else edited])).logits[0]
    else:
        logits = model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1:-1]  # (len(choice), V)
    target = torch.tensor(choice)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def with_reft(model: nn.Module, first: int = 2, last: int = 2, first_from: str = "prompt") -> ReftModel:
    """LoReFT on every layer, seeded random weights scaled so the edits matter."""
    cfg = ReftConfig(rank=2, layers="all", positions=PositionsConfig(first, last, first_from=first_from), init="random")
    reft = ReftModel(model, cfg, decoder_layers(model), hidden_size(model))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(reft.interventions.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return reft.eval()


def random_lora(model: nn.Module, layers: tuple[int, ...] | str = "all", dropout: float = 0.0) -> nn.Module:
    """LoRA r 2 on `layers`, its B matrices seeded random (so the update and A's gradients are not zero)."""
    peft_model = attach(model, LoraConfig(r=2, alpha=4, dropout=dropout, layers=layers))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return peft_model


def with_lora(model: nn.Module) -> nn.Module:
    return random_lora(model).eval()


def mixed_rows(rows: list[Encoded], skip: int = 0) -> list[Encoded]:
    """The rows again, some with per-choice contexts (lm-eval's split can differ by choice: here the last context
    token is dropped for odd choices, so two contexts per row), some sharing one context, `skip` content tokens."""
    out = []
    for i, r in enumerate(rows):
        if i % 2:
            prompts = tuple(r.prompt[:-1] if j % 2 else r.prompt for j in range(len(r.answers)))
            out.append(Encoded(prompts[r.label], r.answers, r.label, False, prompts, content_start=skip))
        else:
            out.append(Encoded(r.prompt, r.answers, r.label, False, content_start=skip))
    out.append(Encoded(rows[0].prompt, rows[1].answers, 0, False, content_start=skip))  # rows 0 and last: one context
    return out


def tiny_arch(name: str, **extra: Any) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if name == "gpt2":  # absolute positions: the choice pass's position ids must continue the context's
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    config_cls, model_cls = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                             "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}[name]
    if name == "gemma3":
        extra = {"head_dim": 16, **extra}
    return model_cls(config_cls(**common, **extra)).eval()


def random_rows(n: int, seed: int = 0) -> list[Encoded]:
    """Rows of random ids (vocab 64, pad 0 unused): contexts of 3-12 tokens, 2-4 choices of 1-4 tokens."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [rng.randrange(1, 64) for _ in range(rng.randrange(3, 13))]
        answers = tuple([rng.randrange(1, 64) for _ in range(rng.randrange(1, 5))] for _ in range(rng.randrange(2, 5)))
        rows.append(Encoded(prompt, answers, i % len(answers), False))
    return mixed_rows(rows, skip=1)


class _Stop(Exception):
    pass


class FakeRuntime(Runtime):
    """Process `rank` of two on CPU; `gather_objects` hands over what the other process gave."""

    def __init__(self, rank: int, exchange: dict[int, list[Any]]):
        super().__init__(torch.device("cpu"), accelerator=SimpleNamespace(num_processes=2, process_index=rank))
        self.rank, self.exchange = rank, exchange

    def gather_objects(self, items: list[Any]) -> list[Any]:
        self.exchange[self.rank] = items
        if 1 - self.rank not in self.exchange:
            raise _Stop  # the first process to arrive: its share is recorded, the other one merges
        return self.exchange[0] + self.exchange[1]


# A chat template in the fixture tokenizer's words: system, user and assistant turns end in a newline, and the
# generation prompt ends in one too (the newline a raw-text path would move from the prompt into the answer).
CHAT_TEMPLATE = ("{% for m in messages %}"
                 "{% if m.role == 'system' %}Instruction : {{ m.content }}{{ '\\n' }}"
                 "{% elif m.role == 'user' %}Question : {{ m.content }}{{ '\\n' }}"
                 "{% else %}Answer :{{ '\\n' }}{{ m.content }}</s>{{ '\\n' }}{% endif %}"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}Answer :{{ '\\n' }}{% endif %}")


def chat_tokenizer(model_dir: Any) -> Any:
    """The fixture tokenizer with `CHAT_TEMPLATE`, splitting at spaces only so that a newline is a token of its
    own ("\\n" is in its vocabulary; the fixture's whitespace split drops it)."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Punctuation()])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chat_model_dir(model_dir: Any, folder: Any) -> Any:
    """A copy of the tiny model folder whose tokenizer is `chat_tokenizer` (same vocabulary, same weights)."""
    import shutil
    from pathlib import Path

    folder = Path(folder)
    shutil.copytree(model_dir, folder)
    chat_tokenizer(model_dir).save_pretrained(folder)
    return folder
