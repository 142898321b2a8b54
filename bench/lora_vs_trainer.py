"""Benchmark: heft's LoRA stage vs the usual recipe, PEFT `get_peft_model` + Hugging Face `Trainer`
(issue #5, item 2).

Same model, same training rows, same LoRA config (r 8, alpha 16, dropout 0.05, all linear layers),
batch 8, lr 3e-4 constant after 10 warmup steps, 1 epoch, bf16 autocast where the CPU has it, loss
on the answer tokens only in both. The Trainer recipe right-pads and computes the full vocabulary
logits at every position (what a causal-LM collator does); heft computes logits only where the
loss needs them and buckets rows by length. Runs alternate (heft, Trainer, heft, Trainer, ...) to
cancel machine drift; reported: median training seconds, tokens/s, ratio, and the mean loss over
the last quarter of steps of each (the curves should agree within noise).

    python bench/lora_vs_trainer.py [--rows 96] [--rounds 2] [--out bench/results/lora_vs_trainer.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def heft_run(rows: int, tmp: Path) -> dict:
    from heft.config.load import from_dict
    from heft.run.pipeline import train_run

    cfg = from_dict({"data": {"train_size": rows, "eval_size": 8}, "lora": {"target_modules": "all-linear"},
                     "stages": [{"method": "lora", "epochs": 1, "lr": 3e-4, "warmup_steps": 10, "batch_size": 8}],
                     "log_every": 1})
    m = train_run(cfg, tmp / f"heft-{time.time_ns()}")
    stage = m["stages"][0]
    log_path = next(Path(tmp).glob("heft-*/stages/00-lora/train_log.jsonl"))
    log = [json.loads(x) for x in log_path.read_text().splitlines()]
    return {"seconds": stage["train_seconds"], "tokens": stage["tokens"], "losses": [r["loss"] for r in log]}


def trainer_run(rows: int, tmp: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from heft.config.schema import DataConfig
    from heft.data.rows import load_splits
    from heft.data.tokens import Encoder
    from heft.methods.model import resolve_model_path
    from heft.training.runtime import use_bf16

    path = resolve_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    enc = Encoder(tok, "passage", 256)
    data = []
    for ex in load_splits(DataConfig(train_size=rows, eval_size=8)).train:
        e = enc.encode(ex)
        answer = e.answers[e.label]
        data.append({"input_ids": e.prompt + answer, "labels": [-100] * len(e.prompt) + answer})

    def collate(items):
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), tok.pad_token_id)
        labels = torch.full((len(items), width), -100)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    args = TrainingArguments(output_dir=str(tmp / "trainer"), per_device_train_batch_size=8, learning_rate=3e-4,
                             num_train_epochs=1, lr_scheduler_type="constant_with_warmup", warmup_steps=10,
                             logging_steps=1, bf16=use_bf16("auto", torch.device("cpu")), use_cpu=True,
                             report_to="none", save_strategy="no", seed=0, remove_unused_columns=False,
                             disable_tqdm=True, max_grad_norm=1.0, weight_decay=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "tokens": sum(len(x["input_ids"]) for x in data), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench/results/lora_vs_trainer.json")
    ap.add_argument("--one", choices=["heft", "peft+trainer"], help=argparse.SUPPRESS)  # internal: one run, JSON out
    args = ap.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as t:
            result = heft_run(args.rows, Path(t)) if args.one == "heft" else trainer_run(args.rows, Path(t))
        print("RESULT " + json.dumps(result))
        return
    runs = {"heft": [], "peft+trainer": []}
    for r in range(args.rounds):
        for name in (("heft", "peft+trainer") if r % 2 == 0 else ("peft+trainer", "heft")):
            # Each run in a fresh process: accelerate's state is process-wide and the Trainer sets its own.
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--rows", str(args.rows)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            runs[name].append(json.loads(line[len("RESULT "):]))
    summary = {}
    for name, rs in runs.items():
        sec = statistics.median(x["seconds"] for x in rs)
        tail = [statistics.mean(x["losses"][-max(1, len(x["losses"]) // 4):]) for x in rs]
        summary[name] = {"median_seconds": round(sec, 2), "tokens_per_s": round(rs[0]["tokens"] / sec, 1),
                         "last_quarter_loss": [round(v, 4) for v in tail], "steps": len(rs[0]["losses"])}
    ratio = summary["peft+trainer"]["median_seconds"] / summary["heft"]["median_seconds"]
    print(f"\nLoRA stage, {args.rows} BoolQ rows, 1 epoch, batch 8, {args.rounds} alternating rounds")
    print(f"{'recipe':<14}{'median s':>10}{'tokens/s':>10}{'steps':>7}  last-quarter loss per run")
    for name, s in summary.items():
        print(f"{name:<14}{s['median_seconds']:>10.1f}{s['tokens_per_s']:>10.0f}{s['steps']:>7}  {s['last_quarter_loss']}")
    print(f"speed-up of heft: {ratio:.2f}x (goal >= 1.5x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "lora_stage_vs_peft_trainer", "rows": args.rows, "rounds": args.rounds,
                               "summary": summary, "speedup_heft": ratio, "goal_speedup_at_least": 1.5,
                               "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
