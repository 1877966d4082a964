"""Denton's filter clustering: k-means groups of a Conv's output filters, each with its own rank.

Denton et al., "Exploiting Linear Structure Within Convolutional Networks for Efficient
Evaluation" (NIPS 2014), §3.2: filters of one layer are not one low-rank family but several,
so a single SVD of all M filters needs a high rank. Their bi-clustering groups the filters with
k-means and approximates each group on its own; this is its output half (the output filters
clustered; the input channels stay whole, so the first Conv of the pair reads X unchanged):

    W (M, C, k...) as the matrix F = W.reshape(M, C·∏k), rows = filters
    k-means on the rows scaled to unit length and sign (seeded k-means++, Lloyd): S_1 … S_G
    per group F[S_g] ≈ P_g Q_g by truncated SVD at rank r_g (its own rank)

and the Conv becomes: one k… Conv with R = Σ r_g filters (the Q_g stacked, original strides,
pads, dilations) → Split into the G groups → per group a 1×1 Conv (P_g, the group's bias) →
Concat → Gather(axis 1) back to the original channel order. All standard ONNX ops.

Ranks: for a total R the R largest singular values over all groups are kept (every group at
least one), which is the allocation with the least Frobenius error for R rank-one terms. So

    ‖W − Ŵ‖_F² = Σ_g Σ_{i > r_g} σ_{g,i}²   exactly (Eckart–Young per group; the groups
                                          partition the rows),

and `energy`, `ratio` and `budget` pick R as for the other kinds.
Parameters: Σ_g r_g (C·∏k + |S_g|).
"""

from __future__ import annotations

__all__ = ["ClusteredDecomposition", "cluster_filters", "apply_clustered"]

import dataclasses
import heapq
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcompress.passes.lowrank.decompose import ConvAttributes
from onnxcompress.passes.lowrank.linalg import TruncatedSVD, split_factors, truncated_svd
from onnxcompress.sites import WeightSite

KIND = "conv_clustered"
_ITERATIONS = 100


def cluster_filters(weight: np.ndarray, clusters: int, seed: int = 0) -> list[np.ndarray]:
    """k-means (k-means++ seeding, Lloyd) on the filters as directions; the members of each group.

    A filter and its multiples (negative ones too) span the same line, so each is scaled to unit
    length with its largest entry positive before clustering. Deterministic for a seed; groups
    are ordered by their first filter, members ascending.
    """
    rows = weight.reshape(weight.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    signs = np.sign(rows[np.arange(rows.shape[0]), np.argmax(np.abs(rows), axis=1)])[:, None]
    points = rows * np.where(signs == 0, 1.0, signs) / np.where(norms > 0, norms, 1.0)
    count = min(clusters, points.shape[0])
    rng = np.random.default_rng(seed)
    centers = [points[int(rng.integers(points.shape[0]))]]
    for _ in range(1, count):
        distance = np.min([np.sum((points - c) ** 2, axis=1) for c in centers], axis=0)
        total = float(distance.sum())
        index = (
            int(rng.choice(points.shape[0], p=distance / total))
            if total > 0
            else int(rng.integers(points.shape[0]))
        )
        centers.append(points[index])
    center = np.array(centers)
    labels = np.full(points.shape[0], -1)
    for _ in range(_ITERATIONS):
        distance = ((points[:, None, :] - center[None, :, :]) ** 2).sum(axis=2)
        new = np.argmin(distance, axis=1)
        for empty in sorted(
            set(range(count)) - set(new.tolist())
        ):  # re-seed at the worst-served filter
            new[int(np.argmax(distance[np.arange(points.shape[0]), new]))] = empty
        if np.array_equal(new, labels):
            break
        labels = new
        center = np.array([points[labels == g].mean(axis=0) for g in range(count)])
    groups = [np.flatnonzero(labels == g) for g in range(count)]
    return sorted((g for g in groups if g.size), key=lambda members: int(members[0]))


@dataclasses.dataclass
class ClusteredDecomposition:
    """A Conv weight as filter groups, each with its SVD; `rank` means the total R = Σ r_g."""

    weight: np.ndarray
    clusters: int
    seed: int = 0
    kind: str = KIND
    group: int = 1

    def __post_init__(self) -> None:
        self.members = cluster_filters(self.weight, self.clusters, self.seed)
        flat = self.weight.reshape(self.weight.shape[0], -1)
        self.rows, self.cols = flat.shape  # M filters of C·∏k values
        self._svds: list[TruncatedSVD] = [
            truncated_svd(flat[members].astype(np.float64), None, method="exact", seed=self.seed)
            for members in self.members
        ]
        self._order = self._rank_order()

    # ---- ranks -----------------------------------------------------------------------
    def _rank_order(self) -> list[int]:
        """The group that receives each next rank-one term: one per group first, then by σ²."""
        order = list(range(len(self.members)))
        taken = [1] * len(self.members)
        heap = [(-float(s.s[1] ** 2), g) for g, s in enumerate(self._svds) if s.rank > 1]
        heapq.heapify(heap)
        while heap:
            _, g = heapq.heappop(heap)
            order.append(g)
            taken[g] += 1
            if taken[g] < self._svds[g].rank:
                heapq.heappush(heap, (-float(self._svds[g].s[taken[g]] ** 2), g))
        return order

    def ranks(self, total: int) -> list[int]:
        """Each group's rank r_g for a total R (at least one per group)."""
        counts = [0] * len(self.members)
        for g in self._order[: max(total, len(self.members))]:
            counts[g] += 1
        return counts

    def svds(self, rank: int | None = None) -> list[TruncatedSVD]:
        """Every group's SVD; `rank` is accepted for the Decomposition interface and ignored."""
        del rank  # every group's full spectrum is computed up front (the matrices are small)
        return self._svds

    @property
    def max_rank(self) -> int:
        """Largest R whose factors are strictly smaller than the weight (0: none is)."""
        best = 0
        for total in range(len(self.members), len(self._order) + 1):
            if self.params_after(total) >= self.params_before:
                break
            best = total
        return best

    # ---- costs -----------------------------------------------------------------------
    @property
    def params_before(self) -> int:
        """Parameters of the weight as it is."""
        return int(self.weight.size)

    def params_after(self, rank: int) -> int:
        """Parameters of the factors at a total R: r_g × (inputs + members), summed over groups."""
        return sum(
            r * (self.cols + members.size)
            for r, members in zip(self.ranks(rank), self.members, strict=True)
        )

    @property
    def flops_before(self) -> int:
        """Multiply-adds (x2) per output position of the weight as it is."""
        return 2 * int(self.weight.size)

    def flops_after(self, rank: int) -> int:
        """Multiply-adds (x2) of the factors at a total R, in the units of `flops_before`."""
        return 2 * self.params_after(rank)

    def rank_for_ratio(self, ratio: float, metric: str = "params") -> int:
        """Largest R whose params (FLOPs: the same ratio) are at most `ratio` of the original's."""
        del metric
        best = len(self.members)
        for total in range(len(self.members), len(self._order) + 1):
            if self.params_after(total) > ratio * self.params_before + 1e-9:
                break
            best = total
        return best

    # ---- error -----------------------------------------------------------------------
    def discarded_energy(self, rank: int) -> float:
        """‖W − Ŵ‖_F² for a total R: the discarded σ² of every group."""
        return sum(s.discarded_energy(r) for s, r in zip(self._svds, self.ranks(rank), strict=True))

    def energy(self, rank: int) -> float:
        """Share of ‖W‖_F² kept at a total R (1 for an all-zero weight)."""
        total = sum(s.total_energy for s in self._svds)
        return 1.0 if total <= 0 else 1.0 - self.discarded_energy(rank) / total

    def relative_error(self, rank: int) -> float:
        """‖W − Ŵ‖_F / ‖W‖_F at a total R, from the kept energy."""
        return math.sqrt(max(0.0, 1.0 - self.energy(rank)))

    def rank_for_energy(self, energy: float) -> int | None:
        """Smallest R keeping `energy` of ‖W‖_F² among useful totals; None if none does."""
        for total in range(len(self.members), self.max_rank + 1):
            if self.energy(total) >= energy - 1e-12:
                return total
        return None

    # ---- factors ---------------------------------------------------------------------
    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(first: R filters C×k…, second: the M × R block matrix, 1×1) with second·first = Ŵ.

        `second` is dense for reference and tests; the graph stores only its blocks (`blocks`).
        """
        kernel = self.weight.shape[1:]
        firsts, second = [], np.zeros((self.rows, max(rank, len(self.members))), dtype=np.float64)
        column = 0
        for svd, r, members in zip(self._svds, self.ranks(rank), self.members, strict=True):
            p, q = split_factors(svd, r)
            firsts.append(q.reshape(r, *kernel))
            second[members, column : column + r] = p
            column += r
        first = np.concatenate(firsts)
        second = second[:, :column].reshape(self.rows, column, *([1] * (self.weight.ndim - 2)))
        dtype = self.weight.dtype
        return np.ascontiguousarray(first, dtype=dtype), np.ascontiguousarray(second, dtype=dtype)

    def blocks(self, rank: int) -> list[tuple[np.ndarray, int]]:
        """(members, r_g) per group, in the order of `first`'s filters."""
        return list(zip(self.members, self.ranks(rank), strict=True))


def _initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(value.const_value.dtype)  # type: ignore[union-attr]
    model.graph.register_initializer(value)
    return value


def apply_clustered(
    model: ir.Model,
    site: WeightSite,
    first: np.ndarray,
    second: np.ndarray,
    blocks: list[tuple[np.ndarray, int]],
    conv: ConvAttributes,
    taken: set[str],
) -> None:
    """Replace `site`'s Conv: Conv(R filters) → Split → per-group 1×1 Conv → Concat → Gather."""
    from onnxcompress.passes.lowrank.rewrite import _drop_if_unused, _unique

    node, graph = site.node, site.node.graph
    assert graph is not None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    bias_array = (
        bias.const_value.numpy() if bias is not None and bias.const_value is not None else None
    )
    base = node.name or site.name

    def fresh(kind: str) -> str:
        return _unique(f"{site.name}.clustered_{kind}", taken)

    def named(kind: str) -> str:
        return _unique(f"{base}.clustered_{kind}", taken)

    hidden = ir.Value(name=fresh("hidden"))
    nodes = [
        ir.node(
            "Conv",
            [node.inputs[0], _initializer(model, fresh("first"), first)],
            attributes=_first_attributes(conv),
            outputs=[hidden],
            name=named("first"),
        )
    ]  # type: ignore[arg-type]
    parts = [ir.Value(name=fresh(f"part{g}")) for g in range(len(blocks))]
    nodes.append(_split_node(model, hidden, parts, blocks, fresh, named))
    seconds, outputs = _second_convs(model, parts, second, blocks, bias_array, conv, fresh, named)
    nodes += seconds
    gather = _regroup(model, nodes, outputs, blocks, fresh, named)
    old_output, new_output = node.outputs[0], gather.outputs[0]
    new_output.name, old_output.name = old_output.name, None
    new_output.shape, new_output.type = old_output.shape, old_output.type
    old_inputs = list(node.inputs[1:])
    ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, [old_output], [new_output])
    _drop_if_unused(site)
    _drop_unused_initializers(graph, old_inputs[1:])  # the bias, now split per group


def _first_attributes(conv: ConvAttributes) -> dict[str, Any]:
    """The first Conv keeps the layer's geometry (kernel, strides, dilations, padding)."""
    attributes: dict[str, Any] = {
        "kernel_shape": list(conv.kernel),
        "strides": list(conv.strides),
        "dilations": list(conv.dilations),
        "group": 1,
    }
    if conv.auto_pad != "NOTSET":
        attributes["auto_pad"] = conv.auto_pad
    else:
        attributes["pads"] = list(conv.pads)
    return attributes


def _split_node(
    model: ir.Model,
    hidden: ir.Value,
    parts: list[ir.Value],
    blocks: list[tuple[np.ndarray, int]],
    fresh: Callable[[str], str],
    named: Callable[[str], str],
) -> ir.Node:
    """Split the R hidden channels into the groups' ranks (sizes as an input from opset 13)."""
    sizes = _initializer(model, fresh("split"), np.array([r for _, r in blocks], dtype=np.int64))
    opset = int(model.opset_imports.get("", 21))
    split_attributes = {"axis": 1} if opset >= 13 else {"axis": 1, "split": [r for _, r in blocks]}
    return ir.node(
        "Split",
        [hidden, sizes] if opset >= 13 else [hidden],
        attributes=split_attributes,  # type: ignore[arg-type]
        outputs=parts,
        name=named("split"),
    )


def _second_convs(
    model: ir.Model,
    parts: list[ir.Value],
    second: np.ndarray,
    blocks: list[tuple[np.ndarray, int]],
    bias_array: np.ndarray | None,
    conv: ConvAttributes,
    fresh: Callable[[str], str],
    named: Callable[[str], str],
) -> tuple[list[ir.Node], list[ir.Value]]:
    """One 1×1 Conv per group, from its part of the hidden channels to its members' outputs."""
    nodes, outputs, column, ones = [], [], 0, [1] * len(conv.kernel)
    for g, (members, rank) in enumerate(blocks):
        block = second[members, column : column + rank]
        column += rank
        inputs = [parts[g], _initializer(model, fresh(f"second{g}"), block)]
        if bias_array is not None:
            inputs.append(_initializer(model, fresh(f"bias{g}"), bias_array[members]))
        outputs.append(ir.Value(name=fresh(f"out{g}")))
        nodes.append(
            ir.node(
                "Conv",
                inputs,
                attributes={"kernel_shape": ones},
                outputs=[outputs[-1]],  # type: ignore[arg-type]
                name=named(f"second{g}"),
            )
        )
    return nodes, outputs


def _regroup(
    model: ir.Model,
    nodes: list[ir.Node],
    outputs: list[ir.Value],
    blocks: list[tuple[np.ndarray, int]],
    fresh: Callable[[str], str],
    named: Callable[[str], str],
) -> ir.Node:
    """Append Concat and the Gather that puts the channels back in the layer's order to `nodes`.

    Returns the Gather, whose output replaces the layer's.
    """
    grouped = ir.Value(name=fresh("grouped"))
    nodes.append(
        ir.node(
            "Concat",
            outputs,
            attributes={"axis": 1},
            outputs=[grouped],
            name=named("concat"),
        )
    )
    order = np.argsort(np.concatenate([members for members, _ in blocks]), kind="stable").astype(
        np.int64
    )
    gather = ir.node(
        "Gather",
        [grouped, _initializer(model, fresh("order"), order)],
        attributes={"axis": 1},
        name=named("order"),
    )
    nodes.append(gather)
    return gather


def _drop_unused_initializers(graph: ir.Graph, values: list[ir.Value | None]) -> None:
    """Remove the initializers among `values` that nothing reads any more."""
    for value in values:
        name = value.name if value is not None else None
        if (
            value is not None
            and name
            and not value.uses()
            and not value.is_graph_output()
            and name in graph.initializers
        ):
            graph.initializers.pop(name)
