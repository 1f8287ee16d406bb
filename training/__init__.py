"""The Hermes-style QLoRA trainer: data → train → merge → GGUF export → quantize.

Prompts are rendered with `bot.core.prompt.alpaca_prompt`, the bot's own template code, so the
model is served exactly as it was trained.
"""
