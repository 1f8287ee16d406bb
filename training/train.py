"""QLoRA training with the transformers Trainer: checkpoints, resume after an interruption,
logged loss / learning rate / tokens per second, a progress bar (all the Trainer's own).

Several processes (`accelerate launch` with a config from training/configs/accelerate/, or
`torchrun`): the main process tokenizes the data while the others wait, then they read its
cache; every process trains; the adapter is saved once, by the main process — under FSDP after
gathering the full state dict from every rank (a collective: every rank calls `save_model`)."""

from __future__ import annotations

import gc
import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.data import prepare_dataset
from training.model import lora_tensor_count, load_qlora_model, load_tokenizer, uses_fsdp

log = logging.getLogger(__name__)


def packed_collator(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Packed rows are already full length: stack them; no attention mask, so transformers
    builds a block-diagonal mask from the restarting position ids."""
    import torch

    return {key: torch.tensor([row[key] for row in rows]) for key in ("input_ids", "labels", "position_ids")}


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return checkpoints[-1] if checkpoints else None


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true")


def distributed_state(config: TrainConfig) -> Any:
    """accelerate's process state, the one the Trainer will use: joins the process group when
    launched with several processes (torchrun / accelerate launch), a no-op for one. `cpu=True`
    on the CPU, else a CPU launch would be seen as one process."""
    from accelerate import PartialState

    return PartialState(cpu=on_cpu(), timeout=timedelta(seconds=config.train.ddp_timeout))


def device_map() -> Any:
    """One full 4-bit replica per GPU under DDP; none (CPU, or FSDP sharding) otherwise."""
    import torch
    from accelerate import PartialState

    if torch.cuda.is_available() and not on_cpu() and not uses_fsdp():
        return {"": PartialState().local_process_index}
    return None


def check_adapter(folder: Path, expected: int) -> None:
    """The saved adapter is whole: every LoRA tensor is there, none empty or non-finite. (A
    wrongly gathered FSDP adapter is saved without error and loads as a no-op.)"""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter_model.safetensors")
    lora = {k: v for k, v in tensors.items() if ".lora_A." in k or ".lora_B." in k}
    if len(lora) != expected or any(v.numel() == 0 or not torch.isfinite(v.float()).all() for v in lora.values()):
        raise RuntimeError(f"{folder}: the saved adapter has {len(lora)} usable LoRA tensors, expected {expected}")


def train(config: TrainConfig, resume: bool = True) -> Path:
    """Train the adapter on every process; returns its folder (output_dir/adapter), which is
    complete on every process when this returns."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    state = distributed_state(config)
    tokenizer = load_tokenizer(config.base_model)
    with state.main_process_first():  # tokenized once; the others load the main process's cache
        dataset, stats = prepare_dataset(config, tokenizer)
    set_seed(config.train.seed)  # the LoRA initialisation is random too: make runs repeatable
    model = load_qlora_model(config, device_map=device_map())
    t = config.train
    args = TrainingArguments(
        output_dir=str(config.output_dir),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=t.bf16,
        use_cpu=on_cpu(),
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        gradient_checkpointing=False,  # already enabled on the model (see training.model)
        include_num_input_tokens_seen=True,
        remove_unused_columns=False,
        report_to=[],
        ddp_find_unused_parameters=False,
        ddp_timeout=t.ddp_timeout,
    )
    collator = packed_collator if t.packing else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    # include_num_input_tokens_seen makes the Trainer log train_tokens_per_second.
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    if uses_fsdp() and not trainer.is_fsdp_enabled:
        raise RuntimeError("the model was prepared for FSDP but accelerate did not enable FSDP")
    checkpoint = latest_checkpoint(config.output_dir) if resume else None
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    log.info("trained on %d tokens in %.0f s", trainer.state.num_input_tokens_seen, time.perf_counter() - started)
    adapter = config.output_dir / "adapter"
    if trainer.is_fsdp_enabled:
        # Checkpoints stay sharded (fast, resumable); the adapter is gathered whole, to load
        # with PeftModel.from_pretrained and to merge (peft's FSDP guide).
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(adapter))  # every rank: a collective under FSDP; the main process writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(adapter)
        check_adapter(adapter, lora_tensor_count(trainer.accelerator.unwrap_model(trainer.model)))
        log.info("adapter saved in %s (%d examples, %d cut, %d dropped)", adapter, stats.examples, stats.truncated,
                 stats.dropped)
    trainer.accelerator.wait_for_everyone()  # nobody reads the adapter before it is complete
    # The main process may go on to merge and export: give the training memory back first.
    trainer.accelerator.free_memory()
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return adapter
