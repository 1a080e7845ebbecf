"""greentext_dist: fine-tune GPT-2 (124M to 1.5B) on greentext with DDP, DeepSpeed ZeRO or FSDP."""

__version__ = "0.1.0"
