"""Helpers shared by the command-line modules (cli, cli_lifecycle, cli_ops): output, store access, registration."""


def human(size_bytes: int) -> str:
    """Bytes as a short human figure: '512 B', '1.5 MiB'."""
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def with_store(args, func):
    """Open args.store, run func(store), always close it.

    First the intent logs of unmounted volumes are replayed (after a crash
    they may hold acknowledged writes not yet in LMDB): what a command shows
    or snapshots is then what applications were told is durable."""
    from .log_replay import replay_unmounted
    from .store import Store
    store = Store.open(args.store)
    try:
        replay_unmounted(store)
        return func(store)
    finally:
        store.close()


def command_registry(commands: dict):
    """A decorator `@_command("name")` that records its function in `commands`."""
    def command(name: str):
        def register(func):
            commands[name] = func
            return func
        return register
    return command
