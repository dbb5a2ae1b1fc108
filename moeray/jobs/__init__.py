"""Fine-tuning jobs on Ray Train: spec, data, losses, LoRA, trainer, export."""
