"""The ``shoal`` command's commands, one module per noun; each registers itself on the typer
apps of :mod:`~shoal_cli.commands.common` when imported (:mod:`shoal_cli.cli` imports them all)."""
