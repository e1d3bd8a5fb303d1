"""Command line of the PostgreSQL workflows (`cowfs pg ...`): parsing and output only."""

COMMANDS: dict = {}


def add_commands(sub) -> None:
    """Add the `pg` command and its subcommands to the top-level subparsers."""
