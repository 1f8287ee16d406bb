"""The `hermes-bot` command: run the Discord bot, chat in the terminal, manage the database
and the model.

    hermes-bot [run]                 start the Discord bot (same as `python -m bot`)
    hermes-bot chat [--persona NAME] talk to the model in the terminal, no Discord needed
    hermes-bot db upgrade|downgrade REV|current
    hermes-bot download              fetch MODEL_REPO/MODEL_FILE into the hub cache
    hermes-bot export-dataset OUT.jsonl  opted-in channels → Alpaca records for hermes-train
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bot.core.settings import Settings, SettingsError, load_settings

log = logging.getLogger("bot")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hermes-bot", description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", default=".env", help="settings file (default: .env)")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="start the Discord bot")
    chat = commands.add_parser("chat", help="chat with the model in the terminal")
    chat.add_argument("--persona", help="persona name (see personas/)")
    chat.add_argument("--session", default="default", help="conversation name (kept across runs)")
    db = commands.add_parser("db", help="database migrations")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply all migrations")
    down = db_commands.add_parser("downgrade", help="revert to a revision")
    down.add_argument("revision", help="e.g. -1, or base")
    db_commands.add_parser("current", help="show the database's revision")
    commands.add_parser("download", help="download the configured model into the hub cache")
    export = commands.add_parser("export-dataset", help="write opted-in channels as Alpaca records (JSON Lines)")
    export.add_argument("out", type=Path, help="the .jsonl file to write")
    export.add_argument("--tokenizer", type=Path,
                        help="a .gguf whose vocabulary counts tokens (default: MODEL_PATH if set, else an estimate)")
    return parser


async def _chat(settings: Settings, persona: str | None, session: str) -> None:
    from bot.runtime import open_runtime
    from bot.terminal import chat

    async with open_runtime(settings) as responder:
        if persona is not None:
            found = responder.find_persona(persona)
            if found is None:
                raise SettingsError(f"--persona {persona!r}: not found in {settings.personas_dir}")
            await responder.store.set_persona(f"terminal:{session}", found)
        await chat(responder, session=session)


async def _export_dataset(settings: Settings, out: Path, tokenizer: Path | None) -> None:
    from bot.lifecycle.dataset_export import PromptLimits, export_dataset
    from bot.roleplay.personas import load_personas, merge_imported
    from bot.storage.store import Store

    count_tokens, close = _token_counter(tokenizer or settings.model_path)
    store = await Store.open(settings.database_url)
    try:
        personas = merge_imported(load_personas(settings.personas_dir), await store.imported_personas())
        limits = PromptLimits(settings.n_ctx, settings.max_new_tokens, settings.history_limit)
        with _progress() as progress:
            stats = await export_dataset(store, personas, out, count_tokens, limits, progress)
    finally:
        await store.close()
        close()
    print(f"{out}: {stats.records} records from {stats.conversations} conversations")


def _token_counter(gguf: Path | None) -> tuple[Callable[[str], int], Callable[[], None]]:
    """The model's own token count (its GGUF vocabulary), else about four characters a token."""
    if gguf is not None and gguf.is_file():
        from bot.engine.vocab import VocabTokenizer

        vocab = VocabTokenizer(gguf)
        return lambda text: len(vocab.tokenize(text)), vocab.close
    log.warning("no tokenizer (--tokenizer or MODEL_PATH): token counts are estimated at 4 characters a token")
    return lambda text: len(text) // 4 + 2, lambda: None


@contextmanager
def _progress() -> Iterator[Callable[[int], object]]:
    """A records counter on the terminal (tqdm, when installed), else nothing."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield lambda n: None
        return
    with tqdm(unit=" records", disable=not sys.stderr.isatty()) as bar:
        yield bar.update


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(dotenv_path=args.env_file)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from bot.engine.base import ModelLoadError

    try:
        if args.command == "chat":
            asyncio.run(_chat(settings, args.persona, args.session))
        elif args.command == "db":
            from bot.storage import migrate

            if args.db_command == "upgrade":
                migrate.upgrade(settings.database_url)
            elif args.db_command == "downgrade":
                migrate.downgrade(settings.database_url, args.revision)
            else:
                migrate.current(settings.database_url)
        elif args.command == "export-dataset":
            asyncio.run(_export_dataset(settings, args.out, args.tokenizer))
        elif args.command == "download":
            from bot.engine.model_source import configured_model

            print(configured_model(settings))
        else:
            from bot.service import run

            run(settings)
    except (SettingsError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
