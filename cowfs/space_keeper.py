"""Getting deleted data's space back while a volume stays mounted.

Deleting a file commits the end of its chunks' last references at once
(rule 4), but their bytes stay in the pack files until gc removes or
compacts those packs -- and gc leaves alone the pack a daemon appends to.
On a store that is full or nearly so, waiting for somebody to run
`cowfs gc` means writes keep failing after the DBA deleted what filled the
disk. So the mount daemon runs gc itself when

* a commit dropped the last reference of some chunk bytes while the store's
  filesystem has less than space.LOW_SPACE_FRACTION left, or
* a flush failed for lack of space (deleted data may wait for gc),

after closing its own pack (`Filesystem.release_pack`). gc runs as the
ordinary `cowfs gc` command in a child process: its own pack writer, its
own fully synced LMDB environment, the same crash safety as when a person
runs it. A gc that frees nothing is not repeated until something new is
freed or RETRY_AFTER_S has passed.
"""

import logging
import sys
import time

import trio

from .filesystem import Filesystem

log = logging.getLogger(__name__)

# Let a burst of deletions (DROP TABLE of many files) finish first.
SETTLE_S = 0.5
# A full disk with nothing newly freed: try gc again at most this often.
RETRY_AFTER_S = 30.0


class SpaceKeeper:
    def __init__(self, fs: Filesystem):
        self.fs = fs
        self._wake = trio.Event()
        self._freed_bytes = 0           # freed since the last gc started
        self._pressure = False          # a flush failed for space since then
        self._last_run = -RETRY_AFTER_S
        self.runs = 0                   # gc passes started (for `stats`)
        fs.on_space_freed = self.note

    def note(self, freed_bytes: int) -> None:
        """From the event loop: a commit freed `freed_bytes`, or (0) a flush
        failed for lack of space."""
        if freed_bytes:
            self._freed_bytes += freed_bytes
        else:
            self._pressure = True
        self._wake.set()

    def _due(self) -> bool:
        if self._freed_bytes and (self._pressure or self.fs.store.packs.space.low()):
            return True
        return self._pressure and time.monotonic() - self._last_run >= RETRY_AFTER_S

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(SETTLE_S)
            if self._due():
                await self._collect()

    async def _collect(self) -> None:
        self._freed_bytes, self._pressure = 0, False
        self._last_run = time.monotonic()
        self.runs += 1
        self.fs.release_pack()
        result = await trio.run_process(
            [sys.executable, "-m", "cowfs", "gc", self.fs.store.path],
            capture_stdout=True, capture_stderr=True, check=False)
        output = (result.stdout or result.stderr).decode(errors="replace").strip()
        log.info("space keeper: gc of %s exited %d: %s", self.fs.store.path, result.returncode, output)
        # Removed packs free their space once no read handle holds them.
        self.fs.store.packs.drop_unlinked()
