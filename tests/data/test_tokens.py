"""ReFT positions on general prompts: `reft.positions.first_from: content` starts the first group at the user's
content, after a BOS token or a chat template's fixed header, in training, scoring and generation batches; a
request after training (`PromptFormat`, `encode_request`) gets the prompt a run's own rows get."""

from __future__ import annotations


import pytest
from helpers import chat_tokenizer

from heft.data.rows import Example, parse_general
from heft.data.tokens import Encoded, Encoder, PromptFormat, encode_request, prompt_batch, train_batch
from heft.errors import DataError


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


# ----------------------------------------------------------------------------- chat prompts and requests

SYSTEM = "Please answer the question with yes or no ."


def _chat_row(user: str, answer: str = "yes", system: str | None = SYSTEM):
    turns = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return parse_general({"messages": turns}, "chat.jsonl:1", "chat", "local")


def test_first_from_content_finds_the_user_turn_by_its_place_in_the_template(tiny_model_dir):
    """The user's message `yes` also occurs in the system message: the first group starts at the user turn's
    content all the same (searching for the text would start it inside the system turn)."""
    tok = chat_tokenizer(tiny_model_dir)
    for user in ("yes", "do cats sleep during the day", "Question"):  # `Question` is also the template's user header
        e = Encoder(tok, "passage", 64, first_from="content").encode(_chat_row(user))
        words = tok.convert_ids_to_tokens(e.prompt)
        assert words[:e.content_start] == ["Instruction", ":", *SYSTEM.split(), "\n", "Question", ":"]
        assert words[e.content_start:] == [*user.split(), "\n", "Answer", ":", "\n"]
    tok.chat_template = tok.chat_template.replace("Question : {{ m.content }}", "Question : {{ m.content[:-1] }}")
    with pytest.raises(DataError, match=r"^chat.jsonl:1: reft.positions.first_from: content cannot find the user's "
                       r"content in this chat template's tokens; use first_from: prompt$"):
        Encoder(tok, "passage", 64, first_from="content").encode(_chat_row("do cats sleep"))  # the template cuts it


def test_a_chat_request_is_the_runs_own_prompt_with_the_templates_trailing_newline(tiny_model_dir):
    """A request's prompt ids are the template's own (its generation prompt's newline stays in the prompt), with the
    system message the run's rows share and the same content start as the run's encoding of that row."""
    tok = chat_tokenizer(tiny_model_dir)
    enc = Encoder(tok, "passage", 64, first_from="content")
    row = _chat_row("do cats sleep during the day")
    fmt = PromptFormat.of_rows("chat", [row, _chat_row("can penguins fly", "no")])
    assert fmt == PromptFormat("chat", SYSTEM)
    expected = enc.encode(row)  # how the run trains on and evaluates this row
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "do cats sleep during the day"}]
    template = list(tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False))
    for request in ("do cats sleep during the day", [{"role": "user", "content": "do cats sleep during the day"}],
                    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "do cats sleep during the day"}]):
        got = encode_request(enc, fmt, request)
        assert got.prompt == expected.prompt == template and tok.convert_ids_to_tokens(got.prompt[-1]) == "\n"
        assert got.content_start == expected.content_start == 14 and got.answers == ([],)
    scored = encode_request(enc, fmt, "do cats sleep during the day", ["yes", "no"])
    assert scored.prompt == expected.prompt and scored.answers[0] == expected.answers[0]  # the assistant's whole turn
    assert [tok.convert_ids_to_tokens(a) for a in scored.answers] == [["yes", "</s>", "\n"], ["no", "</s>", "\n"]]
    plain = Encoder(tok, "passage", 64).encode(Example("", "", 0, 0, context="x", target="", gold="", delimiter=""))
    assert encode_request(Encoder(tok, "passage", 64), PromptFormat("completion"), "x") == plain


def test_requests_name_what_is_wrong_with_them(tiny_model_dir):
    mixed = PromptFormat.of_rows("chat", [_chat_row("can penguins fly"), _chat_row("can penguins fly", system=None)])
    assert mixed == PromptFormat("chat", None, mixed_system=True)
    with pytest.raises(DataError, match=r"^command line: this run's chat rows open with different system messages, so "
                       r"none is implied; give one \(a system turn first, or heft predict --system TEXT\)$"):
        mixed.row("can penguins fly", where="command line")
    assert mixed.with_system("").row("can penguins fly").messages == (("user", "can penguins fly"),)
    assert mixed.with_system("Be brief").row("x").messages == (("system", "Be brief"), ("user", "x"))
    assert PromptFormat.of_rows("chat", [_chat_row("x", system=None)]) == PromptFormat("chat")
    chat = PromptFormat("chat", SYSTEM)
    cases = {
        "heft.generate: messages[0]: chat messages, but this run was trained on plain prompts (data.format: "
        "completion); give the prompt as text": (PromptFormat("completion"), [{"role": "user", "content": "x"}]),
        "heft.generate: messages[0]: the last message is the assistant's; end the messages with the turn it answers "
        "(heft adds the template's generation prompt)": (chat, [{"role": "user", "content": "x"},
                                                               {"role": "assistant", "content": "y"}]),
        "heft.generate: messages[0]: the messages hold no user turn; add the user's message":
            (chat, [{"role": "system", "content": "x"}]),
        "heft.generate: messages[0]: messages[1] must be {role: text, content: text}, got {'role': 'user'}":
            (chat, [{"role": "system", "content": "x"}, {"role": "user"}]),
        "heft.generate: messages[0]: the prompt must be non-empty text, got ' '": (chat, " "),
    }
    for message, (fmt, request) in cases.items():
        with pytest.raises(DataError) as e:
            fmt.row(request, where="heft.generate: messages[0]")
        assert str(e.value) == message
    assert PromptFormat.from_json(chat.to_json()) == chat
