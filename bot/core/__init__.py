"""The pure core: plain data (`conversation`), the Alpaca prompt and its token budget
(`prompt`, which the trainer imports too), splitting replies for Discord (`replies`), when
to answer (`policy`), fair use (`fair_use`) and the validated settings (`settings`).

Imports nothing of the project: no Discord, no SQL, no llama.cpp; tested without any.
"""
