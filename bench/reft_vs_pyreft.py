"""Benchmark: heft's ReFT training step vs pyreft 0.1.0, and vs the physical floor (issue #5, item 1).

Three sides, each in its own process, on the same model, data and settings:

- `heft`: heft's `ReftModel` (LoReFT, hooks + one gather/scatter per layer), left-padded batch
  from `heft.data.tokens.train_batch`, logits only at the positions the loss needs (`logits_to_keep`),
  `heft.training.loop.answer_loss`; then gradient clipping and an AdamW step, as in `heft.training.loop`.
- `pyreft`: pyreft 0.1.0 (`pyreft.get_reft_model` + `LoreftIntervention` on `block_output`, one
  intervention per layer and position group, as pyreft's own LoReFT recipe builds it), run in its
  own virtual environment with transformers 4.45.1 (pyreft pins it). A manual loop that does what
  `pyreft.ReftTrainer.compute_loss` does each step (right-padded batch, `unit_locations` turned into
  lists with `.tolist()`, `labels` = -100 except the answer tokens, so the Hugging Face model computes
  the full-vocabulary logits at every position and the loss from them), then gradient clipping and
  an AdamW step. The Trainer itself is not used: its data loading and logging would be timed too.
- `floor`: the same frozen model, forward + backward only, with gradients flowing from the same loss
  down to the output of decoder layer 0 (the lowest intervened layer) and no further: that output is
  made a leaf that requires grad; the embeddings need no gradient. No interventions, no optimizer.

Model: SmolLM2-135M's shape (Llama, hidden 576, 30 layers, 9 heads, 3 kv heads, MLP 1536, vocab
49152, tied embeddings) with random weights filled from a fixed generator per parameter name, so
both environments hold bit-identical weights. Data: BoolQ training rows in heft's `passage` format,
tokenized once by heft (SmolLM2's tokenizer, truncated to --seq-len tokens) and written to a JSON
file that every side reads: the same batches in the same order. LoReFT rank 4, all layers,
positions first 5 + last 5 prompt tokens, separate interventions for the two groups. Every
intervention starts as an exact zero edit (W = R, b = 0), so the first step's loss must agree on all
three sides: a check that they compute the same thing.

Step time = wall time of one full training step including building the batch tensors. Each side
runs --warmup untimed steps, then --steps timed ones; rounds rotate the order of the sides
(heft, pyreft, floor / pyreft, floor, heft / ...) to cancel machine drift. Reported: median step
time over all timed steps of all rounds and the ratio pyreft/heft (goal >= 1.5). heft/floor, the
finer ratio, is measured apart so machine drift cannot fake it: heft and the floor in ONE process,
--pair-rounds short rounds of --pair-steps steps each (the order flips every round, both sides run the
same batches), the ratio computed per round; reported are its median and spread (quartiles, min,
max). Goal: <= 1.10 at fp32, <= 1.05 at bf16 (issue #15).

    python bench/reft_vs_pyreft.py [--batch 4] [--seq-len 128] [--steps 8] [--warmup 2] [--rounds 2]
                                   [--dtype fp32|bf16] [--device cpu|cuda] [--out bench/results/reft_vs_pyreft.json]

The first run builds pyreft's environment in $HEFT_CACHE/bench-venvs/pyreft (default
~/.cache/heft/bench-venvs/pyreft): torch 2.13.0, transformers 4.45.1 and the packages pyreft and
pyvene import, then pyreft 0.1.0 and pyvene 0.1.7 without their dependency lists (which pull
jupyter, wandb and a CUDA torch). heft itself never depends on pyreft.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SIDES = ("heft", "pyreft", "floor")
PYREFT_STEPS = [
    ["torch==2.13.0"],
    ["transformers==4.45.1", "datasets", "networkx", "matplotlib", "accelerate", "protobuf", "sentencepiece"],
    ["--no-deps", "pyreft==0.1.0", "pyvene==0.1.7"],
]
SMOLLM2_135M_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                          rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu", attention_dropout=0.0)


# ----------------------------------------------------------------------------- shared by all sides


def build_model(spec: dict) -> torch.nn.Module:
    """A frozen random-weight Llama of SmolLM2-135M's shape, identical in any transformers version."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SMOLLM2_135M_SHAPE, num_hidden_layers=spec["num_layers"])
    model = LlamaForCausalLM(LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):  # tied head: shares embed_tokens, listed once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model.to(spec["device"])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(spec: dict):
    return torch.autocast(device_type=spec["device"].split(":")[0], dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16")


def time_steps(step, spec: dict) -> dict:
    """Run `step(batch_rows)` on each batch: warmup untimed, then timed; losses of every step."""
    times, losses = [], []
    for i, rows in enumerate(spec["batches"]):
        sync(spec["device"])
        start = time.perf_counter()
        loss = step(rows)
        sync(spec["device"])
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {"step_seconds": times, "losses": losses}


# ----------------------------------------------------------------------------- the three sides


def heft_batch(rows: list[dict], spec: dict) -> tuple[dict, int]:
    """heft's left-padded training batch (on the device) and how many positions need logits."""
    from heft.data.tokens import Encoded, train_batch

    items = [Encoded(r["prompt"], (r["answer"], r["answer"]), 1, False) for r in rows]
    batch = train_batch(items, spec["pad_id"])
    keep = int(batch.pop("logits_to_keep"))
    return {k: v.to(spec["device"]) for k, v in batch.items()}, keep


def heft_step(spec: dict):
    """heft's training step (a function of the batch rows) and its trainable parameter count."""
    from heft.config.schema import PositionsConfig, ReftConfig
    from heft.methods.model import decoder_layers, fp32_output_head, hidden_size
    from heft.methods.reft import ReftModel
    from heft.training.runtime import model_forward
    from heft.training.loop import answer_loss

    model = build_model(spec)
    if spec["dtype"] == "bf16":
        fp32_output_head(model)  # what heft's loader does under bf16 autocast
    torch.manual_seed(0)
    cfg = ReftConfig(kind="loreft", rank=spec["rank"], layers="all",
                     positions=PositionsConfig(spec["first"], spec["last"]), init="identity")
    reft = ReftModel(model, cfg, decoder_layers(model), hidden_size(model)).to(spec["device"])
    params = [p for p in reft.interventions.parameters()]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0, foreach=True)  # as heft.training.loop
    reft.train()

    def step(rows: list[dict]) -> torch.Tensor:
        batch, keep = heft_batch(rows, spec)
        with autocast(spec):
            loss = answer_loss(model_forward(reft, batch, keep), batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, sum(p.numel() for p in params)


def run_heft(spec: dict) -> dict:
    step, n_params = heft_step(spec)
    return {**time_steps(step, spec), "trainable_params": n_params}


def floor_step(spec: dict):
    from heft.methods.model import decoder_layers, fp32_output_head
    from heft.training.loop import answer_loss

    model = build_model(spec)
    if spec["dtype"] == "bf16":
        fp32_output_head(model)
    model.train()

    def leaf_output(module, args, output):
        # Gradients stop here: layer 0's output is a leaf, everything below it needs no gradient.
        h = output[0] if isinstance(output, tuple) else output
        h = h.detach().requires_grad_()
        return (h, *output[1:]) if isinstance(output, tuple) else h

    decoder_layers(model)[0].register_forward_hook(leaf_output)

    def step(rows: list[dict]) -> torch.Tensor:
        batch, keep = heft_batch(rows, spec)
        with autocast(spec):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], logits_to_keep=keep, use_cache=False).logits
            loss = answer_loss(logits, batch["targets"])
        loss.backward()
        return loss.detach()

    return step


def run_floor(spec: dict) -> dict:
    return time_steps(floor_step(spec), spec)


def run_pair(spec: dict) -> dict:
    """heft and the floor in one process, interleaved in many short rounds (the order flips every round), so
    both see the same machine state; the ratio heft/floor is computed per round and its spread reported."""
    steps = {"heft": heft_step(spec)[0], "floor": floor_step(spec)}
    batches = spec["batches"]
    for side in steps:  # warmup, untimed
        for rows in batches[:spec["warmup"]]:
            steps[side](rows)
    timed = batches[spec["warmup"]:]
    rounds = []
    for r in range(spec["pair_rounds"]):
        order = ("heft", "floor") if r % 2 == 0 else ("floor", "heft")
        times: dict[str, list[float]] = {}
        for side in order:
            times[side] = []
            for i in range(spec["pair_steps"]):
                rows = timed[(r * spec["pair_steps"] + i) % len(timed)]  # both sides run the same batches
                sync(spec["device"])
                start = time.perf_counter()
                steps[side](rows)
                sync(spec["device"])
                times[side].append(time.perf_counter() - start)
        rounds.append({**times, "ratio": statistics.median(times["heft"]) / statistics.median(times["floor"])})
    return {"rounds": rounds}


def run_pyreft(spec: dict) -> dict:
    import pyreft

    model = build_model(spec)
    d, n, k = model.config.hidden_size, model.config.num_hidden_layers, spec["last"]
    assert spec["first"] in (0, spec["last"]), "pyreft pads both position groups to one width; keep first == last (or 0)"
    groups = 2 if spec["first"] else 1
    layers = list(range(n)) * groups  # pyreft's recipe: layers + layers, first group then last group
    dtype = torch.float32  # interventions in fp32 on both sides (pyreft's own default would be bf16)
    config = pyreft.ReftConfig(representations=[
        {"layer": layer, "component": "block_output", "low_rank_dimension": spec["rank"],
         "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=spec["rank"], dtype=dtype)}
        for layer in layers])
    torch.manual_seed(0)
    reft = pyreft.get_reft_model(model, config)
    reft.set_device(spec["device"])
    with torch.no_grad():  # exact zero edit at the start, as heft's init="identity": W = R, b = 0
        for iv in reft.interventions.values():
            iv = iv[0] if isinstance(iv, (tuple, list)) else iv
            iv.learned_source.weight.copy_(iv.rotate_layer.weight.T)
            iv.learned_source.bias.zero_()
    params = [p for _, p in reft.named_parameters()]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    reft.train()
    pad = spec["pad_id"]

    def step(rows: list[dict]) -> torch.Tensor:
        # What pyreft's data collator + ReftTrainer.compute_loss do: right padding, labels on the answer.
        width = max(len(r["prompt"]) + len(r["answer"]) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        locs = torch.zeros((len(rows), groups * n, k), dtype=torch.long)
        for i, r in enumerate(rows):
            p, a = len(r["prompt"]), len(r["answer"])
            ids[i, :p + a] = torch.tensor(r["prompt"] + r["answer"])
            mask[i, :p + a] = 1
            labels[i, p:p + a] = torch.tensor(r["answer"])
            if groups == 2:
                locs[i, :n] = torch.arange(k)
            locs[i, (groups - 1) * n:] = torch.arange(p - k, p)
        ids, mask, labels, locs = (t.to(spec["device"]) for t in (ids, mask, labels, locs))
        with autocast(spec):
            _, out = reft({"input_ids": ids, "attention_mask": mask},
                          unit_locations={"sources->base": (None, locs.permute(1, 0, 2).tolist())},
                          labels=labels, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return {**time_steps(step, spec), "trainable_params": sum(p.numel() for p in params)}


# ----------------------------------------------------------------------------- driver


def make_spec(args: argparse.Namespace, path: Path) -> dict:
    """Tokenize BoolQ training rows once (heft's passage prompt) and write the spec every side reads."""
    from heft.config.schema import DataConfig
    from heft.data.rows import load_splits
    from heft.data.tokens import Encoder
    from heft.methods.model import resolve_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    need = (args.warmup + args.steps) * args.batch
    enc = Encoder(tok, "passage", args.seq_len)
    rows = []
    for ex in load_splits(DataConfig(train_size=need, dev_size=200, eval_size=1)).train[:need]:
        e = enc.encode(ex)
        rows.append({"prompt": e.prompt, "answer": e.answers[e.label]})
    if len(rows) < need:
        raise SystemExit(f"only {len(rows)} BoolQ training rows; lower --batch or --steps")
    if min(len(r["prompt"]) for r in rows) < args.first + args.last:
        raise SystemExit("a prompt is shorter than first + last positions; raise --seq-len")
    spec = {"batches": [rows[i:i + args.batch] for i in range(0, need, args.batch)],
            "warmup": args.warmup, "num_layers": args.num_layers, "rank": args.rank, "first": args.first,
            "last": args.last, "lr": 2e-3, "dtype": args.dtype, "device": args.device,
            "pair_rounds": args.pair_rounds, "pair_steps": args.pair_steps,
            "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    path.write_text(json.dumps(spec))
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128, help="prompt + answer tokens at most (longer passages are cut)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per side and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--first", type=int, default=5)
    ap.add_argument("--last", type=int, default=5)
    ap.add_argument("--num-layers", type=int, default=30, help="30 is SmolLM2-135M; fewer only for smoke tests")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="fp32 weights; bf16 = bf16 autocast on every side")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=str(HERE / "results" / "reft_vs_pyreft.json"))
    ap.add_argument("--pair-rounds", type=int, default=12, help="interleaved heft/floor rounds in one process")
    ap.add_argument("--pair-steps", type=int, default=2, help="timed steps per side and interleaved round")
    ap.add_argument("--one", choices=SIDES + ("pair",), help=argparse.SUPPRESS)  # internal: run one side on --spec
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        spec = json.loads(Path(args.spec).read_text())
        result = {"heft": run_heft, "pyreft": run_pyreft, "floor": run_floor, "pair": run_pair}[args.one](spec)
        import transformers

        result.update(torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads())
        print("RESULT " + json.dumps(result))
        return

    sys.path.insert(0, str(HERE))
    from peer_venv import ensure_venv, run_json

    pyreft_python = ensure_venv("pyreft", PYREFT_STEPS)
    pythons = {"heft": sys.executable, "pyreft": str(pyreft_python), "floor": sys.executable}
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec = make_spec(args, spec_path)
        tokens = sum(len(r["prompt"]) + len(r["answer"]) for b in spec["batches"][args.warmup:] for r in b) / args.steps
        for r in range(args.rounds):
            order = SIDES[r % 3:] + SIDES[:r % 3]
            for side in order:
                print(f"round {r + 1}/{args.rounds}: {side} ...", flush=True)
                cmd = [pythons[side], str(Path(__file__).resolve()), "--one", side, "--spec", str(spec_path)]
                runs[side].append(run_json(cmd, side))
        print(f"heft and floor interleaved: {args.pair_rounds} rounds x {args.pair_steps} steps ...", flush=True)
        pair = run_json([sys.executable, str(Path(__file__).resolve()), "--one", "pair", "--spec", str(spec_path)], "pair")
    ratios = sorted(r["ratio"] for r in pair["rounds"])
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3

    med = {s: statistics.median(t for run in runs[s] for t in run["step_seconds"]) for s in SIDES}
    first_loss = {s: runs[s][0]["losses"][0] for s in SIDES}
    result = {
        "benchmark": "reft_train_step_vs_pyreft", "model": "SmolLM2-135M shape, random weights",
        "num_layers": args.num_layers, "batch": args.batch, "seq_len_cap": args.seq_len,
        "mean_tokens_per_step": tokens, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "rank": args.rank, "positions": {"first": args.first, "last": args.last}, "dtype": args.dtype,
        "device": args.device, "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "versions": {s: {k: runs[s][0][k] for k in ("torch", "transformers")} for s in SIDES},
        "trainable_params": {s: runs[s][0].get("trainable_params") for s in ("heft", "pyreft")},
        "median_step_seconds": med, "first_step_loss": first_loss,
        "first_step_loss_max_abs_diff": max(first_loss.values()) - min(first_loss.values()),
        "speedup_heft_over_pyreft": med["pyreft"] / med["heft"], "goal_speedup_at_least": 1.5,
        "heft_over_floor_separate_processes": med["heft"] / med["floor"],
        "heft_over_floor": statistics.median(ratios),
        "heft_over_floor_spread": {"min": ratios[0], "q1": q[0], "q3": q[2], "max": ratios[-1], "rounds": len(ratios)},
        "goal_heft_over_floor_at_most": 1.05 if args.dtype == "bf16" else 1.10,
        "runs": runs, "interleaved": pair,
    }
    print(f"\nReFT training step, SmolLM2-135M shape ({args.num_layers} layers), batch {args.batch}, "
          f"~{tokens:.0f} tokens/step, {args.dtype}, {args.device}, {args.rounds} rounds x {args.steps} timed steps")
    print(f"{'side':<8}{'median s/step':>15}{'tokens/s':>10}{'first loss':>12}  versions")
    for s in SIDES:
        v = result["versions"][s]
        print(f"{s:<8}{med[s]:>15.3f}{tokens / med[s]:>10.0f}{first_loss[s]:>12.5f}  torch {v['torch']}, "
              f"transformers {v['transformers']}")
    print(f"first-step loss (every edit starts at exactly zero) differs by at most {result['first_step_loss_max_abs_diff']:.2e}")
    print(f"speed-up of heft over pyreft: {result['speedup_heft_over_pyreft']:.2f}x (goal >= 1.5x)")
    sp = result["heft_over_floor_spread"]
    print(f"heft / floor, per interleaved round: median {result['heft_over_floor']:.3f} (quartiles {sp['q1']:.3f}-"
          f"{sp['q3']:.3f}, min {sp['min']:.3f}, max {sp['max']:.3f}, {sp['rounds']} rounds; goal <= "
          f"{result['goal_heft_over_floor_at_most']:.2f}); from the separate processes' medians: "
          f"{result['heft_over_floor_separate_processes']:.3f}")
    from heft.run.atomic import write_json

    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
