"""The ServerApp's roster of SuperNodes (fedrec/flower_nodes.py) when nodes leave and come back:
the seeded sampling still runs over every user, messages go to connected nodes only, and a
sampled user whose node is gone is recorded as a failure of that round."""

from __future__ import annotations

from types import SimpleNamespace

from fedrec.flower_nodes import PartitionClientManager, Roster


class Proxy(SimpleNamespace):
    pass


def _manager(n: int) -> tuple[PartitionClientManager, list]:
    manager = PartitionClientManager(n)
    proxies = [Proxy(cid=str(1000 + u), node_id=1000 + u) for u in range(n)]
    for u, p in enumerate(proxies):
        manager.register(p)
        manager.partition[p.cid] = u  # as `resolve` maps them from get_properties
    return manager, proxies


def test_roster_keeps_every_user_after_a_node_leaves_and_maps_a_returning_node():
    manager, proxies = _manager(4)
    roster = Roster(manager)
    assert list(roster.all()) == [f"{u:010d}" for u in range(4)] and manager.complete()
    manager.unregister(proxies[2])  # the SuperLink lost node 2
    assert sorted(manager.all()) == [f"{u:010d}" for u in (0, 1, 3)]
    everyone = roster.all()
    assert list(everyone) == [f"{u:010d}" for u in range(4)]  # sampling positions unchanged
    assert everyone[f"{2:010d}"] is proxies[2] and not manager.is_live(proxies[2])
    assert roster.wait_for(4, timeout=0)  # no waiting for the lost node
    assert manager.partition_of(proxies[2].cid) == 2  # its late reply still maps to its user
    back = Proxy(cid="2002", node_id=2002)  # the node comes back (a new node id)
    manager.register(back)
    manager.partition[back.cid] = 2
    assert roster.all()[f"{2:010d}"] is back and manager.is_live(back)


def test_ordered_strategy_sends_to_live_nodes_and_names_the_absent():
    from fedrec.server_app import OrderedStrategy

    manager, proxies = _manager(3)
    Roster(manager).all()
    manager.unregister(proxies[1])
    strategy = OrderedStrategy.__new__(OrderedStrategy)  # only the routing under test
    strategy.manager = manager
    ins = [(p, SimpleNamespace(config={})) for p in proxies]
    live, gone = strategy._live(ins)
    assert [p for p, _ in live] == [proxies[0], proxies[2]]
    assert gone == [1]


def test_configure_fit_over_the_roster_records_the_absent_for_the_round():
    from fedrec.flower_nodes import RoundTimer
    from fedrec.server_app import OrderedStrategy

    manager, proxies = _manager(3)
    Roster(manager).all()  # every node seen (round 1)
    manager.unregister(proxies[1])

    class Inner:  # samples every user of the roster it is given, as FedRecStrategy would
        n_items = 5

        def configure_fit(self, rnd, parameters, client_manager):
            assert client_manager.wait_for(3, timeout=0)
            return [(p, SimpleNamespace(config={})) for _, p in sorted(client_manager.all().items())]

    strategy = OrderedStrategy(Inner(), manager, RoundTimer(), ledger=None)
    strategy._runtime_checked = True
    ins = strategy.configure_fit(4, None, manager)
    assert [p for p, _ in ins] == [proxies[0], proxies[2]]
    assert all(one.config["n_items"] == 5 for _, one in ins)
    assert strategy.absent == {4: [1]}
