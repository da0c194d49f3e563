"""Reading a netns's TCP sockets with ``ss`` (an independent view: not our scanner)."""

from __future__ import annotations

import re

from halfclose.lab import netns
from halfclose.lab.model import SocketView

_USERS = re.compile(r'users:\(\("(?P<name>[^"]*)",pid=(?P<pid>\d+)')


def sockets(netns_name: str, *, processes: bool = False) -> list[SocketView]:
    """All TCP sockets of a netns (``ss -N <netns> -Htan[p]``)."""
    argv = ["ss", "-N", netns_name, "-H", "-t", "-a", "-n"]
    if processes:
        argv.append("-p")
    return parse(netns.run(argv, what=f"ss in netns {netns_name}"))


def parse(text: str) -> list[SocketView]:
    """Parse ``ss -Htan[p]`` output: State Recv-Q Send-Q Local Peer [users:(...)]."""
    views = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        users = _USERS.search(line)
        views.append(
            SocketView(
                state=fields[0],
                local=fields[3],
                peer=fields[4],
                process=users.group("name") if users else None,
                pid=int(users.group("pid")) if users else None,
            )
        )
    return views
