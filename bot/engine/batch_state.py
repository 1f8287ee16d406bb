"""What the batching engine's scheduler keeps (bot.engine.scheduler): a slot (one KV
sequence and the tokens evaluated into it), a job (one generation in a slot: its prompt,
sampler, text so far and drafts), and a pending model swap. Owned by the scheduler thread.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from bot.engine.base import Generation
from bot.engine.batch_context import BatchConfig, BatchContext
from bot.engine.lookup import Drafter
from bot.engine.text_stream import TextStream


@dataclass
class Swap:
    """For the scheduler: switch to `llama` once nothing is under way; `llama` None: only
    finish what is under way, then park (an unload-then-load swap)."""

    config: BatchConfig
    llama: BatchContext | None
    done: asyncio.Future[None]
    draft_fits: bool = True  # the draft model (if any) drafts for `llama` too


@dataclass
class Slot:
    seq: int
    conversation: str | None = None
    tokens: list[int] = field(default_factory=list)  # evaluated into this sequence's KV cache
    last_used: float = 0.0
    job: Job | None = None


@dataclass
class Job:
    generation: Generation
    tokens: list[int]  # the prompt
    sampler: Any
    slot: Slot
    text: TextStream  # the reply so far
    fed: int = 0  # prompt tokens evaluated so far
    next_token: int | None = None  # sampled, not yet evaluated
    produced: int = 0
    started: float = field(default_factory=time.perf_counter)
    first: float | None = None
    greedy: bool = False  # temperature 0, no penalty: argmax over the logits, no chain
    share_at: int | None = None  # save the slot's state for the prefix store at this many tokens
    drafter: Drafter | None = None  # its drafts: prompt lookup or a draft model (config.draft_tokens > 0)
