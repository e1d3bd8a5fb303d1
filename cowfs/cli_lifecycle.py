"""Command line of the snapshot lifecycle (policy, hold, release, diff, prune, scrub)."""

COMMANDS: dict = {}


def add_commands(sub) -> None:
    """Add the lifecycle commands to the top-level subparsers."""
