"""Data: reading rows (BoolQ, local files, built-in tasks), the offline assets, prompts and token batches."""
