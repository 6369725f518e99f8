"""Replicas on one machine: the worker processes of one BentoML server, each its own copy of the model.

BentoML starts worker ``i`` (1-based) as a process whose command line carries ``--fd N --worker-id i``,
every worker accepting on the one listening socket its arbiter opened (``--fd``).
Two things make them replicas rather than contenders:

- **CPUs:** each worker narrows itself to its own share of the server's CPUs (``replica_cpus``) before
  its runtime starts any thread.
- **Connections:** on a shared socket the first worker to wake accepts every pending connection, and
  keep-alive clients then stay with it: 8 closed-loop connections all went to one of two workers
  (4.06 CPU-seconds against 0.01). So the socket joins an ``SO_REUSEPORT`` group, worker 1 keeps it
  and every other worker listens on a socket of its own bound to the same address; the kernel then
  spreads new connections over the group by their address hash, as a Kubernetes Service spreads them
  over pods.
"""

from __future__ import annotations

import os
import socket
import sys

from optiserve.config import replica_cpus


def _arg(name: str) -> int | None:
    argv = sys.argv
    return int(argv[argv.index(name) + 1]) if name in argv[:-1] else None


def become_replica(replicas: int) -> None:
    """In a BentoML worker process of a server with ``replicas`` > 1: pin it and give it its own
    listening socket. Elsewhere (the arbiter, one replica): nothing."""
    worker, fd = _arg("--worker-id"), _arg("--fd")
    if replicas < 2 or worker is None:
        return
    cpus = replica_cpus(os.sched_getaffinity(0), replicas, (worker - 1) % replicas)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    if fd is not None:
        _own_listener(fd, worker, _arg("--backlog") or 2048)


def _own_listener(fd: int, worker: int, backlog: int) -> None:
    shared = socket.socket(fileno=os.dup(fd))
    try:
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if worker == 1:
            return
        own = socket.socket(shared.family, socket.SOCK_STREAM)
        try:
            for option in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):  # as the shared socket has them
                own.setsockopt(socket.SOL_SOCKET, option, shared.getsockopt(socket.SOL_SOCKET, option))
            own.bind(shared.getsockname())
            own.listen(backlog)
            os.dup2(own.fileno(), fd)  # uvicorn serves whatever --fd names
        finally:
            own.close()
    finally:
        shared.close()
