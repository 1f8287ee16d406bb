"""From a question to the model and back, without Discord: the responder (history →
persona → prompt → engine, `responder`), the prompt assembled off the event loop
(`prompt_assembly`, shared with the training export `dataset_export`), long memory's
background summaries (`memory_keeper`) and the per-conversation lanes (`channel_queue`).

May import `bot.core`, `bot.roleplay`, `bot.storage` and `bot.engine`; never Discord.
"""
