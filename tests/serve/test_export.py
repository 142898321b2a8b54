"""`heft export`: the LoRA stages merged into a folder transformers loads alone, the ReFT files beside it, and
`heft.load` of that folder giving the run's own predictions; the refusals, each in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import boolq_rows, tiny_config, write_jsonl

import heft
from heft.cli import main
from heft.errors import CheckpointError, ConfigError
from heft.serve.export import ExportFolder, export_run

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The moon has no air .\nQuestion: can sound travel on the moon ?\nAnswer:",
           "Bees make honey from the nectar of flowers .\nQuestion: do bees make honey ?\nAnswer:"]
CHOICES = [["yes", "no"], ["no", "yes"]]


@pytest.fixture(scope="module")
def exports(heft_run, lora_run, tmp_path_factory) -> dict[str, Path]:
    """The HEFT and LoRA-only runs exported (with the accuracies), once for the module."""
    root = tmp_path_factory.mktemp("exports")
    for name, run in (("heft", heft_run), ("lora", lora_run)):
        export_run(run, root / f"{name}-export")
    return {"heft": root / "heft-export", "lora": root / "lora-export"}


def _same_predictions(run: Path, out: Path, atol: float = 1e-5) -> None:
    """heft.load(out) scores and decodes PROMPTS as heft.load(run) does."""
    a, tok_a = heft.load(run)
    b, tok_b = heft.load(out)
    assert (a.reft is None) == (b.reft is None)
    sa, sb = heft.score(a, tok_a, PROMPTS, CHOICES), heft.score(b, tok_b, PROMPTS, CHOICES)
    for x, y in zip(sa, sb):
        assert x["pred"] == y["pred"] and x["lls"] == pytest.approx(y["lls"], abs=atol)
    assert heft.generate(a, tok_a, PROMPTS, max_new_tokens=6) == heft.generate(b, tok_b, PROMPTS, max_new_tokens=6)


def _train(root: Path, model_dir: Path, stages: list[dict], **sections) -> Path:
    files = (write_jsonl(root / "train.jsonl", boolq_rows(8)), write_jsonl(root / "eval.jsonl", boolq_rows(4, offset=3, google=True)))
    cfg = tiny_config(model_dir, files, stages, data={"dev_size": 0}, **sections)
    return heft.train(cfg, root / "run")


def test_the_folder_loads_with_transformers_alone_and_computes_the_merged_model(exports, heft_run):
    out = exports["heft"]
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md",
            "heft/config.yaml", "heft/meta.json", "heft/export.json", "heft/reft/reft_config.json",
            "heft/reft/reft.safetensors"} <= files
    assert not [f for f in files if "adapter" in f or f.endswith(".gguf") or f.startswith(".")]
    assert not list(out.parent.glob(f".{out.name}*"))  # the temporary folder was renamed, the lock released
    script = (f"import sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
              f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
              f"with torch.no_grad():\n    logits = m(**t([{PROMPTS[0]!r}], return_tensors='pt')).logits\n"
              f"assert not [k for k in sys.modules if k.split('.')[0] in ('heft', 'peft')]\n"
              f"assert m.config.use_cache and m.generation_config is not None\n"
              f"torch.save(logits, {str(out.parent / 'plain.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=600)
    plain = torch.load(out.parent / "plain.pt")
    model, tok = heft.load(heft_run)
    ids = tok([PROMPTS[0]], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain, model.reft.model(**ids).logits, atol=1e-5, rtol=1e-5)  # LoRA merged, no ReFT
        assert not torch.allclose(plain, model(**ids).logits, atol=1e-3)  # what heft adds: the ReFT edits


@pytest.mark.parametrize("name", ["heft", "lora"])
def test_heft_load_of_the_export_predicts_as_the_run(exports, heft_run, lora_run, name):
    _same_predictions({"heft": heft_run, "lora": lora_run}[name], exports[name])


def test_the_card_and_the_record_give_both_accuracies(exports, heft_run, lora_run):
    record = ExportFolder(exports["heft"]).read_record()
    run_metrics = json.loads((heft_run / "metrics.json").read_text())
    e = record.evaluation
    assert record.merged_stages == [0] and record.reft_stage == 1 and record.dtype == "float32"
    assert e["n"] == run_metrics["n"] and e["full"]["correct"] == run_metrics["correct"]  # the export is the run
    card = (exports["heft"] / "README.md").read_text()
    for words in ("transformers alone does not apply them", 'heft.load("heft-export")', "heft serve heft-export",
                  "with the LoRA stages merged, without ReFT", str(json.loads((heft_run / "meta.json").read_text())["base_model"]),
                  "stage 0: `lora`", "LoRA merged into these weights", "stage 1: `reft`",
                  f"plain transformers (LoRA merged, no ReFT): {100 * e['plain']['accuracy']:.1f}% ({e['plain']['correct']}/{e['n']})",
                  f"full run (heft): {100 * e['full']['accuracy']:.1f}%"):
        assert words in card, words
    cfg = (exports["heft"] / "heft" / "config.yaml").read_text()
    assert cfg.startswith("# written by heft export: the LoRA of stage 0 is merged") and str(exports["heft"]) in cfg
    lora_card = (exports["lora"] / "README.md").read_text()
    assert "computes the whole trained model" in lora_card and "no ReFT stage" in lora_card


def test_a_reft_only_run_exports_the_base_weights_untouched(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    run = _train(tmp_path, tiny_model_dir, [{"method": "reft", "epochs": 1, "batch_size": 4, "lr": 1e-2}],
                 reft={"init": "random"})
    export_run(run, tmp_path / "out", evaluate=False)
    base, exported = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert base.keys() == exported.keys() and all(torch.equal(base[k], exported[k]) for k in base)
    assert ExportFolder(tmp_path / "out").read_record().evaluation is None
    _same_predictions(run, tmp_path / "out")


def test_lora_kept_as_an_adapter_is_merged_on_export(tiny_model_dir, tmp_path):
    run = _train(tmp_path, tiny_model_dir, [{"method": "lora", "epochs": 1, "batch_size": 4, "lr": 1e-2},
                                            {"method": "reft", "epochs": 1, "batch_size": 4, "lr": 1e-2}],
                 lora={"merge": False}, reft={"init": "random"})
    export_run(run, tmp_path / "out", evaluate=False)
    assert not list((tmp_path / "out").glob("adapter*"))
    model, _ = heft.load(tmp_path / "out")
    assert type(model.reft.model).__name__ == "LlamaForCausalLM"  # no PEFT wrapper left
    _same_predictions(run, tmp_path / "out", atol=1e-4)  # merging rounds differently from the separate branch


def test_a_gguf_base_exports_as_safetensors(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from methods.test_model import _write_gguf

    monkeypatch.setenv("HEFT_CACHE", str(tmp_path / "cache"))
    _write_gguf(tmp_path / "tiny.gguf")
    rows = [{"question": f"Question: {q} ?\nAnswer:", "choices": c, "label": y}
            for q, c, y in [("cats sleep", ["yes", "no"], 0), ("fish fly", ["yes", "no"], 1)] * 4]
    files = (write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "eval.jsonl", rows[:2]))
    cfg = tiny_config(tmp_path / "tiny.gguf", files, [{"method": "lora", "epochs": 1, "batch_size": 4, "lr": 1e-2}],
                      data={"format": "multiple_choice", "dev_size": 0})
    run = heft.train(cfg, tmp_path / "run")
    export_run(run, tmp_path / "out", evaluate=False)
    assert (tmp_path / "out" / "model.safetensors").is_file() and not list((tmp_path / "out").rglob("*.gguf"))
    a, tok_a = heft.load(run)
    b, tok_b = heft.load(tmp_path / "out")
    texts = [r["question"] for r in rows[:2]]
    assert heft.score(a, tok_a, texts, [["yes", "no"]] * 2) == heft.score(b, tok_b, texts, [["yes", "no"]] * 2)


def test_the_command_prints_both_accuracies_and_replaces_only_an_earlier_export(heft_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(heft_run), str(out)]) == 0
    said = capsys.readouterr().out
    assert f"heft export: wrote {out} (LoRA stages merged: 0; ReFT of stage 1 in {out / 'heft' / 'reft'})" in said
    assert "plain transformers (LoRA merged, no ReFT): " in said and "full run (heft): " in said and "dropping ReFT" in said

    assert main(["export", str(heft_run), str(out), "--no-eval"]) == 2
    assert capsys.readouterr().err.strip() == (f"heft: error: OUT: {out} is not empty (it holds an earlier export); "
                                               "choose a new folder, or pass --overwrite to replace it")
    assert main(["export", str(heft_run), str(out), "--no-eval", "--overwrite"]) == 0
    assert ExportFolder(out).read_record().evaluation is None

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["export", str(heft_run), str(other), "--overwrite"]) == 2
    assert "holds files heft export did not write (no heft/export.json)" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_an_unfinished_run_and_a_failed_export_leave_nothing(heft_run, tmp_path, monkeypatch):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(heft_run, unfinished)
    (unfinished / "metrics.json").unlink()
    with pytest.raises(CheckpointError, match="the run is unfinished"):
        export_run(unfinished, tmp_path / "out")
    with pytest.raises(ConfigError, match="is inside the run folder"):
        export_run(heft_run, heft_run / "export")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("heft.serve.export._evaluate", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(heft_run, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unfinished"]  # no half folder, no temporary one, no lock


def test_the_export_refuses_weights_it_did_not_write(exports, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "moved"  # a moved copy loads from where it is now
    shutil.copytree(exports["heft"], out)
    heft.load(out)
    tensors = load_file(out / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 0.5
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="its model files differ from the ones heft export wrote \\(weights differ\\)"):
        heft.load(out)
    model, _ = heft.load(out, allow_other_base=True)
    assert model.reft is not None
