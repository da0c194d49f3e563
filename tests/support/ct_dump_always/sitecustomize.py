"""Every Python process started with this folder on PYTHONPATH answers part 3 by dump.

For running the proof's real-kernel tests (which drive the CLI in subprocesses)
with ``Conntrack.lookup_sockets`` forced onto its dump path, whatever the count:

    PYTHONPATH=tests/support/ct_dump_always .venv/bin/pytest tests/integration/test_proof_*.py

The kill's re-check is not affected: it always asks by GET (engine/kill.py).
"""

from halfclose.agent.kernel import conntrack

conntrack.FORCE_DUMP = True

# With HALFCLOSE_TEST_CT_DUMP_LOG=FILE each dump-path answer appends a line
# there, so a run can show the dump path really answered.
_log = __import__("os").environ.get("HALFCLOSE_TEST_CT_DUMP_LOG")
if _log:
    _real = conntrack.Conntrack.lookup_sockets_dump

    def _logged(self, sockets):  # type: ignore[no-untyped-def]
        with open(_log, "a") as f:
            f.write(f"dump {len(sockets)}\n")
        return _real(self, sockets)

    conntrack.Conntrack.lookup_sockets_dump = _logged  # type: ignore[method-assign]
