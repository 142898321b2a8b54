"""The fine-tuning methods and the model they attach to: LoRA (weight space), ReFT (representation space), model loading."""
