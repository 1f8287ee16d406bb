"""`python -m bot`: start the Discord bot, exactly as the `hermes-bot` console script does."""

import sys

from bot.cli import main

sys.exit(main(sys.argv[1:]))
