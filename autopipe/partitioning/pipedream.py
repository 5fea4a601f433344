"""The `pipedream` method: PipeDream's dynamic program over the topological order.

Stages are contiguous runs of the contracted graph's topological order (node attribute ``rank``)
and the program minimizes the slowest stage's time as ``autopipe.cost`` defines it: forward +
backward + the time to send the values the stage hands to later stages and to receive their
gradients, each value counted once. A stage over ``memory_limit`` (``autopipe.cost.stage_memory``)
is infeasible. Optionally:

- replication: a stage may run as m' data-parallel replicas; its time is then
  compute / m' + sends + 4 (m' - 1) P / (B m') (the all-reduce of its P parameter bytes);
- fixed replicas (``options.replicas``, PipeDream's ``--stage_to_num_ranks``): stage s runs as
  exactly ``replicas[s]`` replicas, timed the same way, and only the cut is chosen;
- a hierarchical machine (``options.levels``, innermost first): stages are laid on the devices
  in order, so every cut has the bandwidth of the outermost level it crosses, and a stage's
  sends are priced at the link after it (as PipeDream prices a cut); replicas all-reduce at
  their slowest link (both from ``autopipe.cost.stage_links``, as the analysis prices them).
  Stage times compose by max, so solving the devices in order is exactly PipeDream's
  level-by-level solve (a server's best inner split acting as one machine of the outer
  level), done in one pass;
- heterogeneous devices (``options.devices``): stages are laid on the devices in order and a
  stage is timed on the slowest device type it is laid on; links use ``--bw`` (or the levels).

The program runs over suffixes: B[state][i] is the best bottleneck for nodes i..n-1 on the
devices a state leaves. Suffixes know how many stages follow a stage, which is all its memory
depends on (``CostModel.in_flight``). Starts are filled a block at a time, from the last block
down: the costs of the stages from every start of the block to every end are numpy arrays,
built from prefix sums and from the bytes that values send and receive, laid out as events
(``_Events``), so the minimum over the ends is vectorized. A bound U >= optimum prunes ends,
and starts of states, that cannot lie on a solution within U (by compute, and memory, lower
bounds that are prefix sums), and ends whose next start was found not to lie on one; the
result is still exact. U comes from the same program on blocks of nodes, cut only between
blocks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate, chain, pairwise
from pathlib import Path
from typing import NamedTuple

import networkx as nx
import numpy as np
from numpy.lib.stride_tricks import as_strided

from autopipe.cost import (
    CostModel,
    Level,
    StageLinks,
    replicated_ms,
    stage_costs,
    stage_links,
    stage_memory,
)
from autopipe.errors import UserError
from autopipe.partitioning.base import (
    DeviceGroup,
    PartitionOptions,
    Plan,
    check_replicas,
    without_cycle_collection,
)

_SLACK = 1e-9
"""Relative tolerance on a bound, so rounding in prefix sums never prunes the optimum."""
_GUESS_BLOCKS = 512
"""Larger orders are first solved with cuts only between this many blocks, for a bound."""
_TRIAL_FACTORS = (1.3, 3.0)
"""Bounds tried when blocks give none, as multiples of the lower bound (compute / devices)."""


@dataclass(frozen=True)
class RelativeDeviceGroup(DeviceGroup):
    """Devices whose node times are ``slowdown`` times the graph's own forward + backward times.

    A server file may give a number instead of a profile; the times then come from the graph
    being partitioned, so ``compute_ms`` stays empty and the method resolves them.
    """

    slowdown: float = 1.0


@dataclass(frozen=True)
class Solution:
    """The plan the program chose, its bottleneck and every stage's time (ms per batch)."""

    plan: Plan
    bottleneck_ms: float
    stage_ms: tuple[float, ...]


# --- the problem, flattened -----------------------------------------------------------------


@dataclass(frozen=True)
class _Order:
    """The contracted graph in topological order: per-node costs as prefix sums, and values.

    Every value a node sends is indexed; ``made[r]`` lists those rank r produces, ``uses[r]``
    those rank r consumes from earlier nodes.
    """

    nodes: list[int]
    node_ms: np.ndarray
    """(device types, n) forward + backward ms of every node on every device type."""
    compute: np.ndarray
    """(device types, n + 1) prefix sums of ``node_ms``."""
    fastest: np.ndarray
    """(n + 1,) prefix sums of each node's time on its fastest type: a lower bound on any stage."""
    params: np.ndarray
    state: np.ndarray
    acts: np.ndarray
    last_use: list[int]
    sent_bytes: list[int]
    """Bytes a value costs to send: the value, and its gradient back where it requires one."""
    in_bytes: list[int]
    made: list[list[int]]
    uses: list[list[int]]

    @property
    def size(self) -> int:
        return len(self.nodes)

    def blocks(self, stride: int) -> _Order:
        """This order with every ``stride`` consecutive nodes merged (``nodes`` holds each
        block's first node): a smaller program whose every solution, cut only between blocks,
        is a solution of this one."""
        starts = list(range(0, self.size, stride))
        pick = starts + [self.size]
        made: list[list[int]] = [[] for _ in starts]
        uses: list[list[int]] = [[] for _ in starts]
        for r in range(self.size):
            made[r // stride].extend(self.made[r])
            uses[r // stride].extend(self.uses[r])
        return _Order(
            nodes=[self.nodes[r] for r in starts],
            node_ms=np.add.reduceat(self.node_ms, starts, axis=1),
            compute=self.compute[:, pick],
            fastest=self.fastest[pick],
            params=self.params[pick],
            state=self.state[pick],
            acts=self.acts[pick],
            last_use=[r // stride for r in self.last_use],
            sent_bytes=self.sent_bytes,
            in_bytes=self.in_bytes,
            made=made,
            uses=uses,
        )


class _RowKey(NamedTuple):
    """What a stage's cost row depends on besides its nodes."""

    types: tuple[int, ...]
    send_bandwidth: float
    reduce_bandwidth: float
    replicas: int
    following: int
    """Stages from this one to the last, when memory counts (else 0); the fewest that price
    its memory the same (``_Problem.priced_as``), so that rows that are equal are shared."""


@dataclass(frozen=True)
class _Machine:
    """The devices in pipeline order: each one's compute type, and the levels that set the
    links between them (``autopipe.cost.stage_links``)."""

    types: tuple[int, ...]
    levels: tuple[Level, ...]
    bandwidth: float
    """Every link's bandwidth when there are no levels."""
    _links: dict[tuple[int, int], StageLinks] = field(default_factory=dict, compare=False)

    @property
    def size(self) -> int:
        return len(self.types)

    def links(self, first: int, replicas: int) -> StageLinks:
        """The links of a stage on devices first .. first + replicas - 1."""
        if (first, replicas) not in self._links:
            self._links[first, replicas] = stage_links(first, replicas, self.levels, self.bandwidth)
        return self._links[first, replicas]

    def key(self, first: int, replicas: int, following: int) -> _RowKey:
        """The row key of a stage on devices first .. first + replicas - 1."""
        links = self.links(first, replicas)
        types = tuple(sorted(set(self.types[first : first + replicas])))
        return _RowKey(types, links.send, links.reduce, replicas, following)


class _Move(NamedTuple):
    replicas: int
    successor: int
    key: _RowKey


class _Problem:
    """One dynamic program: the order, the machine, the objective and the state space.

    ``objective`` is "time" (the bottleneck) or "memory" (the largest stage memory, for error
    messages). A state is (devices left, stages left); stages left is tracked when memory
    counts, since it sets a stage's activations in flight, else it is 0 under replication and
    equal to devices left without. With fixed replicas the stages left set the devices left
    and the next stage's replicas. The terminal state is (0, 0). ``n_stages`` is the number of
    stages of every solution, None where replication chooses it.
    """

    def __init__(
        self, order: _Order, machine: _Machine, options: PartitionOptions, objective: str
    ) -> None:
        self.order, self.machine, self.options, self.objective = order, machine, options, objective
        self.memory_counts = objective == "memory" or options.cost.memory_limit is not None
        replication, fixed, p = options.replication, options.replicas, machine.size
        self.n_stages = len(fixed) if fixed else None if replication else p
        if fixed:
            left = list(accumulate(reversed(fixed), initial=0))
            self.states = [(left[q], q) for q in range(len(fixed) + 1)]
        elif not replication:
            self.states = [(0, 0)] + [(d, d) for d in range(1, p + 1)]
        elif self.memory_counts:
            self.states = [(0, 0)] + [(d, q) for d in range(1, p + 1) for q in range(1, d + 1)]
        else:
            self.states = [(0, 0)] + [(d, 0) for d in range(1, p + 1)]
        self.index = {state: k for k, state in enumerate(self.states)}
        self.roots = [k for k, (d, _) in enumerate(self.states) if d == p]
        self._memory: dict[int, _MemoryModel] = {}
        self._held: dict[int, np.ndarray] = {}
        self.moves = [self._moves(state) for state in self.states]
        self._links: dict[float, CostModel] = {}
        self.memory_lower = self._memory_lower() if self.memory_counts else None

    def _memory_lower(self) -> np.ndarray:
        """Prefix sums of a per-node memory that no stage's memory is below the sum of: its
        state, parameter and activation bytes at the smallest factors stage_memory gives them."""
        factors = np.min(
            [self.memory(q).factors[:3] for q in range(1, self.machine.size + 1)], axis=0
        )
        parts = (self.order.state, self.order.params, self.order.acts)
        return sum(f * part.astype(float) for f, part in zip(factors, parts))

    def caps(self, bound: float) -> list[tuple[np.ndarray, bool, float]]:
        """What prunes the program: (prefix sums of a per-node lower bound, whether replicas
        divide it, the most a stage may have). The objective's bound caps fastest compute (or
        memory); a memory limit caps memory."""
        limit = self.options.cost.memory_limit
        if self.objective == "memory":
            caps = [(self.memory_lower, False, bound)]
        else:
            caps = [(self.order.fastest, True, bound)]
            if limit is not None:
                caps.append((self.memory_lower, False, limit * (1 + _SLACK) + 2.0))
        return [cap for cap in caps if not math.isinf(cap[2])]

    def _moves(self, state: tuple[int, int]) -> list[_Move]:
        devices, stages = state
        if devices == 0:
            return []
        if self.options.replicas:
            counts: Sequence[int] = [self.options.replicas[-stages]]
        elif self.options.replication:
            counts = range(1, devices - max(stages, 1) + 2)
        else:
            counts = [1]
        moves = []
        for m in counts:
            successor = (devices - m, stages - 1 if stages else 0)
            if successor not in self.index:
                continue
            following = self.priced_as(stages) if self.memory_counts else 0
            key = self.machine.key(self.machine.size - devices, m, following)
            if self.objective == "memory":
                key = _RowKey((), 0.0, 0.0, m, following)
            moves.append(_Move(m, self.index[successor], key))
        return moves

    def memory(self, following: int) -> _MemoryModel:
        if following not in self._memory:
            self._memory[following] = _MemoryModel(self.options.cost, following, self.n_stages)
        return self._memory[following]

    def priced_as(self, following: int) -> int:
        """The fewest following stages with which a stage's memory is priced as with
        ``following`` (1F1B's activations in flight stop growing at the microbatch count)."""
        terms = self.memory(following).terms
        return next(fewer for fewer in range(1, following + 1) if self.memory(fewer).terms == terms)

    def held(self, following: int) -> np.ndarray:
        """Prefix sums of the bytes nodes hold, each count weighted by its factor in
        ``memory(following)``: a stage's memory less its base and its inputs' share."""
        if following not in self._held:
            factors, order = self.memory(following).factors, self.order
            self._held[following] = (
                factors[0] * order.state + factors[1] * order.params + factors[2] * order.acts
            )
        return self._held[following]

    def link(self, bandwidth: float) -> CostModel:
        """The cost model with this link's bandwidth, whose transfer_ms prices the link."""
        if bandwidth not in self._links:
            self._links[bandwidth] = replace(self.options.cost, bandwidth=bandwidth)
        return self._links[bandwidth]

    def widths(self, bound: float) -> dict[int, np.ndarray]:
        """For every replica count and start i, how many ends the caps allow."""
        n = self.order.size
        starts = np.arange(n)
        widths = {}
        for m in sorted({move.replicas for moves in self.moves for move in moves}):
            width = n - starts
            for lower, divides, most in self.caps(bound):
                ends = (
                    np.searchsorted(lower, lower[:n] + (m if divides else 1) * most, side="right")
                    - 1
                )
                width = np.minimum(width, ends - starts)
            widths[m] = width
        return widths

    def band(self, bound: float) -> list[tuple[int, int]]:
        """For every state, the starts it can have on a solution within the caps.

        The nodes before the start need the devices already used, the rest fit in those left,
        no device over a cap by its lower bound; every stage has a node; all devices start at
        node 0.
        """
        n, p = self.order.size, self.machine.size
        bands = [(n, n)]
        for devices, stages in self.states[1:]:
            if self.n_stages is None:
                low, high = (0, 0) if devices == p else (1, n - max(stages, 1))
            else:
                low, high = self.n_stages - stages, n - stages
            for lower, _, most in self.caps(bound):
                low = max(low, int(np.searchsorted(lower, lower[n] - devices * most, side="left")))
                high = min(
                    high, int(np.searchsorted(lower, (p - devices) * most, side="right")) - 1
                )
            bands.append((low, high))
        return bands


class _MemoryModel:
    """``stage_memory`` for one count of following stages, applied to whole rows of stages.

    stage_memory is a sum of its byte counts times factors fixed by the stage's place,
    truncated to whole bytes. Its factors are read off it at one large probe each, so rows can
    be estimated with numpy (``_Rows.memory``) to within a byte, exactly where the factors are
    whole numbers as autopipe.cost's are; stages within a few bytes of the limit are decided by
    stage_memory itself. The formula stays in autopipe.cost.

    The place is stage ``n_stages - following`` of ``n_stages`` where the number of stages is
    fixed (wpipe's weight versions depend on it), else stage 0 of ``following``: the
    activations in flight depend on the following stages alone (so do lower bounds that ask
    for more following stages than there are).
    """

    _PROBE = float(2**40)

    def __init__(self, model: CostModel, following: int, n_stages: int | None) -> None:
        self.model, self.following = model, max(following, 1)
        self.n_stages = max(n_stages or 0, self.following)
        self.stage = self.n_stages - self.following
        self.base = self._exact(0, 0, 0, 0)
        self.factors = [
            (self._exact(*(self._PROBE if k == a else 0 for k in range(4))) - self.base)
            / self._PROBE
            for a in range(4)
        ]

    @property
    def terms(self) -> tuple[float, ...]:
        """The base and the factors: equal terms price every stage the same."""
        return (self.base, *self.factors)

    def _exact(self, *parts: float) -> int:
        """``stage_memory`` of one stage with these (state, params, activations, inputs)."""
        return stage_memory(*parts, self.stage, self.n_stages, self.model)

    def fits(
        self,
        estimate: np.ndarray,
        limit: float,
        asked: np.ndarray,
        parts: Callable[[tuple[int, ...]], tuple[int, ...]],
    ) -> np.ndarray:
        """Which of the ``asked`` stages stay within ``limit`` bytes, exactly as stage_memory
        decides (False for the others), from an estimate of their bytes good to a byte or so,
        and never negative. Stages within two bytes (and 1e-9) of the limit are priced by
        stage_memory on their ``parts``: the byte counts of the stage at an index."""
        surely = (limit - 2.0) / (1 + 1e-9)
        fits = asked & (estimate <= surely)
        unsure = asked & (estimate > surely) & (estimate <= (limit + 2.0) / (1 - 1e-9))
        for k in zip(*np.unravel_index(np.flatnonzero(unsure), unsure.shape)):
            fits[k] = self._exact(*parts(k)) <= limit
        return fits


# --- building the problem -------------------------------------------------------------------


def _node_ms(coarse: nx.DiGraph, node: int, group: DeviceGroup | None) -> float:
    """Forward + backward ms of a contracted node on a device type (None: as profiled)."""
    data = coarse.nodes[node]
    own = data.get("forward_ms", 0.0) + data.get("backward_ms", 0.0)
    if group is None:
        return own
    if isinstance(group, RelativeDeviceGroup):
        return group.slowdown * own
    total = 0.0
    for member in data.get("members", ()):
        if member not in group.compute_ms:
            raise UserError(
                f"the profile of {group.device_type} on {group.server} has no time for node {member}"
            )
        total += group.compute_ms[member]
    return total


def _prefix(values: np.ndarray) -> np.ndarray:
    """Prefix sums along the last axis, with a leading zero."""
    shape = values.shape[:-1] + (1,)
    return np.concatenate(
        [np.zeros(shape, dtype=values.dtype), np.cumsum(values, axis=-1)], axis=-1
    )


def _flatten(coarse: nx.DiGraph, groups: Sequence[DeviceGroup | None]) -> _Order:
    """The contracted graph as an ``_Order`` for the given device types."""
    nodes = sorted(coarse.nodes, key=lambda n: coarse.nodes[n]["rank"])
    rank_of = {node: r for r, node in enumerate(nodes)}
    node_ms = np.array(
        [[_node_ms(coarse, node, group) for node in nodes] for group in groups], dtype=float
    )
    node_ms = node_ms.reshape(len(groups), len(nodes))
    if (node_ms < 0).any():
        raise UserError("node times must not be negative")

    def column(name: str) -> np.ndarray:
        return _prefix(np.array([int(coarse.nodes[n].get(name, 0)) for n in nodes], dtype=np.int64))

    consumers: dict[tuple[int, str], list[int]] = {}
    for u, v, data in coarse.edges(data=True):
        for name in data.get("values", ()):
            consumers.setdefault((rank_of[u], name), []).append(rank_of[v])
    made: list[list[int]] = [[] for _ in nodes]
    uses: list[list[int]] = [[] for _ in nodes]
    last_use, sent_bytes, in_bytes = [], [], []
    for k, (rank, name) in enumerate(sorted(consumers)):
        nbytes, grad = coarse.nodes[nodes[rank]].get("sends", {}).get(name, (0, False))
        made[rank].append(k)
        for consumer in consumers[rank, name]:
            uses[consumer].append(k)
        last_use.append(max(consumers[rank, name]))
        sent_bytes.append(int(nbytes) * (2 if grad else 1))
        in_bytes.append(int(nbytes))
    return _Order(
        nodes=nodes,
        node_ms=node_ms,
        compute=_prefix(node_ms),
        fastest=_prefix(node_ms.min(axis=0)),
        params=column("param_bytes"),
        state=column("state_bytes"),
        acts=column("activation_bytes"),
        last_use=last_use,
        sent_bytes=sent_bytes,
        in_bytes=in_bytes,
        made=made,
        uses=uses,
    )


def _machine(
    n_devices: int, options: PartitionOptions
) -> tuple[_Machine, list[DeviceGroup | None]]:
    """The devices in order, their compute types, and the levels that set their links."""
    groups: list[DeviceGroup | None] = list(options.devices) or [None]
    types = (
        tuple(k for k, g in enumerate(options.devices) for _ in range(g.count)) or (0,) * n_devices
    )
    asked = f"{n_devices} ranks" if options.replicas else f"{n_devices} stages"
    if len(types) != n_devices:
        hint = "" if options.replicas else f": set -p to {len(types)}"
        raise UserError(
            f"the server file lists {len(types)} devices but {asked} were asked for{hint}"
        )
    if options.levels:
        size = math.prod(level.count for level in options.levels)
        if size != n_devices:
            counts = " x ".join(str(level.count) for level in options.levels)
            raise UserError(f"the machine has {counts} = {size} devices but {asked} were asked for")
    return _Machine(types, tuple(options.levels), options.cost.bandwidth), groups


# --- the dynamic program --------------------------------------------------------------------

_BLOCK = 64
"""Starts filled together: the stages from a block of starts are priced as one array."""


def _diagonals(values: np.ndarray, first: int, rows: int, width: int) -> np.ndarray:
    """A read-only (rows, width) view whose row k reads ``values`` from ``first + k`` on (as
    the ends of stages from consecutive starts, at the same offsets), the last value repeated
    past the end."""
    window = values[first : first + rows + width - 1]
    missing = rows + width - 1 - len(window)
    if missing > 0:
        window = np.concatenate([window, np.full(missing, values[-1])])
    step = window.strides[0]
    return as_strided(window, (rows, width), (step, step), writeable=False)


class _Events:
    """Bytes that stages collect, by where they start and end.

    An event (start, position, bytes) has start <= position; the stage i..j collects the bytes
    of every event with start >= i and position <= j. Blocks of starts are read in decreasing
    order; ``above`` sums, by position, the events of the starts from ``lowest`` up.
    """

    def __init__(
        self, start: np.ndarray, position: np.ndarray, nbytes: np.ndarray, size: int
    ) -> None:
        order = np.argsort(start, kind="stable")
        self.start, self.position, self.bytes = start[order], position[order], nbytes[order]
        self.above = np.zeros(size + 1, dtype=np.int64)
        self.lowest = size

    def block(self, starts: range, offsets: range) -> np.ndarray:
        """What the stages from each of ``starts`` to each start + offset collect: a (starts,
        offsets) array.

        Each event of the block goes on the row of its start, those of the starts above on the
        last row (every stage of the block collects them), at its position counted from the
        first row's first end (earlier positions at that end). Sums down the rows from each
        row to the last, then along the row up to each end, give what the stage from the row's
        start to that end collects; row k's stages end k later, so they lie on diagonals.
        """
        low, high, done = np.searchsorted(self.start, [starts.start, starts.stop, self.lowest])
        np.add.at(self.above, self.position[high:done], self.bytes[high:done])
        self.lowest = starts.stop
        first, span = starts.start + offsets.start, len(starts) + len(offsets) - 1
        steps = np.zeros((len(starts), span), dtype=np.int64)
        stretch = self.above[first : first + span]
        steps[-1, : len(stretch)] = stretch
        steps[-1, 0] += self.above[starts.stop : first].sum()
        column = np.maximum(self.position[low:high] - first, 0)
        kept = column < span
        row = self.start[low:high][kept] - starts.start
        np.add.at(steps, (row, column[kept]), self.bytes[low:high][kept])
        np.cumsum(steps[::-1], axis=0, out=steps[::-1])
        np.cumsum(steps, axis=1, out=steps)
        down, right = steps.strides
        return as_strided(steps, (len(starts), len(offsets)), (down + right, right))


class _Scan:
    """What stages send and receive, as ``_Events``.

    A value produced at r and last used at L is sent by the stages i..j with i <= r <= j < L:
    events (r, r, +bytes) and (r, L, -bytes). A value produced at r and used at u1 < u2 < ...
    is received by the stages i..j with r < i that reach its first use at or after i: events
    (u, u, +bytes) at each use, (u, next use, -bytes) and (r, u1, -bytes). A value used twice
    by one node (of merged blocks) counts once there.
    """

    def __init__(self, order: _Order, track_inputs: bool) -> None:
        self.order = order
        rank, made = _flat(order.made)
        self.made_at = np.empty(len(order.last_use), dtype=np.int64)  # each value's producer
        self.made_at[made] = rank
        self.sends = self._send_events()
        self.inputs = self._input_events() if track_inputs else None

    def _send_events(self) -> _Events:
        made, sent = self.made_at, np.asarray(self.order.sent_bytes, dtype=np.int64)
        last = np.asarray(self.order.last_use, dtype=np.int64)
        return _Events(np.tile(made, 2), np.r_[made, last], np.r_[sent, -sent], self.order.size)

    def _input_events(self) -> _Events:
        order, n = self.order, self.order.size
        at, used = _flat(order.uses)
        # Every (value, node that uses it) once, by value, then node.
        value, use = np.divmod(np.unique(used * n + at), n)
        nbytes = np.asarray(order.in_bytes, dtype=np.int64)[value]
        first = np.r_[True, value[1:] != value[:-1]]
        followed = ~first[1:]  # uses that the same value's next use follows
        return _Events(
            np.concatenate([self.made_at[value[first]], use, use[:-1][followed]]),
            np.concatenate([use[first], use, use[1:][followed]]),
            np.concatenate([-nbytes[first], nbytes, -nbytes[:-1][followed]]),
            n,
        )


def _flat(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-node lists of values as two arrays: each entry's node, and the entry."""
    sizes = [len(entries) for entries in lists]
    entries = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=sum(sizes))
    return np.repeat(np.arange(len(lists)), sizes), entries


class _Rows:
    """Cost rows of the stages from each start of a block to each start + offset: (starts,
    offsets) arrays. A stage past its window (``_Problem.widths``, which also stops at the last
    node) costs inf. Blocks must come in decreasing order (``_Events``)."""

    def __init__(
        self,
        problem: _Problem,
        scan: _Scan,
        starts: range,
        offsets: range,
        widths: dict[int, np.ndarray],
    ) -> None:
        self.problem, self.scan, self.widths = problem, scan, widths
        self.start_range, self.offsets = starts, offsets
        self.starts = np.arange(starts.start, starts.stop)[:, None]
        # The stage in row k, column c ends at first_end + k + c.
        self.first_end = starts.start + offsets.start
        self.cache: dict[object, np.ndarray] = {}

    def _cached(self, key: object, make) -> np.ndarray:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def _sum(self, prefix: np.ndarray) -> np.ndarray:
        """Every stage's total of the per-node values whose prefix sums are ``prefix``."""
        rows = _diagonals(prefix, self.first_end + 1, len(self.starts), len(self.offsets))
        return rows - prefix[self.starts]

    def sent(self) -> np.ndarray:
        return self._cached("sent", lambda: self.scan.sends.block(self.start_range, self.offsets))

    def received(self) -> np.ndarray:
        inputs = self.scan.inputs
        assert inputs is not None
        return self._cached("received", lambda: inputs.block(self.start_range, self.offsets))

    def compute(self, types: tuple[int, ...]) -> np.ndarray:
        """Compute ms on the slowest of ``types``."""
        compute = self.problem.order.compute
        if len(types) == 1:
            return self._cached(("compute", types), lambda: self._sum(compute[types[0]]))
        return self._cached(
            ("compute", types), lambda: np.max([self.compute((t,)) for t in types], 0)
        )

    def memory(self, following: int) -> np.ndarray:
        """Every stage's memory as ``_MemoryModel`` estimates it, from the weighted prefix sums
        of what nodes hold (``_Problem.held``) and the bytes the stage receives."""

        def estimate() -> np.ndarray:
            model, held = self.problem.memory(following), self.problem.held(following)
            rows = _diagonals(held, self.first_end + 1, len(self.starts), len(self.offsets))
            total = rows - (held[self.starts] - model.base)
            total += model.factors[3] * self.received()
            return total

        return self._cached(("memory", following), estimate)

    def within(self, replicas: int) -> np.ndarray:
        """Which stages lie in the window of a stage with this many replicas."""
        offsets = self.offsets
        return self._cached(
            ("within", replicas),
            lambda: np.arange(offsets.start, offsets.stop) < self.widths[replicas][self.starts],
        )

    def row(self, key: _RowKey) -> np.ndarray:
        """The objective of every stage: time (inf over the memory limit), or memory; inf out of
        the window."""
        problem, within = self.problem, self.within(key.replicas)
        if problem.objective == "memory":
            return self._cached(key, lambda: np.where(within, self.memory(key.following), np.inf))
        limit = problem.options.cost.memory_limit
        if limit is None:
            return self._cached(key, lambda: np.where(within, self.time(key), np.inf))
        return self._cached(
            key,
            lambda: np.where(self.fits(key.following, key.replicas, limit), self.time(key), np.inf),
        )

    def fits(self, following: int, replicas: int, limit: float) -> np.ndarray:
        """Which stages lie in their window and stay within the memory limit."""
        return self._cached(
            ("fits", following, replicas),
            lambda: self.problem.memory(following).fits(
                self.memory(following), limit, self.within(replicas), self._parts
            ),
        )

    def _parts(self, index: tuple[int, ...]) -> tuple[int, ...]:
        """The byte counts stage_memory takes of the stage at ``index``."""
        row, column = index
        first, last = int(self.starts[row, 0]), self.first_end + row + column
        order = self.problem.order
        held = (int(p[last + 1] - p[first]) for p in (order.state, order.params, order.acts))
        return (*held, int(self.received()[index]))

    def time(self, key: _RowKey) -> np.ndarray:
        """Compute on the slowest device type, divided among replicas, plus sends and all-reduce."""
        return self._cached(("time", key._replace(following=0)), lambda: self._time(key))

    def _time(self, key: _RowKey) -> np.ndarray:
        link, m = self.problem.link, key.replicas
        sends = link(key.send_bandwidth).transfer_ms(self.sent())
        if m == 1:
            return self.compute(key.types) + sends
        params = self._sum(self.problem.order.params)
        return replicated_ms(self.compute(key.types), sends, params, m, link(key.reduce_bandwidth))


@dataclass(frozen=True)
class _Answer:
    value: float
    stages: list[tuple[int, int, int]]
    """(first rank, last rank, replicas) of every stage, in order."""


@dataclass
class _Table:
    """The program's table: best bottleneck per (state, start), and the move that gets it."""

    best: np.ndarray
    end: np.ndarray
    replicas: np.ndarray

    @classmethod
    def empty(cls, problem: _Problem) -> _Table:
        states, n = len(problem.states), problem.order.size
        best = np.full((states, n + 1), np.inf)
        best[problem.index[0, 0], n] = 0.0
        return cls(
            best, np.zeros((states, n), dtype=np.int64), np.zeros((states, n), dtype=np.int64)
        )


class _Try(NamedTuple):
    """A state's moves worth trying from some starts of a block (``rows`` of the block)."""

    state: int
    rows: slice
    moves: list[_Move]


_Reached = list[tuple[int, int] | None]
"""Per state, the lowest and highest start filled so far whose best is within the bound."""


def _solve(problem: _Problem, bound: float) -> _Answer | None:
    """The best partition whose bottleneck is at most ``bound``, or None if there is none.

    Starts are filled a block at a time, from the last block down.
    """
    limit = bound * (1 + _SLACK) if not math.isinf(bound) else math.inf
    n = problem.order.size
    table = _Table.empty(problem)
    widths, bands = problem.widths(limit), problem.band(limit)
    reached: _Reached = [None] * len(problem.states)
    reached[problem.index[0, 0]] = (n, n)
    scan = _Scan(problem.order, problem.memory_counts)
    for top in range(n, 0, -_BLOCK):
        starts = range(max(top - _BLOCK, 0), top)
        tries, offsets = _tries(problem, bands, reached, widths, starts)
        if tries:
            _relax(_Rows(problem, scan, starts, offsets, widths), table, tries, reached, limit)
    root = min(problem.roots, key=lambda s: (table.best[s, 0], table.end[s, 0], s))
    value = float(table.best[root, 0])
    if not (math.isfinite(value) and value <= limit):
        return None
    return _Answer(value, _walk(problem, root, table))


def _tries(
    problem: _Problem,
    bands: list[tuple[int, int]],
    reached: _Reached,
    widths: dict[int, np.ndarray],
    starts: range,
) -> tuple[list[_Try], range]:
    """The moves worth trying from a block of starts, state by state, and the offsets from the
    start that their ends may take.

    A move is tried from the starts in the state's band, at ends within the bound's window
    whose next start may lie on a solution (``_next_starts``).
    """
    tries, firsts, stops = [], [], []
    for s, (low, high) in enumerate(bands):
        here = np.arange(max(low, starts.start), min(high + 1, starts.stop))
        if not len(here):
            continue
        moves, used = [], np.zeros(len(here), dtype=bool)
        for move in problem.moves[s]:
            next_starts = _next_starts(bands[move.successor], reached[move.successor], starts)
            if next_starts is None:
                continue
            first = np.maximum(0, next_starts[0] - 1 - here)
            stop = np.minimum(widths[move.replicas][here], next_starts[1] - here)
            has_ends = first < stop
            if has_ends.any():
                moves.append(move)
                used |= has_ends
                firsts.append(int(first[has_ends].min()))
                stops.append(int(stop[has_ends].max()))
        if moves:
            rows = np.flatnonzero(used) + int(here[0]) - starts.start
            tries.append(_Try(s, slice(int(rows[0]), int(rows[-1]) + 1), moves))
    return tries, range(min(firsts, default=0), max(stops, default=0))


def _next_starts(
    band: tuple[int, int], reached: tuple[int, int] | None, starts: range
) -> tuple[int, int] | None:
    """The starts of a state that may lie on a solution, seen from a block of starts: those it
    reached within the bound, and those of its band within the block, yet to be filled."""
    ranges = [reached] if reached else []
    unfilled = max(band[0], starts.start + 1), min(band[1], starts.stop - 1)
    if unfilled[0] <= unfilled[1]:
        ranges.append(unfilled)
    if not ranges:
        return None
    return min(low for low, _ in ranges), max(high for _, high in ranges)


def _relax(rows: _Rows, table: _Table, tries: list[_Try], reached: _Reached, limit: float) -> None:
    """Fill the table at the block's starts: each state's best move, ties to the earliest end,
    then to fewer replicas (a state's moves come in increasing replicas).

    States come in the order of ``problem.states``, in which every move leads to an earlier
    state, so the next starts within the block are filled first. The rows hold more ends than
    each start's window (``_tries``): outside it the stage is past its own window (inf), or the
    next start lies out of the next state's band (inf there) or was not reached within the
    bound, so such an end wins only where nothing within the bound does, on no solution.
    """
    width = len(rows.offsets)
    for state, which, moves in tries:
        starts, next_start = rows.starts[which, 0], rows.first_end + which.start + 1
        best: tuple[np.ndarray, np.ndarray, np.ndarray | int] | None = None
        for move in moves:
            following = _diagonals(table.best[move.successor], next_start, len(starts), width)
            candidates = np.maximum(following, rows.row(move.key)[which])
            pick = candidates.argmin(axis=1)
            value = candidates[np.arange(len(starts)), pick]
            end = starts + rows.offsets.start + pick
            if best is None:
                best = value, end, move.replicas
                continue
            better = (value < best[0]) | ((value == best[0]) & (end < best[1]))
            best = (
                np.where(better, value, best[0]),
                np.where(better, end, best[1]),
                np.where(better, move.replicas, best[2]),
            )
        assert best is not None
        table.best[state, starts], table.end[state, starts], table.replicas[state, starts] = best
        within = starts[np.isfinite(best[0]) & (best[0] <= limit)]
        if len(within):
            high = reached[state][1] if reached[state] else int(within[-1])
            reached[state] = int(within[0]), high


def _walk(problem: _Problem, state: int, table: _Table) -> list[tuple[int, int, int]]:
    """The stages of the chosen solution, following each state's best move from node 0."""
    stages, i = [], 0
    while i < problem.order.size:
        j, m = int(table.end[state, i]), int(table.replicas[state, i])
        stages.append((i, j, m))
        state = next(move.successor for move in problem.moves[state] if move.replicas == m)
        i = j + 1
    return stages


# --- evaluating and reporting ---------------------------------------------------------------


def _stage_times(
    coarse: nx.DiGraph,
    order: _Order,
    machine: _Machine,
    stages: list[tuple[int, int, int]],
    options: PartitionOptions,
) -> list[float]:
    """Every stage's time as the program defines it, priced by ``autopipe.cost.stage_costs``.

    Transfers cross the stage's links (``autopipe.cost.stage_links``); inf marks a stage over
    the memory limit.
    """
    stage_of = {
        order.nodes[r]: s
        for s, (first, last, _) in enumerate(stages)
        for r in range(first, last + 1)
    }
    devices = list(accumulate((m for _, _, m in stages), initial=0))
    links = [machine.links(device, m) for device, (_, _, m) in zip(devices, stages)]
    costs = stage_costs(coarse, stage_of, len(stages), options.cost, [link.send for link in links])
    limit, times = options.cost.memory_limit, []
    for (first, last, m), device, link, cost in zip(stages, devices, links, costs):
        compute = cost.compute_ms
        if options.devices:
            types = machine.key(device, m, 0).types
            compute = max(float(order.node_ms[t, first : last + 1].sum()) for t in types)
        reduce = replace(options.cost, bandwidth=link.reduce)
        time = replicated_ms(compute, cost.comm_ms, cost.param_bytes, m, reduce)
        times.append(math.inf if limit is not None and cost.memory_bytes > limit else time)
    return times


def stage_times(coarse: nx.DiGraph, plan: Plan, options: PartitionOptions) -> list[float]:
    """The pipedream objective of every stage of a plan: what the program minimizes the max of."""
    order = _flatten(coarse, list(options.devices) or [None])
    ranks = [plan.stage_of[node] for node in order.nodes]
    if any(b < a for a, b in pairwise(ranks)):
        raise ValueError("the plan's stages are not contiguous in the topological order")
    count = ranks[-1] + 1
    replicas = plan.replicas or (1,) * count
    stages = [
        (ranks.index(s), len(ranks) - 1 - ranks[::-1].index(s), replicas[s]) for s in range(count)
    ]
    machine, _ = _machine(sum(replicas), options)
    return _stage_times(coarse, order, machine, stages, options)


def _plan(order: _Order, stages: list[tuple[int, int, int]], options: PartitionOptions) -> Plan:
    stage_of = {
        order.nodes[r]: s
        for s, (first, last, _) in enumerate(stages)
        for r in range(first, last + 1)
    }
    replicated = options.replication or options.replicas is not None
    return Plan(stage_of, tuple(m for _, _, m in stages) if replicated else None)


def _trials(problem: _Problem) -> list[float]:
    """Bounds to try when nothing better is known: multiples of the lower bound spread over
    all devices, then none."""
    total = problem.memory_lower if problem.objective == "memory" else problem.order.fastest
    lower = float(total[-1]) / problem.machine.size
    return [lower * f for f in _TRIAL_FACTORS if lower > 0] + [math.inf]


def _search(problem: _Problem, bounds: list[float]) -> _Answer | None:
    """The optimum, from the first bound that admits a solution; None if none does."""
    for bound in bounds:
        answer = _solve(problem, bound)
        if answer is not None:
            return answer
    return None


def _guess(problem: _Problem) -> float:
    """An upper bound on the optimum: the best partition that cuts only between blocks of
    nodes, solved on the merged order, which prices it exactly as this program does (the same
    prefix sums at the cuts, the same bytes crossing them); inf when there is none."""
    order, machine, options = problem.order, problem.machine, problem.options
    stride = math.ceil(order.size / _GUESS_BLOCKS)
    stages = problem.n_stages
    if stride == 1 or (stages is not None and math.ceil(order.size / stride) < stages):
        return math.inf
    merged = _Problem(order.blocks(stride), machine, options, problem.objective)
    answer = _search(merged, _trials(merged))
    return math.inf if answer is None else answer.value


def _optimum(problem: _Problem, guess: float) -> _Answer | None:
    """The exact optimum, starting from an upper bound when there is one."""
    return _search(problem, [guess, math.inf] if math.isfinite(guess) else _trials(problem))


def _least_memory(
    coarse: nx.DiGraph, order: _Order, machine: _Machine, options: PartitionOptions
) -> tuple[list[tuple[int, int, int]], int]:
    """The partition whose largest stage memory is smallest, and that memory in bytes."""
    problem = _Problem(order, machine, options, "memory")
    answer = _optimum(problem, _guess(problem))
    assert answer is not None
    stage_of = _plan(order, answer.stages, options).stage_of
    costs = stage_costs(coarse, stage_of, len(answer.stages), options.cost)
    return answer.stages, max(c.memory_bytes for c in costs)


def _time_bound(coarse: nx.DiGraph, problem: _Problem, explain: bool) -> float | None:
    """An upper bound on the best time; None where no partition fits the memory limit.

    Under a limit where blocks find no partition, the times of a partition within the limit
    give one. With ``explain``, that of least memory, whose needs a UserError names where it
    does not fit. Else the memory program searches only up to the limit, a smaller search, and
    some way above it: an estimate may be two bytes (and 1e-9) over stage_memory, so it finds
    nothing only where nothing fits.
    """
    guess = _guess(problem)
    order, machine, options = problem.order, problem.machine, problem.options
    limit = options.cost.memory_limit
    if math.isfinite(guess) or limit is None:
        return guess
    if explain:
        stages, needed = _least_memory(coarse, order, machine, options)
        if needed > limit:
            raise _no_fit(problem, needed)
    else:
        fitting = _solve(_Problem(order, machine, options, "memory"), limit * (1 + 1e-9) + 2.0)
        if fitting is None:
            return None
        stages = fitting.stages
    return max(_stage_times(coarse, order, machine, stages, options))


def _no_fit(problem: _Problem, needed: int) -> UserError:
    """The error for a memory limit below what the least-memory partition needs."""
    p, limit = problem.machine.size, problem.options.cost.memory_limit or 0.0
    split = f"over {p} devices" if problem.options.replication else f"into {p} stages"
    if problem.options.replicas:
        split = f"into {problem.n_stages} stages on {p} devices"
    have, need = _gigabytes(limit, needed)
    holder = "device" if problem.options.cost.stages_per_device == 1 else "stage"
    return UserError(
        f"no split {split} fits in {have} GB: the best needs {need} GB per {holder}; "
        "raise -p or --memory_limit"
    )


def _gigabytes(limit: float, needed: float) -> tuple[str, str]:
    """Both amounts in GB with two decimals, or as many more as it takes to tell them apart."""
    for digits in range(2, 10):
        have, need = f"{limit / 1e9:.{digits}f}", f"{needed / 1e9:.{digits}f}"
        if have != need:
            break
    return have, need


@without_cycle_collection
def solve_pipedream(coarse: nx.DiGraph, n_stages: int, options: PartitionOptions) -> Solution:
    """The optimal contiguous partition, its bottleneck and stage times. See the module doc.

    Ties go to earlier cuts: each stage ends as early as it can while the rest stays optimal.
    Raises UserError when no partition fits the memory limit, naming what the best one needs.
    """
    problem, answer = _optimal(coarse, n_stages, options, explain=True)
    assert answer is not None
    order, machine = problem.order, problem.machine
    times = _stage_times(coarse, order, machine, answer.stages, options)
    return Solution(_plan(order, answer.stages, options), answer.value, tuple(times))


def _optimal(
    coarse: nx.DiGraph,
    n_stages: int,
    options: PartitionOptions,
    explain: bool,
    within: float = math.inf,
) -> tuple[_Problem, _Answer | None]:
    """The program for this request and its optimum (see ``solve_pipedream``). Where no
    partition fits the memory limit: a UserError naming what the best one needs if
    ``explain``, else None. With a finite ``within``, None also where the optimum's slowest
    stage takes longer than that many ms, a search bounded by it."""
    if n_stages < 1:
        raise UserError(f"the number of stages must be at least 1, got {n_stages}")
    machine, groups = _machine(_devices(n_stages, options), options)
    order = _flatten(coarse, groups)
    if order.size == 0:
        raise UserError("the graph has no nodes to partition")
    if not options.replication and order.size < n_stages:
        raise UserError(
            f"the model has {order.size} units that can go to different stages; "
            f"{n_stages} stages is more than that: lower -p"
        )
    problem = _Problem(order, machine, options, "time")
    if math.isfinite(within):
        return problem, _solve(problem, min(within, _guess(problem)))
    bound = _time_bound(coarse, problem, explain)
    answer = None if bound is None else _optimum(problem, bound)
    if answer is None and explain:
        raise _no_fit(problem, _least_memory(coarse, order, machine, options)[1])
    return problem, answer


def _devices(n_stages: int, options: PartitionOptions) -> int:
    """The devices the program lays stages on: one per stage, ``n_stages`` itself under
    replication, or as many as fixed replicas take."""
    check_replicas(n_stages, options)
    return n_stages if options.replicas is None else sum(options.replicas)


@without_cycle_collection
def partition_pipedream(coarse: nx.DiGraph, n_stages: int, options: PartitionOptions) -> Plan:
    """The `pipedream` method: PipeDream's dynamic program (see the module doc)."""
    problem, answer = _optimal(coarse, n_stages, options, explain=True)
    assert answer is not None
    return _plan(problem.order, answer.stages, options)


@without_cycle_collection
def fitting_plan(
    coarse: nx.DiGraph, n_stages: int, options: PartitionOptions, within: float = math.inf
) -> Plan | None:
    """The `pipedream` plan, or None where no contiguous partition fits the memory limit (the
    UserError of ``partition_pipedream`` would take a search of its own to name what the best
    one needs) or where its slowest stage takes longer than ``within`` ms."""
    problem, answer = _optimal(coarse, n_stages, options, explain=False, within=within)
    return None if answer is None else _plan(problem.order, answer.stages, options)


# --- server files ---------------------------------------------------------------------------


def load_server_file(path: str | Path) -> tuple[DeviceGroup, ...]:
    """Read a SparsePipe server file: a server name line, then ``<gpu_type> <count> <profile>``
    lines, repeated per server; blank lines and ``#`` comments are skipped.

    ``<profile>`` is a JSON file (relative to the server file) mapping fine node names to
    forward + backward ms, or a number: how many times slower than the profiled device that
    type is (a ``RelativeDeviceGroup``, resolved against the graph being partitioned).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(f"cannot read server file {path}: {error.strerror or error}") from error
    groups: list[DeviceGroup] = []
    server, server_line, servers = None, "", set()
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split("#", 1)[0].split()
        where = f"{path} line {number}"
        if len(fields) == 1:
            _check_server_done(server, server_line, groups)
            if fields[0] in servers:
                raise UserError(f"{where}: server {fields[0]} is listed twice")
            server, server_line = fields[0], where
            servers.add(server)
        elif len(fields) == 3:
            if server is None:
                raise UserError(f"{where}: a GPU line before any server name")
            groups.append(_device_group(server, fields, path.parent, where))
        elif fields:
            raise UserError(
                f"{where}: expected a server name or '<gpu_type> <count> <profile>', "
                f"got {raw.strip()!r}"
            )
    _check_server_done(server, server_line, groups)
    if not groups:
        raise UserError(f"server file {path} lists no GPUs")
    return tuple(groups)


def _check_server_done(server: str | None, where: str, groups: list[DeviceGroup]) -> None:
    if server is not None and not any(g.server == server for g in groups):
        raise UserError(f"{where}: server {server} lists no GPUs")


def _device_group(server: str, fields: list[str], folder: Path, where: str) -> DeviceGroup:
    """One ``<gpu_type> <count> <profile>`` line as a device group."""
    gpu, count_text, profile = fields
    if not count_text.isdigit() or int(count_text) < 1:
        raise UserError(f"{where}: the GPU count must be a positive integer, got {count_text!r}")
    count = int(count_text)
    try:
        slowdown = float(profile)
    except ValueError:
        return DeviceGroup(server, gpu, count, _read_profile(folder / profile, where))
    if not math.isfinite(slowdown) or slowdown <= 0:
        raise UserError(f"{where}: a slowdown factor must be a positive number, got {profile!r}")
    return RelativeDeviceGroup(server, gpu, count, {}, slowdown)


def _read_profile(path: Path, where: str) -> dict[str, float]:
    """A JSON profile: fine node name -> forward + backward ms."""
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise UserError(
            f"{where}: cannot read profile {path}: {error.strerror or error}"
        ) from error
    except json.JSONDecodeError as error:
        raise UserError(
            f"{where}: profile {path} is not JSON: {error.msg} at line {error.lineno}"
        ) from error
    if not isinstance(data, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for v in data.values()
    ):
        raise UserError(f"{where}: profile {path} must map node names to non-negative milliseconds")
    return {str(k): float(v) for k, v in data.items()}
