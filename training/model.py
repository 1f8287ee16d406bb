"""Loading the base model for QLoRA: 4-bit NF4 weights (bitsandbytes), LoRA adapters (peft)
on every linear projection, gradient checkpointing; and the tokenizer."""

from __future__ import annotations

import logging
from typing import Any

from training.config import TrainConfig

log = logging.getLogger(__name__)


def dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_tokenizer(base_model: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:  # Llama has none; <unk> never appears in training text
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def quantization_config(config: TrainConfig) -> Any:
    """The card's bitsandbytes settings: nf4, double quantization, bf16 compute and storage."""
    from transformers import BitsAndBytesConfig

    q = config.quant
    return BitsAndBytesConfig(
        load_in_4bit=q.load_in_4bit,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype(q.compute_dtype),
        bnb_4bit_quant_storage=dtype(q.quant_storage),
    )


def load_qlora_model(config: TrainConfig, device_map: Any = None) -> Any:
    """The base model in 4-bit with fresh LoRA adapters, ready to train."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        config.base_model,
        quantization_config=quantization_config(config),
        dtype=dtype(config.quant.quant_storage),
        device_map=device_map,
    )
    # No KV cache in training: with one, transformers would not build the block-diagonal
    # mask that keeps packed examples apart.
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=config.train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    lora = config.lora
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM",
        ),
    )
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable parameters of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    return model
