"""Helpers shared by the command-line modules (cli, cli_lifecycle): output and store access."""


def human(size_bytes: int) -> str:
    """Bytes as a short human figure: '512 B', '1.5 MiB'."""
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def with_store(args, func):
    """Open args.store, run func(store), always close it."""
    from .store import Store
    store = Store.open(args.store)
    try:
        return func(store)
    finally:
        store.close()


def command_registry():
    """(COMMANDS, command): a CLI module's handlers by name, and the decorator that adds one."""
    commands: dict = {}

    def command(name: str):
        def register(func):
            commands[name] = func
            return func
        return register
    return commands, command
