"""The bot's runtime must not import the training stack (torch and friends)."""

import subprocess
import sys


def test_bot_modules_do_not_import_torch() -> None:
    code = (
        "import sys, bot.edge.bot, bot.cli, bot.runtime, bot.terminal, bot.edge.cogs.chat, bot.edge.cogs.admin, "
        "bot.edge.cogs.personas, bot.engine.llama; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'accelerate') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
