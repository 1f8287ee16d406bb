"""Roleplay, as pure functions and plain data: personas and SillyTavern character cards
(`personas`, `cards`, `lorebook`), several characters in one channel (`scenes`), swipes
(`swipes`), people's own personas (`user_personas`), the author's note (`author_note`),
long memory's prompts and state (`memory`) and attached text files (`attachments`).

May import `bot.core` only: no Discord, no SQL, no engine.
"""
