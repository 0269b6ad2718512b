"""A TCP proxy that adds a fixed latency to every round trip: a stand-in for a database on another host.

    python benchmarks/delay_proxy.py --target 127.0.0.1:5432 --round-trip-ms 2 [--port 0]

Listens on 127.0.0.1 (`--port`, 0: a free one) and prints `listening <port>` on
stdout once it accepts connections. Every connection is forwarded to
`--target`; each chunk read from either side is written to the other side
`--round-trip-ms` / 2 after it was read, chunks of one direction in the order
they arrived, so a request and its reply together gain the full
`--round-trip-ms`. Bandwidth is not limited, and connecting is not delayed
(the systems measured keep pooled connections). Runs until SIGTERM or until
its stdin closes (the parent has gone).

Commands, one line each on stdin, each answered with one JSON line on stdout:

- `one-way-ms X`: hold every chunk X ms from now on (both directions, every
  connection): the caller calibrates with it, since the extra hop and the
  kernel's wake-ups (tens of µs in a VM) add to the delay asked for;
- `stats`: how late chunks were released since the last `stats`
  (`{"chunks": N, "p50_ms": ..., "p99_ms": ..., "max_ms": ...}`): the proxy's
  own scheduling delay, which a busy machine adds on top.

The event loop runs on `select()` (`epoll` waits in whole milliseconds, which
would round a 0.25 ms delay up to 1 ms), and the process asks the kernel for
no timer slack (50 µs by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import selectors
import signal
import sys
from collections import deque

#: How late each delayed chunk was released (seconds), since the last `stats`.
lateness: list[float] = []


class _Delay:
    """The one-way delay in seconds, shared by every connection (changed by `one-way-ms`)."""

    seconds = 0.0


class _Direction:
    """The chunks of one direction of one connection, each released `_Delay.seconds` after it was read."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.target: asyncio.Transport | None = None
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.timer: asyncio.TimerHandle | None = None

    def push(self, data: bytes | None) -> None:
        """Queue `data` (`None`: the source closed) for release after the delay."""
        if _Delay.seconds <= 0 and self.target is not None and not self.queue:
            self._deliver(data)
            return
        self.queue.append((self.loop.time() + _Delay.seconds, data))
        self._arm()

    def connect(self, target: asyncio.Transport) -> None:
        """Start delivering to `target` (what arrived before it was connected waits its turn)."""
        self.target = target
        self._arm()

    def _arm(self) -> None:
        if self.timer is None and self.target is not None and self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._release)

    def _release(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            when, data = self.queue.popleft()
            lateness.append(now - when)
            self._deliver(data)
        self._arm()

    def _deliver(self, data: bytes | None) -> None:
        assert self.target is not None
        if data is None:
            self.queue.clear()
            self.target.close()
        elif not self.target.is_closing():
            self.target.write(data)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Side(asyncio.Protocol):
    """One socket of a proxied connection: what it reads goes into `outgoing`; flow control follows its writes."""

    def __init__(self, outgoing: _Direction) -> None:
        self.outgoing = outgoing
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        self.outgoing.push(None)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.outgoing.push(None)

    # The other side cannot take more: stop reading what would be written to it.
    def pause_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer and self.peer.transport and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


async def serve(target_host: str, target_port: int, port: int, delay: float) -> None:
    """Accept connections until told to stop; each is forwarded to the target with `delay` seconds each way."""
    loop = asyncio.get_running_loop()
    _Delay.seconds = delay

    def accepted() -> _Side:
        upward = _Direction(loop)
        downward = _Direction(loop)
        client = _Side(upward)

        async def open_upstream() -> None:
            try:
                _, server = await loop.create_connection(lambda: _Side(downward), target_host, target_port)
            except OSError:
                if client.transport is not None:
                    client.transport.close()
                return
            assert isinstance(server, _Side) and server.transport is not None and client.transport is not None
            client.peer, server.peer = server, client
            upward.connect(server.transport)
            downward.connect(client.transport)

        loop.create_task(open_upstream())
        return client

    listener = await loop.create_server(accepted, "127.0.0.1", port)
    print(f"listening {listener.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def commands() -> None:
        while line := await stdin.readline():
            command, _, value = line.decode().strip().partition(" ")
            if command == "stats":
                print(json.dumps(_stats()), flush=True)
            elif command == "one-way-ms":
                _Delay.seconds = max(0.0, float(value)) / 1e3
                print(json.dumps({"one_way_ms": _Delay.seconds * 1e3}), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
        stop.set()  # stdin closed: the parent has gone

    watcher = loop.create_task(commands())
    await stop.wait()
    watcher.cancel()
    listener.close()


def _stats() -> dict[str, float]:
    """Release lateness since the last call, in ms; resets it."""
    ordered = sorted(lateness)
    lateness.clear()
    if not ordered:
        return {"chunks": 0}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    return {"chunks": len(ordered), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": ordered[-1] * 1e3}


def _no_timer_slack() -> None:
    """Ask the kernel to wake this process on time rather than up to 50 µs late (Linux; ignored elsewhere)."""
    try:
        with open("/proc/self/timerslack_ns", "w") as slack:
            slack.write("1")
    except OSError:
        pass


def main() -> None:
    """Parse the options and proxy until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--round-trip-ms", type=float, required=True, help="added to each round trip (half each way)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on, 127.0.0.1 (default: a free one)")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    _no_timer_slack()
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(serve(host.strip("[]"), int(port), args.port, args.round_trip_ms / 2e3))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
