"""Loading the base model for QLoRA: 4-bit NF4 weights (bitsandbytes), LoRA adapters (peft)
on every linear projection, gradient checkpointing; and the tokenizer.

Two preparations, by how the run is distributed:

* One process, or DDP (a full 4-bit replica per GPU): peft's `prepare_model_for_kbit_training`
  (norms, embeddings and the head upcast to fp32, adapters in fp32).
* FSDP: the QLoRA-under-FSDP recipe of peft's and TRL's docs. FSDP flattens each wrapped unit
  into one tensor and refuses mixed dtypes ("Must flatten tensors with uniform dtype"), so there
  is no kbit preparation: every non-LoRA parameter stays in `quant.quant_storage` (the dtype the
  model is loaded in, and the dtype the packed 4-bit weights are stored in), and the adapters are
  created in it too (`autocast_adapter_dtype=False`): peft casts a layer's input to its adapter's
  dtype, and under FSDP mixed precision the adapter computes in the storage dtype. transformers'
  Trainer wraps the LoRA layers as their own FSDP units (peft's `fsdp_auto_wrap_policy`) and sets
  FSDP's mixed precision to the storage dtype. With `quant_storage: bfloat16` this is pure-bf16
  LoRA training; `float32` keeps fp32 adapters at twice the memory for the non-quantized weights.
"""

from __future__ import annotations

import logging
import os
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


def uses_fsdp() -> bool:
    """True when this process is launched for FSDP (`accelerate launch` with an FSDP config sets
    ACCELERATE_USE_FSDP) on GPUs; accelerate does not shard on the CPU (it runs plain DDP there)."""
    import torch

    flag = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return flag and torch.cuda.is_available() and not cpu


def patch_peft_for_fsdp() -> None:
    """Make peft find the adapter of a model wrapped by FSDP1 with nested units.

    peft 0.21 names a model's adapter tensors from its module names and strips one leading
    `_fsdp_wrapped_module.`; under the wrapping transformers installs for QLoRA (each decoder
    layer and each LoRA A/B its own FSDP unit) the segment also sits in the middle
    (`…layers.0._fsdp_wrapped_module.self_attn.q_proj.lora_A`), while FSDP's state dicts use
    clean names. `get_peft_model_state_dict` then returns nothing: the final adapter (Trainer →
    PeftModel.save_pretrained) and every checkpoint (accelerate's save_fsdp_model, adapter_only)
    are saved empty, and a resume loads nothing — silently. tests/training/test_multiprocess.py
    shows it on the CPU. This removes the wrapper segments (FSDP's and activation checkpointing's)
    from peft's names; it changes nothing for a model that is not wrapped.
    """
    from peft.tuners import tuners_utils

    original = getattr(tuners_utils, "_get_tuner_state_dict_key_prefixes", None)
    if original is None or getattr(original, "wrapper_segments_removed", False):
        return

    def prefixes(model: Any, adapter_name: str | None = None) -> set[str]:
        names = original(model, adapter_name=adapter_name)
        return {n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "") for n in names}

    prefixes.wrapper_segments_removed = True  # type: ignore[attr-defined]
    tuners_utils._get_tuner_state_dict_key_prefixes = prefixes


def lora_tensor_count(model: Any) -> int:
    """How many tensors the active adapter has (lora_A and lora_B of every LoRA layer)."""
    from peft.tuners.lora import LoraLayer

    name = model.active_adapter
    return sum(2 for m in model.modules() if isinstance(m, LoraLayer) and name in m.lora_A)


def load_qlora_model(config: TrainConfig, device_map: Any = None, fsdp: bool | None = None) -> Any:
    """The base model in 4-bit with fresh LoRA adapters, ready to train; prepared for FSDP
    (see the module's docstring) when `fsdp`, which defaults to how this process was launched."""
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
    fsdp = uses_fsdp() if fsdp is None else fsdp
    if fsdp:
        patch_peft_for_fsdp()
        if config.train.gradient_checkpointing:  # non-reentrant: the inputs need no gradient
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
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
        autocast_adapter_dtype=not fsdp,
    )
    if fsdp:
        dtypes = {p.dtype for p in model.parameters()}
        if dtypes != {dtype(config.quant.quant_storage)}:
            raise RuntimeError(f"FSDP needs one parameter dtype (quant.quant_storage), the model has {dtypes}")
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable parameters of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    return model
