"""Hermes Discord bot: chat with a Nous-Hermes-Llama2 GGUF model in Discord channels.

Packages, lowest first (each imports only those below it; `tests/test_layers.py` checks):
`core` (plain data, the prompt, policy) → `roleplay` → `storage` | `engine` →
`lifecycle` (question → model → reply, no Discord) → `edge` (Discord) → the application
modules here: `runtime` (start and stop the parts), `service` (run the Discord bot),
`terminal` (chat in a terminal) and `cli` (`hermes-bot`).
"""
