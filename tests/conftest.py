"""Shared fixtures: a tiny random Llama with a word-level tokenizer, and hand-written BoolQ rows.

Nothing here downloads: the tokenizer is built with the `tokenizers` library from the fixture
text, and the model from a LlamaConfig with a fixed seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

FACTS = [
    ("The sky over the desert is blue and clear most of the year.", "is the sky over the desert blue", True),
    ("Cats are small animals that often sleep during the day.", "do cats sleep during the day", True),
    ("The river freezes in winter and the boats stay in the harbour.", "do the boats sail in winter", False),
    ("Paris is the capital of France and lies on the Seine.", "is paris the capital of france", True),
    ("Penguins are birds that cannot fly but swim very well.", "can penguins fly", False),
    ("The old bridge was closed after the storm damaged it.", "is the old bridge open", False),
    ("Water boils at one hundred degrees at sea level.", "does water boil at one hundred degrees", True),
    ("The museum opens on Monday and closes on Sunday.", "is the museum open on sunday", False),
    ("Bees make honey from the nectar of flowers.", "do bees make honey", True),
    ("The train to the north leaves every hour from the station.", "does the train leave every hour", True),
    ("Snakes have no legs and move by bending their bodies.", "do snakes have legs", False),
    ("The moon has no air, so sound cannot travel there.", "can sound travel on the moon", False),
]


def boolq_rows(n: int, offset: int = 0, google: bool = False) -> list[dict]:
    """`n` rows cycling through FACTS, with a row counter to make passages differ in length."""
    rows = []
    for i in range(n):
        passage, question, answer = FACTS[(i + offset) % len(FACTS)]
        passage = passage + " It is noted here." * ((i + offset) % 4)
        if google:
            rows.append({"question": question, "passage": passage, "answer": answer})
        else:
            rows.append({"question": question, "passage": passage, "label": answer, "idx": i})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>", "<pad>", "<s>", "</s>", "Question", "Answer", ":", "?", ".", ",", "\n", "yes", "no", "true", "false"}
    for p, q, _ in FACTS:
        words.update(p.replace(".", " . ").replace(",", " , ").split())
        words.update(q.split())
    words.update("It is noted here Below an instruction that describes a task Write response appropriately completes the request "
                 "### Instruction Please answer following question with or false true format Response correct".split())
    vocab = {w: i for i, w in enumerate(sorted(words, key=lambda w: (w not in ("<unk>", "<pad>", "<s>", "</s>"), w)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def build_tiny_llama(folder: Path) -> Path:
    """Save the tests' tiny Llama (4 layers, 64 wide, seed 0) and its word-level tokenizer in `folder` (also used by
    scripts/same_outputs.py and scripts/kill_trials.py, so their runs see the same model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _build_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-layer, 64-wide Llama with a word-level tokenizer, saved as a Hugging Face folder."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def boolq_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("boolq")
    return (write_jsonl(folder / "train.jsonl", boolq_rows(48)),
            write_jsonl(folder / "validation.jsonl", boolq_rows(20, offset=5, google=True)))


def tiny_config(model_dir: Path, files: tuple[Path, Path], stages: list[dict], **sections) -> dict:
    """Plain-data RunConfig for the tiny model and fixture data (pass sections to override)."""
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"source": "local", "train_path": str(files[0]), "eval_path": str(files[1]), "max_length": 64,
                 "dev_size": 8},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "reft": {"rank": 2, "layers": "all", "positions": {"first": 2, "last": 2}},
        "eval": {"batch_size": 8},
        "precision": "fp32",
        "log_every": 1,
        "stages": stages,
    }
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread (a module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`): the tiny model's ops are too small to share, and with more threads than free
    cores each op can stall for a second waiting for its threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny(tiny_model_dir):
    """(fresh frozen fp32 model in eval mode, tokenizer) from the fixture folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


# ----------------------------------------------------------------------------- finished runs the serving tests load
# HEFT (LoRA merged, then ReFT), LoRA alone, and a ReFT stage that edits only first positions. The ReFT stages start
# from random interventions (`reft.init: random`) so the edits are large after a few steps: a test that compares
# against the model without ReFT can then fail. Each run trains one epoch on 8 rows.


def _train_serve_run(tiny_model_dir: Path, tmp_path_factory, name: str, stages: list[dict], positions: dict) -> Path:
    """Train `stages` on 8 fixture rows (4 evaluation rows, no dev split) into a fresh run folder."""
    root = tmp_path_factory.mktemp(name)
    files = (write_jsonl(root / "train.jsonl", boolq_rows(8)),
             write_jsonl(root / "eval.jsonl", boolq_rows(4, offset=3, google=True)))
    from heft import train

    cfg = tiny_config(tiny_model_dir, files, stages, data={"dev_size": 0},
                      reft={"rank": 2, "layers": "all", "positions": positions, "init": "random"},
                      lora={"merge": True}, eval={"batch_size": 4})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the `one_thread` fixture: the tiny model's ops stall when threads outnumber free cores
    try:
        return train(cfg, root / "run")
    finally:
        torch.set_num_threads(threads)


_LORA = {"method": "lora", "epochs": 1, "batch_size": 4}
_REFT = {"method": "reft", "epochs": 1, "batch_size": 4}


@pytest.fixture(scope="session")
def heft_run(tiny_model_dir, tmp_path_factory) -> Path:
    """LoRA (merged) then ReFT on the first 3 and last 3 prompt positions."""
    return _train_serve_run(tiny_model_dir, tmp_path_factory, "serve-heft", [_LORA, _REFT], {"first": 3, "last": 3})


@pytest.fixture(scope="session")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA stage only (merged into the weights): no ReFT hooks."""
    return _train_serve_run(tiny_model_dir, tmp_path_factory, "serve-lora", [_LORA], {"first": 3, "last": 3})


@pytest.fixture(scope="session")
def first_only_run(tiny_model_dir, tmp_path_factory) -> Path:
    """LoRA (merged) then ReFT on the first 3 prompt positions only (`last: 0`)."""
    return _train_serve_run(tiny_model_dir, tmp_path_factory, "serve-first", [_LORA, _REFT], {"first": 3, "last": 0})
