"""The cyclic garbage collector, paused while a scan or a kill builds its objects.

A 20k-leak scan builds ~10 objects per socket (records, endpoints, findings,
dict entries), all acyclic, freed by reference counting.  With the collector
on, those allocations trigger collections that walk every tracked object, the
new ones included: measured at 20,000 leaks, the dump took 0.33-0.51 s with it
and 0.24-0.39 s without, pairing 0.26-0.42 s against 0.11-0.29 s.  Nothing
cyclic is created in between that could not wait for the next collection.
"""

from __future__ import annotations

import gc


class gc_paused:  # lower case: used like the function it was, ``with gc_paused():``
    """Disable the cyclic collector for the block; restore it as it was.

    A class rather than a ``contextlib.contextmanager``: the agent enters it
    once per scan of every netns (110 per node every 10 s), and a generator
    based manager costs ~5x more to enter and leave.  Nested blocks leave the
    collector as the outermost found it.
    """

    __slots__ = ("_was_enabled",)

    def __enter__(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self._was_enabled:
            gc.enable()
