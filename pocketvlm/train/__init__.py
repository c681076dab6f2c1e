"""pocketvlm.train: LLaVA-style retraining (assemble a VLM from parts, stage 1 projector, stage 2 projector + LoRA).

Imports the model families and the loading pipeline; nothing outside this package imports its internals."""
from .assemble import assemble_llava
from .data import Encoder, load_dataset, to_messages
from .lora import LoRALinear, apply_lora, merge_lora, save_adapter
from .loop import TrainConfig, train

__all__ = ["assemble_llava", "Encoder", "load_dataset", "to_messages", "LoRALinear", "apply_lora", "merge_lora",
           "save_adapter", "TrainConfig", "train"]
