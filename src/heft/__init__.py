"""heft: hierarchical parameter-efficient fine-tuning (LoRA, then ReFT) of Hugging Face causal LMs."""

__version__ = "0.1.0"

__all__ = ["load", "score", "generate", "train"]


def __getattr__(name: str):
    """`heft.load`, `heft.score`, `heft.generate`, `heft.train` (heft.api), imported on first use so that
    `import heft` and the command line's config checks stay free of torch."""
    if name in ("load", "score", "generate", "train", "HeftModel"):
        from heft import api

        return getattr(api, name)
    raise AttributeError(f"module 'heft' has no attribute {name!r}")
