"""Command line: `heft run | train | eval | predict`.

    heft run [--out DIR]                                   the default study (SmolLM2-135M + BoolQ, offline)
    heft compare [--config FILE] --seeds 0 1 2 --out DIR   every strategy x seed, per-epoch evaluation, a report
    heft train --config FILE --out DIR [--a.b value ...]   one strategy, any model and BoolQ-format data
    heft eval DIR                                          reload a run folder and re-evaluate it
    heft predict DIR --passage P --question Q              yes/no and its probability (a chat run: its answer)
    heft lm-eval DIR --tasks boolq,arc_easy [--limit N]      lm-evaluation-harness tasks on a run (extra: lm-eval)
    heft tune --config FILE --trials N --out DIR [--storage URL]   Optuna search on the dev split, many workers (extra: tune)
    heft serve RUN [--host 127.0.0.1] [--port 8000]         an OpenAI-compatible server with ReFT on each prompt (extra: serve)
    heft export RUN OUT                                    the LoRA stages merged into a plain transformers folder, + ReFT
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from heft.errors import ConfigError, HeftError

logger = logging.getLogger("heft")


def _split_overrides(rest: list[str]) -> list[tuple[str, str]]:
    """`--a.b value` pairs (also `--a.b=value`) from the arguments argparse did not know."""
    pairs, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like `--section.field value`")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest) or (rest[i + 1].startswith("--") and len(rest[i + 1]) > 2 and not rest[i + 1][2].isdigit()):
                raise ConfigError(f"{arg}: missing a value")
            key, value = arg[2:], rest[i + 1]
            i += 2
        pairs.append((key.replace("-", "_"), value))
    return pairs


def _reports() -> bool:
    """Under torchrun / accelerate launch only the main process prints results (the one check: heft.training.runtime)."""
    from heft.training.runtime import is_main_process

    return is_main_process()


def _suite(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> Path:
    """The suite file, checked (every strategy's config) before torch is imported."""
    from heft.config.suite import read_suite, select, suite_path

    path = suite_path(args.config, args.suite)
    select(read_suite(path, overrides), args.only)
    return path


def cmd_run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    path = _suite(args, overrides)
    from heft.study.report import console_table
    from heft.study.compare import run_study

    report = run_study(path, Path(args.out), overrides, seeds=None, only=args.only, overwrite=args.overwrite)
    if _reports():
        print("\n" + console_table(report))
        print(f"\nwrote {args.out}/report.md, summary.json and one run folder per strategy")
    return 0


def cmd_compare(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    path = _suite(args, overrides)
    only, tuning = args.only, None
    if args.tune is not None:  # the suite's strategies replaced by their best configs on the dev split
        from heft.tune.suite import tune_suite

        out = Path(args.out)
        path, tuning = tune_suite(path, overrides, only, Path(args.tune_out or out.with_name(out.name + "-tune")), args.tune,
                          storage=args.storage, prefix=f"{out.name}-")
        overrides, only = [], None
    from heft.study.report import console_table
    from heft.study.compare import run_study

    report = run_study(path, Path(args.out), overrides, seeds=args.seeds, only=only, overwrite=args.overwrite,
                       tensorboard=args.tensorboard, targets=args.target, final_only=args.final_only, tuning=tuning)
    if _reports():
        print("\n" + console_table(report))
        print(f"\nwrote {args.out}/report.md and report.json")
    return 0


def cmd_train(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    from heft.config.load import load

    out = Path(args.out)
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")
    if args.resume == "yes" and not (out / "config.yaml").is_file():
        raise ConfigError(f"--resume: {out} holds no run to continue; drop --resume (or use --resume auto)")
    if args.resume and args.config is None and (out / "config.yaml").is_file():
        args.config = str(out / "config.yaml")  # `heft train --out DIR --resume` continues DIR as it was configured
    if args.config is None:
        raise ConfigError("--config: give a run config YAML with the training stages (see `heft train --help` for "
                          "every field); `stages: []` evaluates the base model")
    cfg = load(args.config, overrides)  # before torch is imported: a bad config is reported at once
    from heft.run.pipeline import train_run

    m = train_run(cfg, out, overwrite=args.overwrite, resume=bool(args.resume))
    if _reports():
        lo, hi = m.ci95
        print(f"{m.strategy}: accuracy {m.accuracy:.2%} [{lo:.2%}, {hi:.2%}] on {m.n} rows "
              f"(majority baseline {m.majority_baseline:.2%}); wrote {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    if overrides:
        raise ConfigError("heft eval takes no overrides: it re-evaluates the run exactly as it was configured")
    from heft.run.pipeline import eval_run

    from heft.hub import resolve

    r = eval_run(resolve(args.run), allow_other_base=args.allow_other_base)
    code = 0 if r.get("matches_saved_predictions", True) else 1
    if not _reports():
        return code
    lo, hi = r["ci95"]
    print(f"accuracy {r['accuracy']:.2%} [{lo:.2%}, {hi:.2%}] on {r['n']} rows ({r['eval_split']})")
    if "matches_saved_predictions" in r:
        print("predictions identical to the saved ones" if r["matches_saved_predictions"]
              else "predictions DIFFER from the saved ones")
    if args.json:
        print(json.dumps(r))
    return code


def cmd_predict(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    if overrides:
        raise ConfigError("heft predict takes no overrides: it answers with the run exactly as it was configured")
    if args.choices is not None and len(args.choices) < 2:
        raise ConfigError("--choices: give at least 2 answer texts")
    from heft.api import load
    from heft.data.rows import Example, parse_row

    model, _ = load(args.run, allow_other_base=args.allow_other_base)
    s, cfg, fmt = model.session, model.session.cfg, model.prompt
    if args.system is not None:
        if not fmt.chat:
            raise ConfigError(f"--system: this run was trained on plain prompts (data.format: {cfg.data.format}), "
                              "not chat messages; drop --system")
        fmt = fmt.with_system(args.system)
    if args.choices or args.generate or fmt.chat:  # a general prompt (a chat run's user turn): choices, or greedy text
        pred = s.evaluate([fmt.row(args.question, args.choices, "command line")])[0]
        if _reports():
            if args.choices:
                for c, ll in zip(args.choices, pred["lls"]):
                    print(f"{'*' if c == args.choices[pred['pred']] else ' '} {c!r}: log-likelihood {ll:.3f}")
            else:
                print(pred["text"])
        return 0
    if cfg.data.prompt_format == "passage" and not (args.passage or "").strip():
        raise ConfigError("--passage: this run was trained with passages (data.prompt_format: passage); give --passage TEXT")
    ex: Example = parse_row({"question": args.question, "passage": args.passage or "", "answer": False},
                            "command line", need_passage=cfg.data.prompt_format == "passage")
    pred = s.evaluate([ex])[0]
    if not _reports():
        return 0
    if "p_yes" in pred:
        answer = "yes" if pred["pred"] else "no"
        print(f"{answer} (p_yes={pred['p_yes']:.3f})")
    else:
        print(f"{pred['text']!r} -> {pred['pred']}")
    return 0


def cmd_push(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    from heft.hub import push

    repo = push(Path(args.run), args.repo, private=args.private)
    if _reports():
        print(f"pushed {args.run} to https://huggingface.co/{repo}")
    return 0


def cmd_pull(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    from heft.hub import pull

    path = pull(args.repo, Path(args.out))
    if _reports():
        print(f"pulled {args.repo} into {path}; `heft eval {path}` reproduces its predictions")
    return 0


def cmd_lm_eval(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    if overrides:
        raise ConfigError("heft lm-eval takes no overrides: it evaluates the run exactly as it was configured")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give one or more lm-eval task names, comma-separated (e.g. boolq,arc_easy)")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("heft lm-eval needs lm-evaluation-harness, an optional extra: pip install 'heft[lm-eval]'") from None
    from heft.hub import resolve
    from heft.evaluation.harness import HeftLM, evaluate, task_manager

    manager = task_manager(tasks, args.include_path)  # a wrong task name is reported before the model is loaded
    lm = HeftLM(run=resolve(args.run), batch_size=args.batch_size, max_length=args.max_length,
                allow_other_base=args.allow_other_base)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = evaluate(lm, tasks, limit=limit, num_fewshot=args.num_fewshot, manager=manager)
    from lm_eval.utils import handle_non_serializable, make_table

    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.output:
        print(f"wrote {args.output} (lm-eval's results, per-sample records under `samples`)")
    return 0


def cmd_serve(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    from heft.serve.server import serve_command

    return serve_command(args)


def cmd_export(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    from heft.serve.export import export_command

    return export_command(args)


def cmd_tune(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    from heft.tune.study import tune

    report = tune(Path(args.config), Path(args.out), args.trials, overrides=overrides, storage=args.storage,
                  study_name=args.study_name, seed=args.seed, heartbeat=args.heartbeat, pruner=args.pruner)
    c, best = report["counts"], report["best"]
    print(f"study {report['study']}: {report['trials']} trials, {c['complete']} complete, {c['pruned']} pruned, "
          f"{c['failed']} failed" + (f"; best dev accuracy {best['value']:.2%} (trial {best['number']}), "
                                     f"its config in {best['config']}" if best else ""))
    print(f"wrote {args.out}/tune.md, tune.json and plots/")
    return 0


TUNE_EPILOG = """The search space is the config's `search:` section, keyed by the dotted paths of the overrides:

  search:
    stages.0.lr: {log_uniform: [1.0e-4, 3.0e-3]}
    lora.dropout: {uniform: [0.0, 0.1]}
    stages.1.epochs: {int: [1, 3]}          # also log_int
    reft.rank: {choice: [2, 4, 8]}

Without it: each stage's learning rate and each trained method's rank. Trials train on the training rows and
are scored on the dev split (data.dev_size rows), never the evaluated split; OUT/best.yaml is the best config."""


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from heft.config.help_text import suite_epilog, train_epilog

    helping = any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv))  # the epilogs list ~60 fields: built only when shown
    suite_help, train_help = (suite_epilog(), train_epilog()) if helping else (None, None)
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="heft", description="Hierarchical PEFT: LoRA, then ReFT, for Hugging Face causal LMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the default study: base, LoRA, ReFT and HEFT on BoolQ, one table",
                       description="Train and evaluate every strategy of a suite once (the one-seed case of compare).",
                       epilog=suite_help, formatter_class=raw)
    r.add_argument("--config", help="a suite YAML (default: the embedded SmolLM2-135M + BoolQ suite)")
    r.add_argument("--suite", help="an embedded suite by name: default (BoolQ) or commonsense (8 tasks, one mixture)")
    r.add_argument("--out", default="runs/heft-default", help="output folder (default: runs/heft-default); "
                   "finished run folders in it are reused, unfinished ones resumed")
    r.add_argument("--only", nargs="+", help="run only these strategies (e.g. base heft)")
    r.add_argument("--overwrite", action="store_true", help="replace a heft output folder (swapped in when the new one is done)")
    c = sub.add_parser("compare", help="every strategy of a suite under several seeds, with intervals, paired tests, plots",
                       description="Train and evaluate every strategy of a suite under several seeds, evaluated after "
                       "every epoch, and write a report.", epilog=suite_help, formatter_class=raw)
    c.add_argument("--config", help="a suite YAML (default: the embedded SmolLM2-135M + BoolQ suite)")
    c.add_argument("--suite", help="an embedded suite by name: default (BoolQ) or commonsense (8 tasks, one mixture)")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    c.add_argument("--out", default="runs/heft-compare", help="output folder (default: runs/heft-compare); "
                   "finished run folders in it are reused, unfinished ones resumed")
    c.add_argument("--only", nargs="+", help="compare only these strategies")
    c.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events in every run folder")
    c.add_argument("--target", type=float, nargs="+", help="also report the epochs each strategy needs to reach "
                   "these accuracies (e.g. 0.65)")
    c.add_argument("--overwrite", action="store_true", help="train everything again into a new folder and swap it in "
                   "for the old one when done")
    c.add_argument("--final-only", action="store_true", help="evaluate each run at the end of training only, not after "
                   "every epoch (faster for many epochs or large evaluation sets; no accuracy-vs-epoch table)")
    c.add_argument("--tune", type=int, metavar="N", help="first tune every trained strategy on the dev split with N trials "
                   "(heft tune; a strategy's `search:` in the suite, else its methods' default space; the suite's budgets), then "
                   "compare their best configs")
    c.add_argument("--tune-out", help="with --tune: the tune folders, the tuned suite.yaml and tuning.md "
                   "(default: OUT-tune next to --out)")
    c.add_argument("--storage", help="with --tune: the studies' shared storage, as for heft tune (default: a journal "
                   "file in each tune folder)")
    t = sub.add_parser("train", help="train one run (a list of stages) and evaluate it",
                       description="Train one run: the stages of a run config, then the evaluation.",
                       epilog=train_help, formatter_class=raw)
    t.add_argument("--config", help="run YAML; fields can be overridden with --section.field value")
    t.add_argument("--out", required=True, help="output run folder (must be new or empty)")
    t.add_argument("--overwrite", action="store_true", help="replace a heft run folder: the new run is written aside and "
                   "swapped in when it is done, so a failure leaves the old one whole")
    t.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"],
                   help="continue the run in --out from its latest checkpoint (`auto`: if there is one, else start)")
    e = sub.add_parser("eval", help="reload a run folder and re-evaluate it")
    e.add_argument("run", help="a finished run folder written by heft train/run/compare, or hf://USER/REPO")
    e.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    e.add_argument("--allow-other-base", action="store_true", help="apply the adapters even if the base model differs "
                   "from the one the run was trained on (its recorded fingerprint)")
    pr = sub.add_parser("predict", help="answer one question with a trained run (yes/no, choices, or generated text)")
    pr.add_argument("run", help="a finished run folder, or hf://USER/REPO")
    pr.add_argument("--question", required=True, help="the question (BoolQ), the whole prompt with --choices/--generate, "
                    "or a chat run's user message (rendered with the run's chat template; generated unless --choices)")
    pr.add_argument("--passage", default=None, help="BoolQ runs trained with passages")
    pr.add_argument("--choices", nargs="+", help="score these answers after the prompt (` ` + choice, as lm-eval) and "
                    "mark the most likely")
    pr.add_argument("--generate", action="store_true", help="print the greedy continuation of the prompt")
    pr.add_argument("--system", help="chat runs: the system message (default: the one the run's rows open with; "
                    "\"\" for none)")
    pr.add_argument("--allow-other-base", action="store_true", help="as for heft eval")
    pu = sub.add_parser("push", help="upload a finished run folder to the Hugging Face Hub, with a model card")
    pu.add_argument("run", help="a finished run folder")
    pu.add_argument("repo", help="USER/REPO")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pl = sub.add_parser("pull", help="download a run pushed with heft push")
    pl.add_argument("repo", help="USER/REPO")
    pl.add_argument("out", help="a new or empty folder")
    le = sub.add_parser("lm-eval", help="evaluate a run with lm-evaluation-harness tasks (pip install 'heft[lm-eval]')",
                        description="Answer lm-evaluation-harness requests with a finished run (base model + LoRA + "
                        "ReFT, the edits on each request's context only; a chat run's prompts through its chat template, "
                        "as it trained) and print lm-eval's table. The same model is "
                        "`--model heft --model_args run=DIR` in `python -m heft.lm_eval_bridge` (lm-eval's own CLI).")
    le.add_argument("run", help="a finished run folder, or hf://USER/REPO")
    le.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated (e.g. boolq,arc_easy)")
    le.add_argument("--limit", type=float, help="at most this many documents per task (a fraction if < 1)")
    le.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default: 16)")
    le.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    le.add_argument("--max-length", type=int, help="context length in tokens (default: the model's, as lm-eval's hf)")
    le.add_argument("--include-path", help="a folder of your own task YAMLs (read alone when it holds every task)")
    le.add_argument("--output", help="write lm-eval's results (with per-sample records) to this JSON file")
    le.add_argument("--allow-other-base", action="store_true", help="as for heft eval")
    tu = sub.add_parser("tune", help="search a config's fields with Optuna on the dev split (pip install 'heft[tune]')",
                        description="Run trials of an Optuna study over a run config's fields, each an ordinary run "
                        "folder OUT/trial-K scored on the dev split, pruned at epoch ends. Start the same command on "
                        "more machines with a shared --storage to add workers.", epilog=TUNE_EPILOG, formatter_class=raw)
    tu.add_argument("--config", required=True, help="a run YAML with a `search:` section; fields can be overridden "
                    "with --section.field value")
    tu.add_argument("--trials", type=int, required=True, help="the study's total number of trials, over all its workers")
    tu.add_argument("--out", required=True, help="tune folder: trial run folders, the report, best.yaml")
    tu.add_argument("--storage", help="where the study lives, shared by its workers: journal:PATH (a file) or a database "
                    "URL such as postgresql://USER:PASSWORD@HOST/DB (default: OUT/optuna.journal)")
    tu.add_argument("--study-name", help="the study's name in the storage (default: the config file's name)")
    tu.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: 0)")
    tu.add_argument("--pruner", choices=["median", "none"], default="median", help="stop a trial whose dev accuracy "
                    "after an epoch is below the median of the trials before it at that epoch (default: median)")
    tu.add_argument("--heartbeat", type=float, default=60.0, help="seconds between a worker's signs of life; a worker on "
                    "another machine silent for 5 of them is taken as stopped and its trial retried (default: 60)")
    # -- serve (heft.serve.server)
    sv = sub.add_parser("serve", help="serve a run with the OpenAI API: completions, chat, streaming, logprobs "
                        "(pip install 'heft[serve]')",
                        description="An OpenAI-compatible HTTP server for a finished run: ReFT edits each request's own "
                        "prompt positions, requests are batched as they arrive (continuous batching).")
    sv.add_argument("run", help="a finished run folder, hf://USER/REPO, or a folder written by heft export")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one and prints it)")
    sv.add_argument("--model-name", help="the model id clients send (default: the run folder's name)")
    sv.add_argument("--max-concurrent", type=int, default=16, help="requests decoded together (default: 16)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429 (default: 64)")
    sv.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default: the model's context length)")
    sv.add_argument("--max-new-tokens", type=int, default=512, help="largest max_tokens accepted (default: 512)")
    sv.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take, queue included (default: 300)")
    sv.add_argument("--allow-other-base", action="store_true", help="as for heft eval")
    # -- export (heft.serve.export)
    ex = sub.add_parser("export", help="write a run as a Hugging Face model folder: LoRA merged into the weights, "
                        "ReFT files beside them, a model card",
                        description="Merge a run's LoRA stages into the base weights and write a folder that "
                        "AutoModelForCausalLM.from_pretrained loads with transformers alone, plus the run's ReFT "
                        "interventions (applied by heft.load and heft serve) and a model card. Prints the accuracy of "
                        "the plain model and of the full run on the run's evaluation rows.")
    ex.add_argument("run", help="a finished run folder, or hf://USER/REPO")
    ex.add_argument("out", help="a new or empty folder")
    ex.add_argument("--overwrite", action="store_true", help="replace OUT if it holds an earlier export")
    ex.add_argument("--no-eval", action="store_true", help="skip scoring the plain and the full model on the run's rows")
    ex.add_argument("--allow-other-base", action="store_true", help="as for heft eval")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = _split_overrides(rest)
        handler = {"run": cmd_run, "compare": cmd_compare, "train": cmd_train, "eval": cmd_eval, "predict": cmd_predict,
                   "push": cmd_push, "pull": cmd_pull, "lm-eval": cmd_lm_eval,
                   "tune": cmd_tune, "serve": cmd_serve, "export": cmd_export}[args.command]
        code = handler(args, overrides)
        _leave_process_group(code, wait=True)
        return code
    except HeftError as e:
        print(f"heft: error: {e}", file=sys.stderr)
        _leave_process_group(2, wait=False)
        return 2


def _leave_process_group(code: int, wait: bool) -> None:
    """Under torchrun / accelerate launch: finish together, shut the process group down, and end the
    process here. Left to the interpreter's exit-time destructors, gloo's threads abort a finished run
    now and then ("terminate called without an active exception", exit -6): 10 of 25 runs of a bare
    gloo script here; destroying the group cured the bare script, and exiting right after it leaves no
    teardown for the rest. Everything heft writes is closed by now. Single-process calls return normally."""
    if "torch" not in sys.modules:
        return  # refused before torch was imported: no process group can exist
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
