"""Kept for `python -m heft.lm_eval_bridge` and `import heft.lm_eval_bridge`: the bridge is heft.evaluation.harness."""
from heft.evaluation.harness import *  # noqa: F401,F403  registers `--model heft` with lm-eval
from heft.evaluation.harness import main

if __name__ == "__main__":
    raise SystemExit(main())
