"""The base model with the adapters of finished stages applied, on this process's Runtime: what a run's stages
train on and what its evaluations score (heft.run.pipeline), and what a finished run reloads into."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from heft.config.schema import RunConfig, StageConfig
from heft.data.rows import Example
from heft.data.tokens import Encoded, Encoder, encode_all
from heft.errors import ConfigError
from heft.evaluation.evaluate import evaluate_tasks
from heft.evaluation.generate import generate
from heft.evaluation.yesno import score
from heft.methods import lora
from heft.methods.model import decoder_layers, hidden_size, load_model, unwrap
from heft.methods.reft import ReftModel, check_fits
from heft.training.runtime import Runtime, make_runtime


class Session:
    """The base model with the adapters of finished stages applied, on this process's Runtime."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.rt: Runtime = make_runtime(cfg.precision)
        if cfg.model.compile and self.rt.distributed == "FSDP":
            raise ConfigError("model.compile: true is not supported with FSDP (sharded layers swap their parameters); "
                              "set model.compile: false, or launch with configs/accelerate/ddp.yaml")
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = load_model(cfg.model, self.rt.device)
        self.model_path = getattr(self.model, "name_or_path", cfg.model.name_or_path)
        self.reft: ReftModel | None = None
        self.num_layers = _depth(self.model, cfg.model.layers_path)
        # the decoder layers ReFT edits, checked against the model once (a setup that cannot fit stops here)
        self.reft_layers = (check_fits(cfg.reft, len(decoder_layers(self.model, cfg.model.layers_path)), hidden_size(self.model))
                            if any(st.trains_reft for st in cfg.stages) else None)
        self._encoders: dict[int, Encoder] = {}

    def replace_model(self, model: nn.Module) -> None:
        """Swap the (maybe PEFT-wrapped or merged) model, keeping a ReFT wrapper pointed at it."""
        self.model = model
        if self.reft is not None:
            self.reft.model = model

    @property
    def top(self) -> nn.Module:
        """What forward passes go through: the ReFT wrapper if any, else the (maybe PEFT) model."""
        return self.reft if self.reft is not None else self.model

    def add_reft(self) -> ReftModel:
        if self.reft is not None:
            raise ConfigError("stages: only one stage may train ReFT interventions")
        torch.manual_seed(self.cfg.seed + 1)  # interventions' init does not depend on earlier stages
        layers = decoder_layers(self.model, self.cfg.model.layers_path)
        self.reft = ReftModel(self.model, self.cfg.reft, layers, hidden_size(self.model)).to(self.rt.device)
        return self.reft

    def apply_stage(self, stage: StageConfig, files: Path) -> None:
        """Put a finished stage's saved adapters (a run's stage folder, or a cached one) on the model, frozen,
        as training left them (LoRA merged if lora.merge)."""
        if stage.trains_lora:
            self.replace_model(lora.load(self.model, files / "adapter", merge=self.cfg.lora.merge))
        if stage.trains_reft:
            self.add_reft().load_weights(files)
        self.top.requires_grad_(False)

    def encoder(self, max_length: int | None = None) -> Encoder:
        length = max_length or self.cfg.data.max_length
        if length not in self._encoders:
            self._encoders[length] = Encoder(self.tokenizer, self.cfg.data.prompt_format, length,
                                             self.cfg.reft.positions.first_from)
        return self._encoders[length]

    def encode_eval(self, rows: list[Example]) -> list[Encoded]:
        """The evaluation rows' ids (each row checked to fit data.max_length): encoded once per run."""
        return encode_all(self.encoder(), rows, self.cfg.data.eval_split)

    def evaluate(self, rows: list[Example], encoded: list[Encoded] | None = None) -> list[dict[str, Any]]:
        """One prediction per row, in order (`encoded`: the rows' `encode_eval`, if done already). BoolQ:
        {label, pred, p_yes, lp_no, lp_yes | text, idx, truncated}; other tasks: see heft.evaluation.evaluate.evaluate_tasks."""
        encoded = self.encode_eval(rows) if encoded is None else encoded
        e = self.cfg.eval
        if any(r.kind != "yesno" for r in rows):
            return evaluate_tasks(self.top, self.tokenizer, rows, encoded, e, self.rt)
        if e.method == "generate":
            words = ("no", "yes") if self.cfg.data.prompt_format == "passage" else ("false", "true")
            preds = generate(self.top, encoded, self.tokenizer, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens or 4,
                             answer_words=words, rt=self.rt)
        else:
            preds = score(self.top, encoded, batch_size=e.batch_size, pad_id=self.tokenizer.pad_token_id, rt=self.rt)
        for p, r, x in zip(preds, rows, encoded):
            p["idx"] = r.idx
            p["truncated"] = x.truncated
        return preds


def _depth(model: nn.Module, layers_path: str | None) -> int:
    try:
        return len(decoder_layers(model, layers_path))
    except ConfigError:  # an architecture heft cannot map without model.layers_path: depth unchecked
        return 0


def model_shape(model: nn.Module) -> dict[str, int]:
    """What adapters depend on: vocabulary, hidden size, depth."""
    return {"vocab_size": int(unwrap(model).get_input_embeddings().weight.shape[0]), "hidden_size": hidden_size(model),
            "num_layers": _depth(model, None)}
