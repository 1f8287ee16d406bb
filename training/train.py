"""QLoRA training with the transformers Trainer: checkpoints, resume after an interruption,
logged loss / learning rate / tokens per second, a progress bar (all the Trainer's own). Run it under
`accelerate launch` (configs in training/configs/accelerate/) for several GPUs."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.data import prepare_dataset
from training.model import load_qlora_model, load_tokenizer

log = logging.getLogger(__name__)


def packed_collator(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Packed rows are already full length: stack them; no attention mask, so transformers
    builds a block-diagonal mask from the restarting position ids."""
    import torch

    return {key: torch.tensor([row[key] for row in rows]) for key in ("input_ids", "labels", "position_ids")}


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return checkpoints[-1] if checkpoints else None


def device_map() -> Any:
    """One full 4-bit replica per GPU under DDP; none (CPU, or FSDP sharding) otherwise."""
    import torch
    from accelerate import PartialState

    state = PartialState()
    if torch.cuda.is_available() and state.distributed_type.name != "FSDP":
        return {"": state.local_process_index}
    return None


def train(config: TrainConfig, resume: bool = True) -> Path:
    """Train the adapter; returns its folder (output_dir/adapter)."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    tokenizer = load_tokenizer(config.base_model)
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
        use_cpu=not torch.cuda.is_available(),
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        gradient_checkpointing=False,  # already enabled by prepare_model_for_kbit_training
        include_num_input_tokens_seen=True,
        remove_unused_columns=False,
        report_to=[],
        ddp_find_unused_parameters=False,
    )
    collator = packed_collator if t.packing else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    # include_num_input_tokens_seen makes the Trainer log train_tokens_per_second.
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    checkpoint = latest_checkpoint(config.output_dir) if resume else None
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    log.info("trained on %d tokens in %.0f s", trainer.state.num_input_tokens_seen, time.perf_counter() - started)
    adapter = config.output_dir / "adapter"
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
    log.info("adapter saved in %s (%d examples, %d cut, %d dropped)", adapter, stats.examples, stats.truncated, stats.dropped)
    return adapter
