"""Serving a trained run: `heft serve` (an OpenAI-compatible HTTP server, continuous batching with ReFT on each
request's own prompt) and `heft export` (the LoRA stages merged into a plain Hugging Face model folder)."""
