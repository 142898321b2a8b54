"""ReFT positions on general prompts: `reft.positions.first_from: content` starts the first group at the user's
content, after a BOS token or a chat template's fixed header, in training, scoring and generation batches."""

from __future__ import annotations


import pytest

from heft.data.rows import parse_general

from heft.data.tokens import Encoded, Encoder, prompt_batch, train_batch


def test_batches_start_the_positions_at_the_content():
    rows = [Encoded([1, 2, 3, 4, 5], ([6], [7, 8]), 1, False, content_start=2),
            Encoded([9, 10, 11], ([12], [13]), 0, False)]
    b = train_batch(rows, pad_id=0)
    width = b["input_ids"].shape[1]  # 5 + 2 for the longest
    assert b["prompt_start"].tolist() == [width - 2 - 5 + 2, width - 1 - 3]
    assert b["prompt_len"].tolist() == [3, 3]
    start, length = b["prompt_start"][0].item(), b["prompt_len"][0].item()
    assert b["input_ids"][0, start:start + length].tolist() == [3, 4, 5]  # the content, not the 2 header tokens
    p = prompt_batch([[1, 2, 3, 4, 5], [9, 10, 11]], pad_id=0, content_start=[2, 0])
    assert p["prompt_start"].tolist() == [2, 2] and p["prompt_len"].tolist() == [3, 3]
    assert p["input_ids"][0, 2:5].tolist() == [3, 4, 5]


class _Tok:
    """A stand-in tokenizer: BOS (id 1) then one id per word."""

    all_special_ids = [0, 1]
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + len(w) for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_content_start_skips_a_bos_token_only_when_asked():
    ex = parse_general({"question": "is it blue", "choices": ["yes", "no"], "label": 0}, "f.jsonl:1", "multiple_choice", "local")
    assert Encoder(_Tok(), "passage", 64).encode(ex).content_start == 0
    enc = Encoder(_Tok(), "passage", 64, first_from="content").encode(ex)
    assert enc.prompt[0] == 1 and enc.content_start == 1


@pytest.mark.slow
def test_chat_template_positions_land_on_the_first_content_token():
    """SmolLM2's chat template puts a system message and a user header before the content: with first_from: content
    the first ReFT group starts at the content's first token; the prompt ids are the template's own, identical for
    training and evaluation."""
    from transformers import AutoTokenizer

    from heft.methods.model import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    row = {"messages": [{"role": "user", "content": "Is the sky blue?"}, {"role": "assistant", "content": "yes"}]}
    ex = parse_general(row, "chat.jsonl:1", "chat", "local")
    plain, content = Encoder(tok, "passage", 256).encode(ex), Encoder(tok, "passage", 256, "content").encode(ex)
    assert plain.prompt == content.prompt == list(tok.apply_chat_template(
        [{"role": "user", "content": "Is the sky blue?"}], add_generation_prompt=True, tokenize=True, return_dict=False))
    assert plain.content_start == 0 < content.content_start
    assert tok.decode(content.prompt[content.content_start:]).startswith("Is the sky blue?")
    assert not tok.decode(content.prompt[content.content_start - 1:]).startswith("Is")
    assert tok.decode(content.answers[0]).startswith("yes")
