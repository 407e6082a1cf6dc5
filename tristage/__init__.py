"""tristage: train a language model through pre-training, instruction tuning and RLHF."""

__version__ = "0.1.0"
