"""Expert parallelism over MLX distributed: a layer's routed experts read and computed by several hosts.

Launched by ``mlx.launch -n N [--hosts ...] -- moestream generate|chat|eval|bench|serve PACK ...`` (or
a script calling :func:`~moestream.runtime.load`), every rank opens the same pack from its own disk.
Rank 0 runs the model: tokenizer, attention, sampling, the server. At each MoE layer it sends the
layer's input and the router's choice to the other ranks, which are expert workers (:func:`follow`);
every rank reads and computes its share of the routed experts (:meth:`Share.mine`: the sorted unique
experts, every N-th, the first rank turning with the layer), leaves the other slots zero, and one
``all_sum`` of the ``[..., k, H]`` expert outputs gives each slot its value. Each slot has one
non-zero contribution, so the sum is exact in any dtype: the same numbers as one process.

Rank 0 sends each layer's input instead of every rank running the whole model in step because then
the other ranks hold no KV cache, sampler or request state (serve's prompt cache, cancellation and
per-request K stay rank 0's), and ranks whose non-expert arithmetic differs in a last bit (different
chips) cannot disagree about the routing. It costs a second small collective per layer.

Failure: every collective runs under a watchdog (:data:`TIMEOUT` seconds; longer for the first
forward of each kind after a load, while the kernels compile): when it expires the rank reports one
line naming the ranks it waited for and exits. A rank whose process ends closes its connections, so
the others stop at once, naming it. A follower waiting between forwards has no deadline (a server
may idle for hours); the ring's sockets get TCP keepalive so that a host that vanishes is noticed by
the kernel within seconds.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
from typing import Callable

import mlx.core as mx
import numpy as np

from moestream.layouts.errors import MoestreamError

log = logging.getLogger(__name__)

TIMEOUT = float(os.environ.get("MOESTREAM_DIST_TIMEOUT", "30"))  # seconds a collective may wait
FIRST_TIMEOUT = float(os.environ.get("MOESTREAM_DIST_FIRST_TIMEOUT", "300"))  # first forwards: kernels compile
JOIN_TIMEOUT = float(os.environ.get("MOESTREAM_DIST_JOIN_TIMEOUT", "120"))  # every rank started and connected
LOAD_TIMEOUT = float(os.environ.get("MOESTREAM_DIST_LOAD_TIMEOUT", "900"))  # every rank opened the pack

# A message from rank 0: a header of _HEAD float32 values, then (inline when it fits) its body.
_HEAD = 16
OP_LOAD, OP_LAYER, OP_CLOSE, OP_CALL, OP_EXIT = 1, 2, 3, 4, 5
F_OP, F_SEQ, F_LAYER, F_PATH, F_DTYPE, F_NDIM, F_DIMS, F_LEN, F_APART, F_BYTES = 0, 1, 2, 3, 4, 5, 6, 11, 12, 13
_MAXDIM = 5  # F_DIMS .. F_DIMS + 4
_DTYPES = [mx.float32, mx.bfloat16, mx.float16]
_COUNTERS = 5  # per rank in a layer's result: bytes read (2 floats), reads (2 floats), failed
_SPLIT = float(1 << 24)  # a counter as two float32 values, each exact below 2**24


class DistributedError(MoestreamError):
    """A rank of the group failed, vanished or fell out of step (one line naming it)."""


def _report_default(line: str) -> None:
    log.error("%s", line)


_report: Callable[[str], None] = _report_default


def set_reporter(fn: Callable[[str], None]) -> None:
    """Where the watchdog's one line goes before the process exits (the CLI prints it as its errors)."""
    global _report
    _report = fn


def _one_line(e: BaseException) -> str:
    if isinstance(e, MoestreamError):
        return str(e)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}{': ' + first if first else ''}"


class _Watchdog:
    """One thread per process: when an armed deadline passes, report ``line()`` and exit (a collective
    blocked inside MLX cannot be interrupted any other way)."""

    def __init__(self):
        self._deadline: float | None = None
        self._line: Callable[[], str] = str
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, line: Callable[[], str]) -> None:
        self._line = line
        self._deadline = time.monotonic() + seconds
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moestream-watchdog", daemon=True)
            self._thread.start()

    def disarm(self) -> None:
        self._deadline = None

    def _run(self) -> None:
        while True:
            time.sleep(0.1)
            d = self._deadline
            if d is not None and time.monotonic() > d:
                try:
                    _report(self._line())
                finally:
                    logging.shutdown()
                    os._exit(1)


def _addresses() -> list[list[tuple[str, int]]]:
    """Each rank's ring addresses from mlx.launch's hostfile (ring backend); [] for other backends."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return []
    try:
        with open(path) as f:
            text = f.read().strip()
        ranks = json.loads(text) if text else []
        return [[(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in r] for r in ranks]
    except (OSError, ValueError, IndexError):
        return []


def _own_sockets():
    """(fd, socket) for each TCP socket of this process, as a duplicate (closing it leaves the original)."""
    try:
        fds = [int(f) for f in os.listdir("/dev/fd")]
    except OSError:
        return
    for fd in fds:
        try:
            dup = os.dup(fd)
        except OSError:
            continue
        try:
            s = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6):
            yield s
        else:
            s.close()


_ESTABLISHED = {"linux": (getattr(socket, "TCP_INFO", None), 1), "darwin": (0x106, 4)}  # TCP_CONNECTION_INFO


def _peer_closed(s: socket.socket) -> bool:
    """Whether the other end closed ``s``: from the TCP state where the platform tells it (bytes the
    peer sent before it died may still wait unread, so a peek alone cannot tell), else a peek."""
    opt, established = _ESTABLISHED.get("linux" if sys.platform.startswith("linux") else sys.platform, (None, 0))
    if opt is not None:
        try:
            return s.getsockopt(socket.IPPROTO_TCP, opt, 256)[0] != established
        except OSError:
            pass
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _ring(addresses: list, rank: int) -> list[tuple[int, socket.socket]]:
    """This rank's ring connections as (peer rank, socket): it connects to rank + 1's address and
    accepts rank - 1's connection on its own (the ring backend's layout)."""
    if not addresses:
        return []
    n = len(addresses)
    right, left = (rank + 1) % n, (rank - 1) % n
    mine, theirs = set(addresses[rank]), set(addresses[right])
    out, seen = [], set()
    for s in _own_sockets():
        try:
            peer, me = tuple(s.getpeername()[:2]), tuple(s.getsockname()[:2])
        except OSError:
            s.close()
            continue
        if (peer, me) in seen:  # a duplicate (the ones kept to wait on)
            s.close()
            continue
        seen.add((peer, me))
        if peer in theirs:
            out.append((right, s))
        elif me in mine:
            out.append((left, s))
        else:
            s.close()
    return out


class Group:
    """The ranks of one ``mlx.launch``: names, timed collectives, and rank 0's messages."""

    def __init__(self, group, addresses: list, dog: _Watchdog):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.addresses = addresses if len(addresses) == self.size else []
        self.names = [self._address(r) for r in range(self.size)]
        self.broken: str | None = None
        self.seq = 0
        self.msg_size = _HEAD  # floats in a message from rank 0 (a runtime open: room for a token's input)
        self.driver = None  # rank 0: the open expert-parallel runtime's Share
        self._dog = dog
        # duplicates of the ring's sockets, with the rank at their other end, taken when the group
        # formed: to wait on, and to tell which rank went (after a reset a socket no longer names its peer)
        self._sockets: list[tuple[int, socket.socket]] = []

    # -- names -----------------------------------------------------------------------------------
    def _address(self, r: int) -> str:
        return self.addresses[r][0][0] if self.addresses else "?"

    def name(self, r: int) -> str:
        return f"rank {r} ({self.names[r]})"

    def _introduce(self) -> None:
        """Every rank's host name, for the lines that name a rank."""
        host = socket.gethostname().encode()[:63]
        got = self.gather(host, "the first exchange", JOIN_TIMEOUT)
        for r, h in enumerate(got):
            a = self._address(r)
            h = h.decode(errors="replace")
            self.names[r] = h if a in ("?", h) else f"{h}, {a}"

    def _ring(self) -> list[tuple[int, socket.socket]]:
        return _ring(self.addresses, self.rank)

    def _closed_peers(self) -> list[int]:
        """Ranks whose connection to this one was closed (their process ended)."""
        return sorted({r for r, s in self._sockets if _peer_closed(s)})

    def _keepalive(self) -> None:
        """TCP keepalive on the ring's sockets: a host that vanishes while the ranks idle (a server
        between requests) is noticed by the kernel within seconds, and the waiting collective fails.
        The duplicates are kept to wait on (:meth:`receive`)."""
        for r, s in self._ring():
            self._sockets.append((r, s))
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                idle = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))  # macOS: KEEPALIVE
                for opt, v in ((idle, 5), (getattr(socket, "TCP_KEEPINTVL", None), 2)):
                    if opt is not None:
                        s.setsockopt(socket.IPPROTO_TCP, opt, v)
                if hasattr(socket, "TCP_KEEPCNT"):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
            except OSError as e:
                log.debug("keepalive not set on a ring socket: %s", e)

    def _others(self) -> str:
        others = [r for r in range(self.size) if r != self.rank]
        return self.name(others[0]) if len(others) == 1 else "any of " + ", ".join(self.name(r) for r in others)

    def _lost(self, what: str) -> str:
        peers = self._closed_peers() or ([1 - self.rank] if self.size == 2 else [])
        who = " and ".join(self.name(r) for r in peers) if peers else "a rank of the group"
        why = "connection broken: its process ended or its host became unreachable"
        return f"{self.name(self.rank)}: lost {who} ({why}) during {what}; stopping"

    def _late(self, what: str, seconds: float) -> str:
        return (
            f"{self.name(self.rank)}: no answer from {self._others()} within {seconds:.0f} s during {what} "
            "(stopped, hung or unreachable); stopping"
        )

    # -- collectives -----------------------------------------------------------------------------
    def fail(self, line: str):
        self.broken = line
        raise DistributedError(line)

    def _run(self, make: Callable[[], mx.array], what: str, timeout: float | None) -> mx.array:
        if self.broken:
            raise DistributedError(self.broken)
        if timeout is not None:
            self._dog.arm(timeout, lambda: self._late(what, timeout))
        try:
            y = make()
            mx.eval(y)
            return y
        except RuntimeError as e:
            if "[ring]" not in str(e) and "distributed" not in str(e).lower() and "peer" not in str(e):
                raise
            self.fail(self._lost(what))
        finally:
            self._dog.disarm()

    def all_sum(self, a: mx.array, what: str, timeout: float | None = TIMEOUT) -> mx.array:
        return self._run(lambda: mx.distributed.all_sum(a, group=self.group, stream=mx.cpu), what, timeout)

    def all_gather(self, a: mx.array, what: str, timeout: float | None = TIMEOUT) -> mx.array:
        return self._run(lambda: mx.distributed.all_gather(a, group=self.group, stream=mx.cpu), what, timeout)

    def gather(self, data: bytes, what: str, timeout: float | None = TIMEOUT) -> list[bytes]:
        """Every rank's ``data`` (any length), in rank order, on every rank."""
        sizes = np.array(self.all_gather(mx.array([len(data)], mx.int32), what, timeout)).tolist()
        buf = np.zeros(max(1, *sizes), np.uint8)
        buf[: len(data)] = np.frombuffer(data, np.uint8)
        got = np.array(self.all_gather(mx.array(buf), what, timeout)).reshape(self.size, -1)
        return [got[r, : sizes[r]].tobytes() for r in range(self.size)]

    def gather_objects(self, obj, what: str, timeout: float | None = TIMEOUT) -> list:
        return [pickle.loads(b) for b in self.gather(pickle.dumps(obj), what, timeout)]

    # -- rank 0's messages -------------------------------------------------------------------------
    def post(
        self, op: int, body: np.ndarray | None = None, data: bytes | None = None, timeout=TIMEOUT, **fields
    ) -> None:
        """Rank 0: a message to every other rank (an all_sum to which they add zeros)."""
        self.seq += 1
        msg = np.zeros(self.msg_size, np.float32)
        msg[F_OP], msg[F_SEQ] = op, self.seq % (1 << 24)
        for k, v in fields.items():
            if k == "dims":
                msg[F_NDIM] = len(v)
                msg[F_DIMS : F_DIMS + len(v)] = v
            else:
                msg[{"layer": F_LAYER, "path": F_PATH, "dtype": F_DTYPE}[k]] = v
        n = 0 if body is None else body.size
        apart = n > self.msg_size - _HEAD
        msg[F_LEN], msg[F_APART], msg[F_BYTES] = n, apart, len(data or b"")
        if n and not apart:
            msg[_HEAD : _HEAD + n] = body.reshape(-1)
        what = _OP_NAMES[op] if op != OP_LAYER else f"layer {int(msg[F_LAYER])}'s input"
        self.all_sum(mx.array(msg), what, timeout)
        if apart:
            self.all_sum(mx.array(body.reshape(-1)), what, timeout)
        if data:
            self.all_sum(mx.array(np.frombuffer(data, np.uint8)), what, timeout)

    def receive(self, timeout: float | None) -> tuple[np.ndarray, np.ndarray, bytes]:
        """Another rank: rank 0's next message, (header, body, bytes)."""
        what = "the wait for rank 0's next message"
        if self._sockets and not self.broken:
            # MLX's ring polls its sockets without pause while a collective waits: wait here for rank
            # 0's first bytes instead, so that an idle rank takes no CPU (rank 0 always sends first)
            if timeout is not None:
                self._dog.arm(timeout, lambda: self._late(what, timeout))
            try:
                select.select([s for _, s in self._sockets], [], [])
            finally:
                self._dog.disarm()
        msg = np.array(self.all_sum(mx.zeros(self.msg_size, mx.float32), what, timeout))
        self.seq += 1
        if int(msg[F_SEQ]) != self.seq % (1 << 24) or int(msg[F_OP]) not in _OP_NAMES:
            self.fail(f"{self.name(self.rank)}: out of step with rank 0 (message {self.seq}); stopping")
        n, nbytes = int(msg[F_LEN]), int(msg[F_BYTES])
        if msg[F_APART]:
            body = np.array(self.all_sum(mx.zeros(n, mx.float32), what, TIMEOUT))
        else:
            body = msg[_HEAD : _HEAD + n]
        data = b""
        if nbytes:
            data = np.array(self.all_sum(mx.zeros(nbytes, mx.uint8), what, TIMEOUT)).tobytes()
        return msg[:_HEAD], body, data

    def every_rank(self, module: str, name: str, args: list[tuple]) -> list:
        """Rank 0: call ``module.name(*args[r])`` on every rank r at once (each on its own disk: bench's
        probe); the results in rank order. The other ranks import ``module`` by name when asked (so
        no module of the runtime imports the commands that use this)."""
        self.post(OP_CALL, data=pickle.dumps((module, name, args)))
        return _results(self, _call(module, name, args[0]), f"{module}.{name} on every rank")

    def finish(self) -> None:
        """Rank 0, at exit: close the open runtime and let the other ranks end."""
        if self.broken or self.rank != 0:
            return
        try:
            if self.driver is not None:
                self.driver.close()
            self.post(OP_EXIT, timeout=10)
        except DistributedError:
            pass


_OP_NAMES = {OP_LOAD: "loading", OP_LAYER: "a layer", OP_CLOSE: "closing", OP_CALL: "a call", OP_EXIT: "the exit"}


def _call(module: str, name: str, args: tuple):
    import importlib

    if not module.startswith("moestream."):
        return ("error", f"{module}.{name}: not a moestream function")
    try:
        return ("ok", getattr(importlib.import_module(module), name)(*args))
    except Exception as e:
        return ("error", _one_line(e))


def _results(group: Group, mine, what: str, timeout: float = LOAD_TIMEOUT) -> list:
    got = group.gather_objects(mine, what, timeout)
    for r, (status, value) in enumerate(got):
        if status == "error" and group.rank == 0:
            raise DistributedError(f"{group.name(r)}: {value}")
    return [value for _, value in got]


_WORLD: Group | None | bool = False  # False: not looked for yet


def world() -> Group | None:
    """The group this process was launched in (``mlx.launch``), joined on first use; None when it
    runs alone. Joining waits for every rank (:data:`JOIN_TIMEOUT`)."""
    global _WORLD
    if _WORLD is False:
        _WORLD = _join()
    return _WORLD


def launched() -> bool:
    """Whether this process was started by ``mlx.launch`` (or mpirun) with other ranks."""
    return "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ


def _join() -> Group | None:
    if not launched():
        return None
    addresses = _addresses()
    rank = int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    dog = _Watchdog()
    t0 = time.monotonic()

    def line() -> str:
        waited = time.monotonic() - t0
        if not addresses:
            return f"rank {rank}: the group did not form within {waited:.0f} s; stopping"
        n = len(addresses)
        seen = set()
        for r, s in _ring(addresses, rank):
            seen.add(r)
            s.close()
        missing = [r for r in ((rank + 1) % n, (rank - 1) % n) if r not in seen]
        who = ", ".join(f"rank {r} ({addresses[r][0][0]}:{addresses[r][0][1]})" for r in sorted(set(missing)))
        return (
            f"rank {rank} ({addresses[rank][0][0]}): {who or 'a rank'} did not join within {waited:.0f} s "
            "(not started, or unreachable); stopping"
        )

    # MLX's init holds the GIL while it waits (no watchdog thread can run): an alarm interrupts its
    # accept instead (main thread only); a rank that cannot connect is given up by MLX itself.
    main = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if main:

        def alarm(*_):
            raise DistributedError(line())

        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, JOIN_TIMEOUT)
    try:
        g = mx.distributed.init()
    except RuntimeError:
        raise DistributedError(line()) from None
    finally:
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    if g.size() == 1:
        return None
    group = Group(g, addresses, dog)
    group._introduce()
    group._keepalive()
    if group.rank == 0:
        atexit.register(group.finish)
    log.info("expert parallel: %s of %d", group.name(group.rank), group.size)
    return group


class _Solo:
    """What mlx-lm's server sees of the group on rank 0: one process (the ranks' traffic is ours)."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1


def solo_group() -> _Solo:
    return _Solo()


# -- the share of each layer's experts -----------------------------------------------------------------
class Share:
    """What a rank's streamed MoE layers call (``switch.parallel``): :meth:`share` the experts this rank
    computes (rank 0 first sends the layer's input), :meth:`summed` the outputs of every rank.

    ``hidden``: the model's hidden size; ``experts``: per layer; ``layers``: the MoE layers in order.
    """

    def __init__(self, group: Group, store, hidden: int, experts: int, layers: list[int]):
        self.group, self.store = group, store
        self.hidden, self.experts = hidden, experts
        self.first, self.last = layers[0], layers[-1]
        self.warm: set[bool] = set()  # kinds of forward (one token or several) done once since the load
        self._open: tuple | None = None  # (layer, tokens) between share() and summed()
        n = group.size
        self.decode_bytes = np.zeros(n)  # per rank: expert bytes read in one-token forwards
        self.prefill_bytes = np.zeros(n)
        self.decode_tokens = 0
        self._seen = np.zeros(n)  # per rank: bytes read when the last layer's result came

    @property
    def message_size(self) -> int:
        """A message's floats while this runtime is open: a header and one token's layer input."""
        return _HEAD + self.experts + self.hidden

    def timeout(self, tokens: int) -> float:
        return TIMEOUT if (tokens == 1) in self.warm else FIRST_TIMEOUT

    def mine(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """This rank's share of ``experts`` (sorted, unique): every N-th, starting at a rank that turns
        with the layer so that no rank takes the odd one out in every layer."""
        n = self.group.size
        return experts[(self.group.rank - layer) % n :: n]

    def share(self, layer: int, x, inds: np.ndarray, experts: np.ndarray) -> np.ndarray:
        tokens = inds.size // inds.shape[-1]
        if self.group.rank == 0:
            numpy_path = isinstance(x, np.ndarray)
            xs = x if numpy_path else np.array(x.astype(mx.float32))
            body = np.concatenate([inds.reshape(-1).astype(np.float32), xs.reshape(-1).astype(np.float32)])
            dtype = 0 if numpy_path else _DTYPES.index(x.dtype) if x.dtype in _DTYPES else 0
            self.group.post(
                OP_LAYER, body, timeout=self.timeout(tokens), layer=layer, path=int(numpy_path), dtype=dtype,
                dims=inds.shape,
            )  # fmt: skip
        self._open = (layer, tokens)
        return self.mine(layer, experts)

    def _counters(self, failed: bool = False) -> np.ndarray:
        c = np.zeros(_COUNTERS * self.group.size, np.float32)
        s = self.store.stats
        i = _COUNTERS * self.group.rank
        c[i : i + 4] = divmod(s.bytes_read, _SPLIT) + divmod(s.reads, _SPLIT)
        c[i + 4] = failed
        return c

    def summed(self, out, x, inds):
        """Rank 0: every rank's outputs summed (one all_sum, with the ranks' read counters). Another
        rank: its own outputs, as they are (:func:`follow` sends them)."""
        shape = (*inds.shape, self.hidden)
        if out is None:  # nothing of this layer routed to this rank (MLX path)
            out = mx.zeros(shape, x.dtype if isinstance(x, mx.array) else mx.float32)
        if self.group.rank != 0:
            return out
        layer, tokens = self._open
        flat = out.reshape(-1) if isinstance(out, np.ndarray) else np.array(out.astype(mx.float32)).reshape(-1)
        res = self.exchange(flat, layer, tokens)
        y = res[: flat.size].reshape(out.shape)
        return y if isinstance(out, np.ndarray) else mx.array(y).astype(out.dtype)

    def exchange(self, flat: np.ndarray, layer: int, tokens: int, failed: str | None = None) -> np.ndarray:
        """This rank's part of a layer's all_sum; on rank 0, the counters are taken and a rank's
        failure is raised."""
        msg = mx.array(np.concatenate([flat.astype(np.float32), self._counters(failed is not None)]))
        res = np.array(self.all_sum_layer(msg, layer, tokens))
        self._open = None
        c = res[flat.size :].reshape(self.group.size, _COUNTERS)
        if c[:, 4].any():
            errors = self.group.gather_objects(failed, f"layer {layer}'s error report")
            bad = int(np.flatnonzero(c[:, 4])[0])
            if self.group.rank == 0:
                raise DistributedError(f"{self.group.name(bad)}: {errors[bad]} (layer {layer})")
        if self.group.rank == 0:
            total = c[:, 0] * _SPLIT + c[:, 1]
            delta, self._seen = total - self._seen, total
            if tokens == 1:
                self.decode_bytes += delta
                self.decode_tokens += layer == self.first
            else:
                self.prefill_bytes += delta
        if layer == self.last:
            self.warm.add(tokens == 1)
        return res

    def all_sum_layer(self, msg: mx.array, layer: int, tokens: int) -> mx.array:
        return self.group.all_sum(msg, f"layer {layer}'s expert all-sum", self.timeout(tokens))

    def figures(self) -> dict:
        """Rank 0: per rank, the expert bytes read in one-token forwards and in prefill so far."""
        return {
            "ranks": self.group.size,
            "hosts": list(self.group.names),
            "decode_bytes": self.decode_bytes.tolist(),
            "prefill_bytes": self.prefill_bytes.tolist(),
            "decode_tokens": int(self.decode_tokens),
        }

    def close(self) -> None:
        """Rank 0: the other ranks close their runtimes too (not after a failure: the group is out of step)."""
        g = self.group
        if g.driver is self:
            g.driver = None
            if self._open is not None and not g.broken:
                g.broken = f"{g.name(0)}: stopped inside layer {self._open[0]}; the group is out of step"
            if not g.broken:
                g.post(OP_CLOSE)
            g.msg_size = _HEAD


def attach(switch, share: Share) -> None:
    """Make a streamed MoE layer compute ``share``'s part of its experts and sum the ranks' outputs."""
    cls = type(switch)
    if cls not in _SUMMING:

        def __call__(self, x, indices):
            return self.parallel.summed(cls.__call__(self, x, indices), x, indices)

        def decode_numpy(self, xs, inds, overlap):
            return self.parallel.summed(cls.decode_numpy(self, xs, inds, overlap), xs, inds)

        _SUMMING[cls] = type(
            f"ExpertParallel{cls.__name__}",
            (cls,),
            {"__call__": __call__, "decode_numpy": decode_numpy, "__module__": cls.__module__},
        )
    switch.__class__ = _SUMMING[cls]
    switch.parallel = share


_SUMMING: dict[type, type] = {}


# -- loading, on every rank ----------------------------------------------------------------------------
def drive_load(group: Group, path, options, load_here: Callable) -> object:
    """Rank 0: open ``path`` on every rank (each on its own disk, all at once), then return this
    rank's runtime. ``load_here(make_share)`` loads it here."""
    if group.driver is not None:
        raise DistributedError(
            "an expert-parallel runtime is already open: close it first (or load with expert_parallel=False)"
        )
    group.post(OP_LOAD, data=pickle.dumps((str(path), options)))
    rt, err = None, None
    try:
        rt = load_here(lambda store, hidden, experts, layers: Share(group, store, hidden, experts, layers))
    except Exception as e:
        err = e
    got = group.gather_objects(("ok", None) if err is None else ("error", _one_line(err)), "loading", LOAD_TIMEOUT)
    if err is not None:
        raise err
    bad = [(r, v) for r, (s, v) in enumerate(got) if s == "error"]
    if bad:
        rt.close()
        raise DistributedError(f"{group.name(bad[0][0])}: {bad[0][1]}")
    group.driver = rt.parallel
    group.msg_size = rt.parallel.message_size
    return rt


def follow(group: Group, load_here: Callable) -> None:
    """Another rank: serve rank 0 until it exits: open what it opens, compute this rank's share of
    each layer it sends, close what it closes."""
    rt = None
    wait: float | None = None  # inside a forward, rank 0's next layer comes within a deadline
    try:
        while True:
            head, body, data = group.receive(wait)
            op = int(head[F_OP])
            wait = None
            if op == OP_LAYER:
                wait = _layer(rt, head, body)
            elif op == OP_LOAD:
                rt = _follow_load(group, data, load_here)
            elif op == OP_CLOSE:
                rt.close()
                rt = None
                group.msg_size = _HEAD
            elif op == OP_CALL:
                module, name, args = pickle.loads(data)
                _results(group, _call(module, name, args[group.rank]), f"{module}.{name} on every rank")
            elif op == OP_EXIT:
                return
    finally:
        if rt is not None:
            rt.close()


def _follow_load(group: Group, data: bytes, load_here: Callable):
    path, options = pickle.loads(data)
    rt, mine = None, ("ok", None)
    try:
        rt = load_here(
            path, options, lambda store, hidden, experts, layers: Share(group, store, hidden, experts, layers)
        )
    except Exception as e:
        mine = ("error", _one_line(e))  # rank 0 stops with it
        log.info("%s: %s", group.name(group.rank), mine[1])
    got = group.gather_objects(mine, "loading", LOAD_TIMEOUT)
    if any(s == "error" for s, _ in got):
        if rt is not None:
            rt.close()
        return None
    group.msg_size = rt.parallel.message_size
    return rt


def _layer(rt, head: np.ndarray, body: np.ndarray) -> float | None:
    """One layer's share on another rank; returns the deadline for rank 0's next message."""
    share: Share = rt.parallel
    layer, numpy_path = int(head[F_LAYER]), bool(head[F_PATH])
    dims = tuple(int(v) for v in head[F_DIMS : F_DIMS + int(head[F_NDIM])])
    n = int(np.prod(dims))
    tokens = n // dims[-1]
    inds = body[:n].astype(np.int64).reshape(dims)
    xs = body[n:].reshape(*dims[:-1], share.hidden)
    failed = None
    try:
        switch = rt.switches[layer]
        if numpy_path:
            out = switch.decode_numpy(np.ascontiguousarray(xs.reshape(1, -1)), inds.reshape(-1), [])
        else:
            x = mx.array(xs).astype(_DTYPES[int(head[F_DTYPE])])
            out = switch(x, mx.array(inds.astype(np.uint32)))
        flat = out.reshape(-1) if isinstance(out, np.ndarray) else np.array(out.astype(mx.float32)).reshape(-1)
    except DistributedError:
        raise
    except Exception as e:  # reported to rank 0, which stops with it
        failed = _one_line(e)
        flat = np.zeros(n * share.hidden, np.float32)
    share.exchange(flat, layer, tokens, failed)
    return None if layer == share.last else share.timeout(tokens)
