"""Language-model engines behind one interface (`base.Engine`): the batching engine
(`scheduler`), llama-cpp-python's one-sequence `Llama` (`llama`), a fleet of llama-servers
(`remote`), what they share (`common`), CPU weight repacking (`repack`) and where the GGUF
comes from (`model_source`).

May import `bot.core` only; independent of `bot.roleplay` and `bot.storage`.
"""
