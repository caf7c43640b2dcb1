"""The fluid plan: how the waiting work would best be shared among the backends.

Each kind of work (jobs of one model that the same backends can run) is a demand, in seconds
of a reference backend; each backend a capacity: its relative speed times the time left
after what it already holds. The smallest finish time T at which every demand fits is found
by bisection, each step a max-flow (sources: kinds; sinks: backends; an edge where a backend
can run a kind). The flow at that T says how much of each kind each backend should do.

That is the optimum of the relaxed problem (jobs divisible, no model loads), so it is the
lower bound the benchmark measures against; the scheduler follows it one job at a time. A
handful of kinds and backends: a few hundred microseconds per plan.
"""
from __future__ import annotations

from collections import deque
from typing import Hashable

BISECTIONS = 30
EPSILON = 1e-9


def max_flow(demand: dict[Hashable, float], capacity: dict[Hashable, float],
             edges: dict[Hashable, list]) -> tuple[float, dict[tuple, float]]:
    """Max flow from the kinds (``demand``) to the backends (``capacity``) along ``edges``
    (kind -> backends that can run it); returns (total, {(kind, backend): flow})."""
    flow: dict[tuple, float] = {}
    sent = {k: 0.0 for k in demand}
    used = {b: 0.0 for b in capacity}
    total = 0.0
    while True:
        # BFS over the residual graph: kind -> backend (any capable), backend -> kind (back
        # along a positive flow), from a kind with demand left to a backend with room left.
        parent: dict = {}
        queue = deque()
        for k in demand:
            if demand[k] - sent[k] > EPSILON:
                parent[("k", k)] = None
                queue.append(("k", k))
        end = None
        while queue and end is None:
            node = queue.popleft()
            side, name = node
            if side == "k":
                for b in edges.get(name, ()):
                    nxt = ("b", b)
                    if nxt not in parent:
                        parent[nxt] = node
                        if capacity[b] - used[b] > EPSILON:
                            end = nxt
                            break
                        queue.append(nxt)
            else:
                for (k, b), f in flow.items():
                    if b == name and f > EPSILON and ("k", k) not in parent:
                        parent[("k", k)] = node
                        queue.append(("k", k))
        if end is None:
            return total, flow
        path = []
        node = end
        while parent[node] is not None:
            path.append((parent[node], node))
            node = parent[node]
        start = node[1]
        amount = min(demand[start] - sent[start], capacity[end[1]] - used[end[1]])
        for u, v in path:
            if u[0] == "b":  # a backward edge: flow taken back from (kind v, backend u)
                amount = min(amount, flow[(v[1], u[1])])
        for u, v in path:
            if u[0] == "k":
                flow[(u[1], v[1])] = flow.get((u[1], v[1]), 0.0) + amount
            else:
                flow[(v[1], u[1])] -= amount
        sent[start] += amount
        used[end[1]] += amount
        total += amount


def fluid_plan(demand: dict[Hashable, float], speed: dict[Hashable, float], busy: dict[Hashable, float],
               edges: dict[Hashable, list]) -> tuple[float, dict[tuple, float]]:
    """(T, {(kind, backend): reference seconds of that kind it should do}): the earliest time
    every backend could be done, ``busy`` seconds from now being what it holds already."""
    wanted = sum(demand.values())
    if wanted <= EPSILON or not speed:
        return max(busy.values(), default=0.0), {}
    low = max(busy.values(), default=0.0)
    high = low + wanted / max(min(speed.values()), EPSILON) + 1.0
    best: dict[tuple, float] = {}
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        capacity = {b: max(0.0, middle - busy[b]) * speed[b] for b in speed}
        total, flow = max_flow(demand, capacity, edges)
        if total >= wanted * (1 - 1e-6):
            high, best = middle, flow
        else:
            low = middle
    if not best:
        capacity = {b: max(0.0, high - busy[b]) * speed[b] for b in speed}
        best = max_flow(demand, capacity, edges)[1]
    return high, best
