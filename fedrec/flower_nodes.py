"""The ServerApp's view of the SuperNodes: which user each one is, and the rounds' wall times.

`PartitionClientManager` waits for every SuperNode (round 1 can otherwise start early), asks
each once for its partition-id (one batched `get_properties` message per node), and lists the
nodes in user order, so the strategy's seeded sampling picks the same users as the in-process
runner. `RoundTimer` keeps each round's fit and evaluation start and end.
"""

from __future__ import annotations

import threading
import time
from logging import INFO, WARNING

from flwr.common import GetPropertiesIns
from flwr.common.logger import log
from flwr.server.client_manager import SimpleClientManager

from fedrec.client_app import NUM_PARTITIONS, PARTITION_ID, check_partitions


class PartitionClientManager(SimpleClientManager):
    """Lists SuperNodes in partition-id (= user) order.

    `all()` returns the proxies keyed by the zero-padded partition-id, so sorting the keys (as
    `FedRecStrategy` does) sorts by user. Partition ids are asked once per node, in one batch.
    """

    def __init__(self, n_users: int, poll_s: float = 0.5):
        super().__init__()
        self.n_users = int(n_users)
        self.poll_s = poll_s
        self.partition: dict[str, int] = {}  # cid -> partition-id, connected nodes
        self.roster: dict[int, object] = {}  # user -> the latest proxy seen for it
        self.user_of_cid: dict[str, int] = {}  # every cid ever mapped -> its user
        self._resolve_lock = threading.Lock()

    def unregister(self, client):
        super().unregister(client)
        self.partition.pop(client.cid, None)

    def _snapshot(self) -> dict:
        with self._cv:
            return dict(self.clients)

    def resolve(self):
        """Ask every node whose partition-id is unknown (one message each, sent together)."""
        from flwr.app import Message
        from flwr.common import MessageTypeLegacy
        from flwr.compat.common import recorddict_compat as compat

        with self._resolve_lock:
            todo = [p for cid, p in self._snapshot().items() if cid not in self.partition]
            if not todo:
                return
            t0 = time.perf_counter()
            content = compat.getpropertiesins_to_recorddict(GetPropertiesIns(config={}))
            msgs = [Message(content=content, dst_node_id=p.node_id,
                            message_type=MessageTypeLegacy.GET_PROPERTIES, group_id="0")
                    for p in todo]
            replies = list(todo[0].grid.send_and_receive(msgs, timeout=3600))
            by_node = {}
            for r in replies:
                if r.has_error():
                    raise RuntimeError(f"SuperNode {r.metadata.src_node_id} failed to report its "
                                       f"partition-id: {r.error.reason}")
                props = compat.recorddict_to_getpropertiesres(r.content).properties
                if PARTITION_ID not in props:
                    raise RuntimeError(f"SuperNode {r.metadata.src_node_id} reported no "
                                       f"{PARTITION_ID} (is it running fedrec's ClientApp?)")
                check_partitions(int(props[NUM_PARTITIONS]), self.n_users)
                by_node[r.metadata.src_node_id] = int(props[PARTITION_ID])
            missing = [p.cid for p in todo if p.node_id not in by_node]
            if missing:
                raise RuntimeError(f"{len(missing)} SuperNode(s) did not report a partition-id")
            for p in todo:
                self.partition[p.cid] = by_node[p.node_id]
            pids = list(self.partition.values())
            if len(set(pids)) != len(pids) or not all(0 <= i < self.n_users for i in pids):
                raise RuntimeError(f"SuperNodes report duplicate or out-of-range partition ids; "
                                   f"expected each of 0..{self.n_users - 1} exactly once")
            log(INFO, "fedrec: %d SuperNode(s) mapped to users in %.2fs", len(todo),
                time.perf_counter() - t0)

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        """Wait for `num_clients` nodes (re-reading the node list every `poll_s`)."""
        t0 = time.monotonic()
        next_note = t0 + 10.0
        while True:
            # num_available() is wrapped by Flower's compat layer to refresh the node list
            n = self.num_available()
            if n >= num_clients:
                break
            if n:
                self.resolve()  # a num-partitions mismatch fails here, not after an hour
            now = time.monotonic()
            if now - t0 > timeout:
                return False
            if now >= next_note:
                log(WARNING, "fedrec: waiting for %d SuperNodes, %d connected", num_clients, n)
                next_note = now + 30.0
            time.sleep(self.poll_s)
        self.resolve()
        return True

    def partition_of(self, cid: str) -> int:
        if cid in self.partition:
            return self.partition[cid]
        return self.user_of_cid[cid]  # a node that left after it was sent this round's message

    def all(self):
        self.resolve()
        live = {f"{self.partition[cid]:010d}": p for cid, p in self._snapshot().items()}
        for key, proxy in live.items():
            self.roster[int(key)] = proxy
            self.user_of_cid[proxy.cid] = int(key)
        return live

    def is_live(self, proxy) -> bool:
        with self._cv:
            return self.clients.get(proxy.cid) is proxy

    def complete(self) -> bool:
        """Every user's SuperNode has been seen at least once."""
        return len(self.roster) == self.n_users


class Roster:
    """The strategy's view of the federation once every SuperNode was seen: every user, in
    user order, whether its node is connected now or not, so a node that drops out does not
    shift the seeded sampling of the others (the in-process runner samples among all users).
    Before that it is the manager itself (round 1 waits for every SuperNode). The runner
    sends messages to live nodes only and records each sampled user whose node is gone as a
    failure (`absent`)."""

    def __init__(self, manager: PartitionClientManager):
        self.manager = manager

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        if self.manager.complete():
            return True
        return self.manager.wait_for(num_clients, timeout)

    def all(self):
        live = self.manager.all()
        if not self.manager.complete():
            return live
        return {f"{u:010d}": p for u, p in sorted(self.manager.roster.items())}


class RoundTimer:
    def __init__(self):
        self.fit_start: dict[int, float] = {}
        self.fit_end: dict[int, float] = {}
        self.eval_start: dict[int, float] = {}

    def seconds_per_round(self, first: int = 2):
        """Wall seconds per round from round `first`'s start to the last fit's end (the last
        round's evaluation excluded; interim evaluations included)."""
        if not self.fit_end:
            return None
        last = max(self.fit_end)
        if first not in self.fit_start or last < first:
            return None
        return (self.fit_end[last] - self.fit_start[first]) / (last - first + 1)
