"""`model.compile: true`: every decoder layer compiled in place (dynamic shapes), and a run trains and scores the
same as eager within rounding (HEFT: LoRA, merged, then ReFT through its hooks)."""

from __future__ import annotations

import json

import torch

from conftest import tiny_config
from heft.config.load import from_dict


def test_compiled_run_equals_eager(tiny_model_dir, boolq_files, tmp_path):
    from heft.run.pipeline import train_run

    stages = [{"method": "lora", "epochs": 1, "lr": 1e-2, "batch_size": 8},
              {"method": "reft", "epochs": 1, "lr": 1e-2, "batch_size": 8}]
    runs = {}
    for flag in (False, True):
        cfg = from_dict(tiny_config(tiny_model_dir, boolq_files, stages, model={"compile": flag}, seed=1))
        out = tmp_path / str(flag)
        train_run(cfg, out)
        logs = [json.loads(x) for s in ("00-lora", "01-reft")
                for x in (out / "stages" / s / "train_log.jsonl").read_text().splitlines()]
        preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        runs[flag] = (torch.tensor([r["loss"] for r in logs]), torch.tensor([p["p_yes"] for p in preds]))
    assert torch.allclose(runs[True][0], runs[False][0], atol=1e-4), runs
    assert torch.allclose(runs[True][1], runs[False][1], atol=1e-4)


def test_compile_layers_compiles_every_decoder_layer(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from heft.methods.model import compile_layers, decoder_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    compile_layers(model)
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
