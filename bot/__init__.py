"""Hermes Discord bot: chat with a Nous-Hermes-Llama2 GGUF model in Discord channels."""
