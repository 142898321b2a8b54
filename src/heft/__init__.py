"""heft: hierarchical parameter-efficient fine-tuning (LoRA, then ReFT) of Hugging Face causal LMs."""

__version__ = "0.1.0"
