"""Graph-cut refinement: a minimum cut on a graph of voxels, built only where the network is unsure.

The energy of a binary labelling ``f`` (1 = the structure) is

    E(f) = sum_p D_p(f_p) + sum_{p~q} w_pq [f_p != f_q]

* unary ``D_p(1) = -log p_p`` and ``D_p(0) = -log(1 - p_p)`` from the network's probability ``p_p``;
* pairwise ``w_pq = smoothness * exp(-beta (I_p - I_q)^2) / dist_pq`` for 6- or 26-neighbours: cutting between
  voxels of similar intensity is expensive, ``dist_pq`` is their distance in mm, and ``beta = 1 / (2 <(I_p -
  I_q)^2>)`` is estimated from the image where the network is unsure (Boykov & Jolly 2001; Rother et al. 2004);
* strokes (seeds) are hard constraints: infinite terminal capacity.

Narrow band: a voxel whose probability is sure (below ``certainty`` or above ``1 - certainty``), away from the
thresholded boundary by more than ``band_mm`` and from every stroke, keeps its thresholded label. Only the band
becomes graph nodes; each edge from the band to a fixed voxel becomes a terminal capacity of its band voxel, so
the band's cut minimises the same energy with the outside fixed. Wherever the full-volume cut leaves the outside
voxels at their thresholded labels (the band assumption), both cuts are equal.

Persistency: inside the band, a node whose own preference (its unary costs plus its edges to fixed voxels)
outweighs all its edges to the other nodes keeps that label in some minimum cut, so it is fixed before the cut;
fixing it may let its neighbours be fixed in the next round. This is exact, and it removes most band nodes.

Strokes: a stroke outside the band widens the band by ``stroke_mm`` around it; one inside it widens nothing, so
adding it re-solves the existing graph from its previous search trees (Kohli & Torr 2005).

Arrays are numpy (z, y, x), as ``SimpleITK.GetArrayFromImage`` gives them; spacings are ITK's (x, y, z) in mm.
The max-flow solver is PyMaxflow's Boykov-Kolmogorov implementation; everything else is vectorised numpy.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import maxflow
import numpy as np
from scipy import ndimage

from .errors import MedSegError

logger = logging.getLogger(__name__)

#: Terminal capacity that makes a stroke a hard constraint (far above any sum of unary and pairwise costs).
HARD = 1e9
_EPSILON = 1e-6


class RefinementError(MedSegError):
    """The inputs of a refinement do not fit together (grid, values, strokes)."""


@dataclass(frozen=True)
class GraphCutOptions:
    """Settings of the refinement; the defaults were chosen on the lung lesion and hippocampus benchmarks.

    Attributes:
        smoothness: weight of the pairwise term against the unary term (nats per mm of neighbour distance).
        connectivity: 6 (faces) or 26 (faces, edges and corners).
        contrast: ``beta``; None estimates it from the image inside the uncertain region.
        band_mm: how far the band reaches beyond the uncertain region and the boundary (mm); None cuts the whole
            volume. 0 (the default) gave the full cut's result on the benchmarks and on the hippocampus cases.
        certainty: a probability below this or above ``1 - certainty`` counts as sure.
        stroke_mm: how far around a stroke outside the band the graph reaches, so the stroke can move the
            boundary near it.
        reduction_rounds: at most this many rounds of fixing persistent nodes before the cut (exact: fewer nodes,
            the same result); they stop early once a round would fix fewer than 0.5 % of the nodes.
    """

    smoothness: float = 1.0
    connectivity: int = 6
    contrast: float | None = None
    band_mm: float | None = 0.0
    certainty: float = 0.02
    stroke_mm: float = 5.0
    reduction_rounds: int = 20

    def __post_init__(self) -> None:
        if self.connectivity not in (6, 26):
            raise RefinementError(f"connectivity must be 6 or 26, got {self.connectivity}")
        for name in ("smoothness", "stroke_mm", "band_mm", "certainty", "contrast"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):  # NaN passes every comparison, then hangs the cut
                raise RefinementError(f"{name} must be a finite number, got {value}")
        if self.smoothness < 0:
            raise RefinementError(f"smoothness must be zero or positive, got {self.smoothness}")
        if self.stroke_mm < 0:
            raise RefinementError(f"stroke reach must be zero or positive (mm), got {self.stroke_mm}")
        if self.band_mm is not None and self.band_mm < 0:
            raise RefinementError(f"band width must be zero or positive (mm), got {self.band_mm}")
        if not 0 <= self.certainty < 0.5:
            raise RefinementError(f"certainty must be in [0, 0.5), got {self.certainty}")


def neighbour_offsets(connectivity: int) -> list[tuple[int, int, int]]:
    """One (dz, dy, dx) per neighbour pair direction (the forward half of the neighbourhood)."""
    offsets = [
        (dz, dy, dx)
        for dz in (-1, 0, 1)
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dz, dy, dx) > (0, 0, 0) and (connectivity == 26 or abs(dz) + abs(dy) + abs(dx) == 1)
    ]
    return offsets


def _distance_mm(offset: Sequence[int], spacing_zyx: np.ndarray) -> float:
    return float(np.sqrt(np.sum((np.asarray(offset) * spacing_zyx) ** 2)))


def _pair_slices(shape: Sequence[int], offset: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices (a, b) such that ``x[b]`` is the ``offset`` neighbour of ``x[a]``, voxel by voxel."""
    first, second = [], []
    for size, step in zip(shape, offset):
        first.append(slice(max(0, -step), size - max(0, step)))
        second.append(slice(max(0, step), size - max(0, -step)))
    return tuple(first), tuple(second)


def check_strokes(shape: Sequence[int], foreground: np.ndarray | None, background: np.ndarray | None) -> None:
    """Strokes must be on the image's grid, hold at least one voxel each, and never mark one voxel both ways."""
    for name, stroke in (("foreground", foreground), ("background", background)):
        if stroke is None:
            continue
        if stroke.shape != tuple(shape):
            raise RefinementError(f"the {name} strokes are {stroke.shape[::-1]} voxels, the image {tuple(shape)[::-1]}")
        if not stroke.any():
            raise RefinementError(f"the {name} stroke mask is empty: paint at least one voxel, or leave it out")
    if foreground is not None and background is not None:
        both = np.count_nonzero(foreground & background)
        if both:
            raise RefinementError(f"{both} voxel(s) are marked as both foreground and background; erase one stroke")


def _check_probability(probability: np.ndarray, image: np.ndarray) -> None:
    if probability.shape != image.shape:
        raise RefinementError(
            f"the probabilities are {probability.shape[::-1]} voxels but the image is {image.shape[::-1]}"
        )
    low, high = float(probability.min()), float(probability.max())  # NaN propagates into both
    if not (np.isfinite(low) and np.isfinite(high)):
        raise RefinementError("the probabilities contain NaN or infinite values")
    if low < -_EPSILON or high > 1 + _EPSILON:
        raise RefinementError(f"probabilities must lie in [0, 1], got values from {low:g} to {high:g}")


def _dilate_box(mask: np.ndarray, radius_voxels: Sequence[int]) -> np.ndarray:
    """Dilation by a box of half-widths ``radius_voxels`` (z, y, x): three 1D maximum filters, fast on big masks."""
    out = mask.view(np.uint8)
    for axis, radius in enumerate(radius_voxels):
        if radius > 0:
            out = ndimage.maximum_filter1d(out, size=2 * radius + 1, axis=axis, mode="constant")
    return out.astype(bool, copy=False)


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Voxels with a 6-neighbour of the other label."""
    edge = np.zeros_like(labels)
    for axis in range(3):
        differs = np.diff(labels, axis=axis) != 0
        lower = [slice(None)] * 3
        upper = [slice(None)] * 3
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        edge[tuple(lower)] |= differs
        edge[tuple(upper)] |= differs
    return edge


def _radius_voxels(spacing_xyz: Sequence[float], band_mm: float) -> list[int]:
    """Half-widths (z, y, x) in voxels of the box of voxels within ``band_mm`` along each axis."""
    return [int(np.floor(band_mm / s + 1e-9)) for s in reversed(tuple(spacing_xyz))]


def estimate_contrast(image: np.ndarray, region: np.ndarray, connectivity: int = 6) -> float:
    """``beta = 1 / (2 <(I_p - I_q)^2>)`` over neighbour pairs with both voxels in ``region``.

    On a large region the mean is taken over every k-th slice (k chosen so about 100 000 voxels remain): it is
    a global statistic, and the same estimate serves the band and the full-volume cut.
    """
    step = max(1, int(np.ceil(np.count_nonzero(region) / 100_000)))
    total, count = 0.0, 0
    for offset in neighbour_offsets(connectivity):
        a, b = _pair_slices(image.shape, offset)
        both = region[a][::step] & region[b][::step]
        if both.any():
            difference = image[a][::step][both].astype(np.float64) - image[b][::step][both]
            total += float(np.dot(difference, difference))
            count += difference.size
    mean = total / count if count else 0.0
    return 1.0 / (2.0 * mean) if mean > 0 else 0.0


def unary_costs(probability: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cost of the structure, cost of background) per voxel: ``-log p`` and ``-log(1 - p)``, float32."""
    p = np.clip(probability.astype(np.float32, copy=False), 1e-4, 1 - 1e-4)
    return -np.log(p), -np.log1p(-p)


def _weights(a: np.ndarray, b: np.ndarray, beta: float, scale: float) -> np.ndarray:
    """``scale * exp(-beta (a - b)^2)``, float32, computed in place."""
    weight = np.subtract(a, b, dtype=np.float32)
    np.square(weight, out=weight)
    weight *= np.float32(-beta)
    np.exp(weight, out=weight)
    weight *= np.float32(scale)
    return weight


@dataclass
class _BandGraph:
    """A built band graph: the solver, the crop it lives in, and which voxel each node is (flat crop indices)."""

    graph: object
    crop: tuple[slice, ...]
    band: np.ndarray  #: flat bool over the crop: the voxels the graph decides (nodes and strokes)
    fixed: np.ndarray  #: flat bool over the crop: the label of every voxel that is not a node
    voxels: np.ndarray  #: flat crop index of each band voxel, sorted
    node_of: np.ndarray  #: node id of each band voxel, or -1 for a stroke (fixed)
    shape: tuple[int, int, int]  #: the crop's shape
    flow: float = 0.0

    def node_ids(self, voxels: np.ndarray) -> np.ndarray:
        """Node id of each flat crop index (-1 when it is not a node)."""
        position = np.minimum(np.searchsorted(self.voxels, voxels), self.voxels.size - 1)
        return np.where(self.voxels[position] == voxels, self.node_of[position], -1).astype(np.int32)

    def write_labels(self, out: np.ndarray) -> None:
        """Write the cut into ``out`` (the full-size thresholded mask): node labels, and strokes."""
        slab = out[self.crop].reshape(-1)  # a view: the crop is a run of whole slices
        strokes = self.node_of < 0
        if strokes.any():
            slab[self.voxels[strokes]] = self.fixed[self.voxels[strokes]]
        nodes = ~strokes
        if nodes.any():  # PyMaxflow refuses empty arrays
            slab[self.voxels[nodes]] = ~self.graph.get_grid_segments(self.node_of[nodes])


def _bounding_box(mask: np.ndarray, margin: Sequence[int] | int = 1) -> tuple[slice, ...] | None:
    """The box around ``mask``'s voxels widened by ``margin`` (per axis), or None when ``mask`` is empty."""
    margins = [margin] * 3 if isinstance(margin, int) else list(margin)
    z_present = np.flatnonzero(mask.any(axis=(1, 2)))
    if z_present.size == 0:
        return None
    z = slice(max(0, z_present[0] - margins[0]), min(mask.shape[0], z_present[-1] + margins[0] + 1))
    sub = mask[z_present[0] : z_present[-1] + 1]
    slices = [z]
    for axis, other in ((1, (0, 2)), (2, (0, 1))):
        present = np.flatnonzero(sub.any(axis=other))
        slices.append(slice(max(0, present[0] - margins[axis]), min(mask.shape[axis], present[-1] + margins[axis] + 1)))
    return tuple(slices)


def _direction(
    offset, step, scale, *, beta, nodes, ids, slot, values, image_flat, fixed, base, shape, touches, coordinate
):
    """Links and terminal contributions of every node along one neighbour direction, both ways.

    Returns:
        (links, terminals): per node its node neighbour ahead and behind (-1 for none), the weight of the edge
        ahead and of both edges; and (node, weight, label of the fixed voxel) for edges to fixed voxels.
    """
    terminals = []
    valid = _inside(offset, 1, coordinate, shape, touches)
    here = ids if valid is None else ids[valid]
    neighbour = (nodes if valid is None else nodes[valid]) + step
    other = slot[neighbour] - 1
    weight = _weights(values if here is ids else values[here], image_flat[neighbour + base], beta, scale)
    pair = other >= 0
    # index arrays once: boolean-mask indexing rescans the whole mask every time
    paired, alone = np.flatnonzero(pair), np.flatnonzero(~pair)
    here_paired, other_paired, weight_paired = here[paired], other[paired], weight[paired]
    forward = np.full(ids.size, -1, np.int32)
    forward[here_paired] = other_paired
    forward_weight = np.zeros(ids.size, np.float32)
    forward_weight[here_paired] = weight_paired
    behind = np.full(ids.size, -1, np.int32)
    behind[other_paired] = here_paired
    linked = forward_weight.copy()
    linked[other_paired] += weight_paired
    terminals.append((here[alone], weight[alone], fixed[neighbour[alone]]))
    # behind: only nodes with no node behind them can have a fixed voxel (or nothing) there
    lonely = behind < 0
    valid = _inside(offset, -1, coordinate, shape, touches)
    if valid is not None:
        lonely &= valid
    back = np.flatnonzero(lonely).astype(np.int32)
    neighbour = nodes[back] - step
    weight = _weights(values[back], image_flat[neighbour + base], beta, scale)
    terminals.append((back, weight, fixed[neighbour]))
    return (forward, forward_weight, behind, linked), terminals


def _inside(offset, sign, coordinate, shape, touches) -> np.ndarray | None:
    """Which nodes have their ``sign * offset`` neighbour inside the crop; None when all do."""
    valid = None
    for axis, delta in enumerate(offset):
        move = sign * delta
        if move and touches[axis][int(move > 0)]:
            moved = coordinate[axis] + move
            ok = (moved >= 0) & (moved < shape[axis])
            valid = ok if valid is None else valid & ok
    return valid


def _build_band_graph(
    image: np.ndarray,
    probability: np.ndarray,
    threshold: np.ndarray,
    band_box: tuple[slice, ...],
    band_local: np.ndarray,
    *,
    spacing_xyz: Sequence[float],
    beta: float,
    options: GraphCutOptions,
    foreground: np.ndarray | None,
    background: np.ndarray | None,
) -> _BandGraph:
    """Nodes for the band's voxels, terminal capacities for their edges to fixed voxels, then the maximum flow.

    Strokes are fixed voxels, like those outside the band. An edge between a node and a fixed voxel is paid when
    the node takes the other label, so it adds its weight to that terminal capacity of the node. The graph lives
    in a slab of whole slices around the band, so a voxel's flat index in the slab and in the volume differ by a
    constant and neighbours are a fixed step away.
    """
    z0, z1 = max(0, band_box[0].start - 1), min(image.shape[0], band_box[0].stop + 1)
    crop = (slice(z0, z1), slice(None), slice(None))
    shape = (z1 - z0, image.shape[1], image.shape[2])
    # Only where the band reaches a face of the volume can a neighbour be missing (or wrap to the next row).
    touches = [(b.start == 0, b.stop == n) for b, n in zip(band_box, image.shape)]
    base = np.int64(z0) * shape[1] * shape[2]  # int64: slab indices fit int32, volume indices may not
    band_slab = np.zeros(shape, bool)
    band_slab[band_box[0].start - z0 : band_box[0].stop - z0, band_box[1], band_box[2]] = band_local
    band_flat = band_slab.reshape(-1)
    fixed = threshold[crop].reshape(-1).copy()  # labels of the voxels that are not nodes (strokes, persistency)
    voxels = np.flatnonzero(band_flat).astype(np.int32)
    is_node = np.ones(voxels.size, bool)
    for stroke, label in ((foreground, True), (background, False)):
        if stroke is not None:
            marked = stroke[crop].reshape(-1)[voxels]
            fixed[voxels[marked]] = label
            is_node &= ~marked
    if is_node.all():  # no stroke in the band: every band voxel is a node, in order
        node_of, nodes = np.arange(voxels.size, dtype=np.int32), voxels
    else:
        node_of = np.cumsum(is_node, dtype=np.int32) - 1
        node_of[~is_node] = -1
        nodes = voxels[is_node]
    count = nodes.size
    slot = np.zeros(band_flat.size, np.int32)  # node id + 1, 0 elsewhere
    slot[nodes] = np.arange(1, count + 1, dtype=np.int32)
    image_flat = np.ascontiguousarray(image).reshape(-1)
    values = image_flat[nodes + base]
    node_probability = np.ascontiguousarray(probability).reshape(-1)[nodes + base]
    ids = node_of if nodes is voxels else np.arange(count, dtype=np.int32)
    spacing_zyx = np.asarray(spacing_xyz, dtype=float)[::-1]
    strides = (shape[1] * shape[2], shape[2], 1)
    context = {
        "nodes": nodes,
        "ids": ids,
        "slot": slot,
        "values": values,
        "image_flat": image_flat,
        "fixed": fixed,
        "base": base,
        "shape": shape,
        "touches": touches,
        "coordinate": {  # per axis, only where the band touches a face of the volume along it
            axis: (nodes // strides[axis]) % shape[axis] for axis in range(3) if any(touches[axis])
        },
    }
    work = partial(_direction, beta=beta, **context)
    jobs = [
        (offset, int(np.dot(offset, strides)), options.smoothness / _distance_mm(offset, spacing_zyx))
        for offset in neighbour_offsets(options.connectivity)
    ]
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:  # numpy frees the GIL
        unary = pool.submit(unary_costs, node_probability)
        results = list(pool.map(work, *zip(*jobs)))
        cost_fg, cost_bg = unary.result()
    source, sink = cost_bg, cost_fg  # a node cut from the source side pays its background cost, and so on
    del slot, values, context, work
    links = [direction_links for direction_links, _ in results]
    for _, terminals in results:
        for near, weight, far_structure in terminals:
            _add_terminals(source, sink, near, weight, far_structure)
    del results

    free, structure = _fix_persistent_nodes(source, sink, links, options.reduction_rounds)
    pairs = []
    for forward, forward_weight, _, _ in links:  # node-node edges between nodes that stay free
        a = np.flatnonzero((forward >= 0) & free)
        a = a[free[forward[a]]].astype(np.int32)
        pairs.append((a, forward[a], forward_weight[a]))
    del links
    band_nodes = np.flatnonzero(is_node)
    fixed[voxels[band_nodes[~free]]] = structure[~free]
    node_of[band_nodes[~free]] = -1
    renumber = np.cumsum(free, dtype=np.int32) - 1
    node_of[band_nodes[free]] = renumber[free]
    count = int(free.sum())
    graph = maxflow.GraphFloat(count, sum(a.size for a, _, _ in pairs))
    graph.add_nodes(count)
    for a, b, w in pairs:
        if a.size:  # PyMaxflow refuses empty arrays
            graph.add_edges(renumber[a], renumber[b], w, w)
    del pairs
    flow = 0.0
    if count:
        graph.add_grid_tedges(np.arange(count, dtype=np.int32), source[free], sink[free])
        flow = graph.maxflow()
    return _BandGraph(
        graph=graph, crop=crop, band=band_flat, fixed=fixed, voxels=voxels, node_of=node_of, shape=shape, flow=flow
    )


def _add_terminals(source, sink, near, weight, far_structure) -> None:
    """Edges from nodes ``near`` to fixed voxels: each is paid when its node takes the other label.

    ``near`` holds each node at most once (one neighbour direction), so fancy-index adds are exact.
    """
    source[near[far_structure]] += weight[far_structure]
    sink[near[~far_structure]] += weight[~far_structure]


def _fix_persistent_nodes(source, sink, links, rounds: int):
    """Fix nodes whose own preference outweighs all their edges to other nodes; repeat ``rounds`` times.

    A node whose terminal margin (``source - sink``, edges to fixed voxels included) is at least the sum of its
    edges to the other free nodes keeps its preferred label in some minimum cut, whatever the others do (a
    classic persistency argument); fixing it turns its edges into terminal capacities of its neighbours, which may
    let them be fixed in the next round. ``links`` holds, per direction, each node's neighbour node ahead and
    behind (-1 for none), the weight of the edge ahead, and the weight of both. Modifies ``source`` and ``sink``.

    Returns:
        (free, structure): which nodes remain, and the label of those fixed.
    """
    count = source.size
    free = np.ones(count, bool)
    structure = np.zeros(count, bool)
    if rounds <= 0 or not links:
        return free, structure
    linked = np.zeros(count, np.float32)  # the weight of each node's edges to free nodes
    for _, _, _, direction_linked in links:
        linked += direction_linked
    for _ in range(rounds):
        margin = source - sink
        newly = np.flatnonzero(free & (np.abs(margin) >= linked))
        if newly.size < max(1, count // 200):  # diminishing returns: the cut is cheaper than another round
            break
        structure[newly] = margin[newly] > 0
        free[newly] = False
        near, weight_near, far_structure = [], [], []
        for forward, weight, behind, _ in links:
            # a fixed node's free neighbours, ahead and behind: the edge between them becomes their terminal
            for neighbour, ahead in ((forward[newly], True), (behind[newly], False)):
                at = np.flatnonzero(neighbour >= 0)
                at = at[free[neighbour[at]]]
                other, fixed_node = neighbour[at], newly[at]
                near.append(other)
                weight_near.append(weight[fixed_node] if ahead else weight[other])
                far_structure.append(structure[fixed_node])
        near, weight_near, far_structure = (np.concatenate(parts) for parts in (near, weight_near, far_structure))
        np.subtract.at(linked, near, weight_near)  # unbuffered: a node may appear several times
        np.add.at(source, near[far_structure], weight_near[far_structure])
        np.add.at(sink, near[~far_structure], weight_near[~far_structure])
    return free, structure


def refine_binary(
    image: np.ndarray,
    probability: np.ndarray,
    *,
    spacing: Sequence[float],
    options: GraphCutOptions | None = None,
    foreground: np.ndarray | None = None,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """Refine one structure: the minimum cut of the energy above on the narrow band (or the whole volume).

    Args:
        image: (z, y, x) intensities (HU, MR units: only differences between neighbours matter).
        probability: (z, y, x) probability of the structure, in [0, 1].
        spacing: voxel spacing (x, y, z) in mm.
        options: :class:`GraphCutOptions`; ``band_mm=None`` cuts the whole volume.
        foreground, background: (z, y, x) boolean stroke masks, hard constraints.

    Returns:
        (z, y, x) boolean mask of the structure.
    """
    return RefinementSession(image, probability, spacing=spacing, options=options).refine(foreground, background)


class RefinementSession:
    """One structure's refinement kept in memory, so adding a stroke re-solves only what changed.

    A stroke on voxels of the current band changes terminal capacities of existing nodes: the solver continues
    from its previous search trees (Kohli & Torr 2005). A stroke outside the band widens it by ``stroke_mm``
    around the stroke, and the graph is rebuilt.
    """

    def __init__(
        self,
        image: np.ndarray,
        probability: np.ndarray,
        *,
        spacing: Sequence[float],
        options: GraphCutOptions | None = None,
    ) -> None:
        _check_probability(probability, image)
        self.image = image
        self.probability = probability
        self.spacing = tuple(float(s) for s in spacing)
        self.options = options or GraphCutOptions()
        self.threshold = probability >= 0.5
        self.core_box, self.core = _uncertain_core(probability, self.threshold, self.options.certainty)
        self.beta = _contrast(image, self.core_box, self.core, self.options)
        self.foreground: np.ndarray | None = None  # all strokes so far, full size once there is one
        self.background: np.ndarray | None = None
        self._graph: _BandGraph | None = None
        self.rebuilds = 0

    @property
    def graph_size(self) -> dict[str, int]:
        """How many voxels the band holds and how many of them became graph nodes (after the last refine)."""
        if self._graph is None:
            return {"band_voxels": 0, "nodes": 0}
        return {"band_voxels": int(self._graph.voxels.size), "nodes": int(np.count_nonzero(self._graph.node_of >= 0))}

    def refine(self, foreground: np.ndarray | None = None, background: np.ndarray | None = None) -> np.ndarray:
        """Add strokes (if any) and return the refined mask, (z, y, x) bool."""
        check_strokes(self.image.shape, foreground, background)
        new_fg = _new_strokes(foreground, self.foreground)
        new_bg = _new_strokes(background, self.background)
        if (new_fg is not None and self.background is not None and (new_fg & self.background).any()) or (
            new_bg is not None and self.foreground is not None and (new_bg & self.foreground).any()
        ):
            raise RefinementError("a new stroke marks voxels that an earlier stroke marked the other way")
        if new_fg is not None:
            self.foreground = new_fg if self.foreground is None else self.foreground | new_fg
        if new_bg is not None:
            self.background = new_bg if self.background is None else self.background | new_bg
        if self._graph is None or not self._add_strokes_to_graph(new_fg, new_bg):
            band = self._band()
            if band is None:  # nothing uncertain and no stroke: the thresholded map is the answer
                return self.threshold.copy()
            self._graph = _build_band_graph(
                self.image,
                self.probability,
                self.threshold,
                *band,
                spacing_xyz=self.spacing,
                beta=self.beta,
                options=self.options,
                foreground=self.foreground,
                background=self.background,
            )
            self.rebuilds += 1
        out = self.threshold.copy()  # outside the band: the thresholded label
        self._graph.write_labels(out)
        return out

    def _core_band(self) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """(box, mask in the box): the uncertain core widened by ``band_mm`` (computed once)."""
        if not hasattr(self, "_core_band_cache"):
            shape = self.image.shape
            if self.options.band_mm is None:
                self._core_band_cache = (tuple(slice(0, n) for n in shape), np.ones(shape, bool))
            elif self.core_box is None:
                self._core_band_cache = None
            else:
                self._core_band_cache = _grown(self.core_box, self.core, self.spacing, self.options.band_mm, shape)
        return self._core_band_cache

    def _in_core_band(self, mask: np.ndarray) -> np.ndarray:
        """Which voxels of a full-size ``mask`` lie in the core band (full-size boolean)."""
        inside = np.zeros(mask.shape, bool)
        core = self._core_band()
        if core is not None:
            box, local = core
            inside[box] = local & mask[box]
        return inside

    def _band(self) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """(box, mask in the box) of the band: the core band, and strokes outside it widened by ``stroke_mm``.

        A stroke inside the core band widens nothing, so adding one there keeps the graph (see
        :meth:`_add_strokes_to_graph`) and gives the same band a fresh build would.
        """
        shape = self.image.shape
        parts = [] if self._core_band() is None else [self._core_band()]
        reach = max(self.options.band_mm or 0.0, self.options.stroke_mm)
        for strokes in (self.foreground, self.background):
            if strokes is None:
                continue
            outside = strokes & ~self._in_core_band(strokes)
            box = _bounding_box(outside, margin=0)
            if box is not None:
                parts.append(_grown(box, outside[box], self.spacing, reach, shape))
        if not parts:
            return None
        union = tuple(slice(min(g[0][a].start for g in parts), max(g[0][a].stop for g in parts)) for a in range(3))
        band = np.zeros(tuple(u.stop - u.start for u in union), bool)
        for box, mask in parts:
            band[tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(box, union))] |= mask
        return union, band

    def _add_strokes_to_graph(self, foreground: np.ndarray | None, background: np.ndarray | None) -> bool:
        """Put new strokes into the existing graph; False when the band must change (then it is rebuilt).

        That is when a stroke lies outside the core band (it widens the band) or paints a voxel the graph had
        fixed with the other label.
        """
        graph = self._graph
        updates = []
        for stroke, label in ((foreground, True), (background, False)):
            if stroke is None:
                continue
            if (stroke & ~self._in_core_band(stroke)).any():
                return False
            voxels = np.flatnonzero(stroke[graph.crop].reshape(-1))
            nodes = graph.node_ids(voxels)
            if (graph.fixed[voxels[nodes < 0]] != label).any():  # a fixed voxel painted the other way
                return False
            updates.append((nodes[nodes >= 0], label))
        for nodes, label in updates:
            if not nodes.size:
                continue
            hard = np.full(nodes.size, HARD, dtype=np.float32)
            zero = np.zeros(nodes.size, dtype=np.float32)
            source, sink = (hard, zero) if label else (zero, hard)
            graph.graph.add_grid_tedges(nodes, source, sink)
            graph.graph.mark_grid_nodes(nodes)
        if any(nodes.size for nodes, _ in updates):
            graph.flow = graph.graph.maxflow(reuse_trees=True)
        return True


def _grown(box, mask, spacing, reach_mm, shape) -> tuple[tuple[slice, ...], np.ndarray]:
    """(box, mask) widened by ``reach_mm`` (a box per axis)."""
    radius = _radius_voxels(spacing, reach_mm)
    if not any(radius):
        return box, mask
    outer = _grow_box(box, radius, shape)
    padded = np.zeros(tuple(o.stop - o.start for o in outer), bool)
    padded[tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer))] = mask
    return outer, _dilate_box(padded, radius)


def _new_strokes(strokes: np.ndarray | None, earlier: np.ndarray | None) -> np.ndarray | None:
    """The voxels of ``strokes`` not in ``earlier``, or None: always a copy, since the caller may paint on."""
    if strokes is None:
        return None
    new = strokes.astype(bool)  # a copy: kept as the session's strokes, it must not follow the caller's array
    if earlier is not None:
        new &= ~earlier
    return new if new.any() else None


def _contrast(image: np.ndarray, core_box, core, options: GraphCutOptions) -> float:
    """The option's ``beta``, or the estimate over the uncertain core (the same for the band and the full cut)."""
    if options.contrast is not None:
        return float(options.contrast)
    if core_box is None:
        return 0.0
    return estimate_contrast(image[core_box], core, options.connectivity)


def _grow_box(box: tuple[slice, ...], radius: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(0, b.start - r), min(n, b.stop + r)) for b, r, n in zip(box, radius, shape))


def _uncertain_core(
    probability: np.ndarray, threshold: np.ndarray, certainty: float
) -> tuple[tuple[slice, ...] | None, np.ndarray | None]:
    """(box, mask in the box) of the voxels the network is unsure about, plus its thresholded boundary.

    Found first as the box of everything above ``certainty`` (cheap on a volume that is mostly background), then
    computed only inside it, in slabs of slices on every core (numpy releases the GIL in its loops).
    """
    box = _bounding_box(probability > certainty, margin=1)
    if box is None:
        return None, None
    local, labels = probability[box], threshold[box]
    core = np.empty(local.shape, bool)

    def slab(z: slice) -> None:
        # a slab reads one slice beyond each end so the boundary across slabs is found
        lo, hi = max(0, z.start - 1), min(local.shape[0], z.stop + 1)
        unsure = (local[z] > certainty) & (local[z] < 1 - certainty)
        unsure |= _boundary(labels[lo:hi])[z.start - lo : z.start - lo + (z.stop - z.start)]
        core[z] = unsure

    workers = min(os.cpu_count() or 1, max(1, local.shape[0] // 8))
    bounds = np.linspace(0, local.shape[0], workers + 1).astype(int)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(slab, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]))
    inner = _bounding_box(core, margin=0)
    if inner is None:
        return None, None
    return tuple(slice(b.start + i.start, b.start + i.stop) for b, i in zip(box, inner)), core[inner]


def refine_full_volume(
    image: np.ndarray,
    probability: np.ndarray,
    *,
    spacing: Sequence[float],
    options: GraphCutOptions | None = None,
    beta: float | None = None,
) -> np.ndarray:
    """The straightforward cut: every voxel a node, built with PyMaxflow's grid helpers (the baseline).

    Same unary and pairwise terms as :func:`refine_binary`; ``beta`` defaults to the same estimate.
    """
    options = options or GraphCutOptions()
    _check_probability(probability, image)
    if beta is None:
        beta = _contrast(image, *_uncertain_core(probability, probability >= 0.5, options.certainty), options)
    spacing_zyx = np.asarray(spacing, dtype=float)[::-1]
    graph = maxflow.GraphFloat()
    nodes = graph.add_grid_nodes(image.shape)
    for offset in neighbour_offsets(options.connectivity):
        a, b = _pair_slices(image.shape, offset)
        weights = np.zeros(image.shape, np.float32)
        weights[a] = _weights(image[a], image[b], beta, options.smoothness / _distance_mm(offset, spacing_zyx))
        structure = np.zeros((3, 3, 3))
        structure[tuple(1 + o for o in offset)] = 1
        graph.add_grid_edges(nodes, weights=weights, structure=structure, symmetric=True)
    cost_fg, cost_bg = unary_costs(probability)
    graph.add_grid_tedges(nodes, cost_bg, cost_fg)
    graph.maxflow()
    return ~graph.get_grid_segments(nodes)


# Several labels --------------------------------------------------------------------------------------------------


def probabilities_from_labelmap(labelmap: np.ndarray, labels: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Soft probabilities (C, z, y, x) from a labelmap: ``1 / (1 + exp(d / 1 mm))`` of the signed distance ``d``.

    For refining a segmentation that comes without the network's probabilities. Component 0 is background.
    """
    spacing_zyx = tuple(float(s) for s in reversed(tuple(spacing)))
    out = np.zeros((max(labels, default=0) + 1, *labelmap.shape), np.float32)
    margin = [int(np.ceil(6.0 / s)) for s in spacing_zyx]  # beyond 6 mm the probability is below 0.003
    for value in labels:
        mask = labelmap == value
        box = _bounding_box(mask, margin=margin)
        if box is None:
            continue
        local = mask[box]
        distance = ndimage.distance_transform_edt(~local, sampling=spacing_zyx) - ndimage.distance_transform_edt(
            local, sampling=spacing_zyx
        )
        out[value][box] = 1.0 / (1.0 + np.exp(distance))
    out[0] = np.clip(1.0 - out[1:].sum(axis=0), 0.0, 1.0)
    return out


def refine_labelmap(
    image: np.ndarray,
    probabilities: np.ndarray,
    *,
    spacing: Sequence[float],
    labels: Sequence[int],
    options: GraphCutOptions | None = None,
    foreground: np.ndarray | None = None,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """Refine every label by its own cut against its strongest competitor, then settle conflicts.

    Each class (every label and, with two labels or more, the background) is cut on its probability against its
    strongest competitor, ``p_k / (p_k + max_{j != k} p_j)`` (see :func:`_against_strongest_competitor`), so that
    splitting the foreground between touching labels does not make their boundary background, and with no
    smoothness the result is the most probable class at every voxel. The background is every component not in
    ``labels``.

    Args:
        image: (z, y, x) intensities.
        probabilities: (C, z, y, x), component k the probability of label k (0 is background).
        spacing: (x, y, z) in mm.
        labels: the label values to refine (each < C).
        foreground: (z, y, x) integer strokes: value k marks voxels that must be label k.
        background: (z, y, x) boolean strokes: voxels that must be background.

    Returns:
        (z, y, x) uint8 labelmap. A voxel claimed by several cuts goes to the class with the highest probability,
        so labels never overlap; one claimed by none (the background's cut gave it up too) goes to its most
        probable label, or with a single label is background; strokes always win.
    """
    refinement = LabelmapRefinement(image, probabilities, spacing=spacing, labels=labels, options=options)
    return refinement.refine(foreground, background)


#: How far from an even split (0.5) a class's value against its strongest competitor is put, so that exactly the
#: most probable class claims a voxel without smoothing (float rounding and ties would otherwise leave it to chance).
_TIE = 1e-6


def _class_probabilities(probabilities: np.ndarray, labels: Sequence[int]) -> dict[int, np.ndarray]:
    """The probability of each class: the background (0), that of the most probable component not in ``labels``;
    then each label's component (views, no copies, where the background is component 0 alone)."""
    outside = [c for c in range(probabilities.shape[0]) if c not in set(labels)]
    classes = {0: probabilities[outside[0]]}
    for c in outside[1:]:
        classes[0] = np.maximum(classes[0], probabilities[c])
    classes.update((v, probabilities[v]) for v in labels)
    return classes


def _against_strongest_competitor(classes: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Per class, ``p_k / (p_k + max_{j != k} p_j)`` over the volume; ``classes`` as :func:`_class_probabilities`.

    A cut on these values decides, at each voxel, between its class and the strongest other one; with no smoothness
    it claims the voxels where its class is the most probable. With two labels or more, a tie or a split within
    ``_TIE`` of even goes the way ``argmax`` settles it (the background, then the labels in order), so that exactly
    one cut claims each voxel. With one label the background's cut would be the label's complement and is not made,
    and the label's values are left as they are: where the two components sum to one, its probability itself, so a
    single structure is refined as before.
    """
    labels = [v for v in classes if v]
    dtype = np.result_type(*(p.dtype for p in classes.values()), np.float32)
    first = np.array(classes[0], dtype=dtype)  # the highest probability, and which class has it (first wins ties)
    winner = np.zeros(first.shape, np.int16)
    for position, value in enumerate(labels, 1):
        better = classes[value] > first
        first[better] = classes[value][better]
        winner[better] = position
    second = np.zeros(first.shape, dtype)  # the highest probability of a class other than the winner
    for position, strength in enumerate(classes.values()):
        np.maximum(second, strength, out=second, where=winner != position)
    competing = {}
    for position, (value, strength) in enumerate(classes.items()):
        if value == 0 and len(labels) < 2:
            continue
        mine = winner == position
        total = strength + np.where(mine, second, first)
        share = np.divide(strength, total, out=np.zeros(first.shape, dtype), where=total > 0)
        if len(labels) > 1:
            share = np.where(mine, np.maximum(share, 0.5 + _TIE), np.minimum(share, 0.5 - _TIE)).astype(dtype)
        competing[value] = share
    return competing


class LabelmapRefinement:
    """Several labels refined together, kept in memory so that strokes can be added one after the other.

    Each class has its own :class:`RefinementSession` (``sessions``, by label value): every label, and with two
    labels or more the background (value 0), cut against its strongest competitor as :func:`refine_labelmap`
    describes. A new stroke re-solves each graph from where it stopped. Arguments as for :func:`refine_labelmap`.
    """

    def __init__(
        self,
        image: np.ndarray,
        probabilities: np.ndarray,
        *,
        spacing: Sequence[float],
        labels: Sequence[int],
        options: GraphCutOptions | None = None,
    ) -> None:
        if probabilities.ndim != 4 or probabilities.shape[1:] != image.shape:
            raise RefinementError(
                f"the probabilities are {probabilities.shape[1:][::-1]} voxels but the image is {image.shape[::-1]}"
            )
        missing = [v for v in labels if not 0 < v < probabilities.shape[0]]
        if missing:
            raise RefinementError(f"labels {missing} have no probability map ({probabilities.shape[0]} components)")
        for component in probabilities:  # every component competes
            _check_probability(component, image)
        self.image, self.probabilities, self.labels = image, probabilities, list(dict.fromkeys(labels))
        self._classes = _class_probabilities(probabilities, self.labels)
        competing = _against_strongest_competitor(self._classes)
        self.sessions = {
            v: RefinementSession(image, share, spacing=spacing, options=options) for v, share in competing.items()
        }
        self.foreground: np.ndarray | None = None
        self.background: np.ndarray | None = None

    def refine(self, foreground: np.ndarray | None = None, background: np.ndarray | None = None) -> np.ndarray:
        """Add strokes (value k: label k; background: boolean) to the earlier ones and return the labelmap."""
        if foreground is not None:
            unknown = sorted(set(np.unique(foreground).tolist()) - {0, *self.labels})
            if unknown:
                raise RefinementError(f"the foreground strokes use label values {unknown} that the model does not have")
        check_strokes(self.image.shape, None if foreground is None else foreground > 0, background)
        merged_foreground, merged_background = self.foreground, self.background
        if foreground is not None:
            if (
                merged_foreground is not None
                and ((merged_foreground > 0) & (foreground > 0) & (merged_foreground != foreground)).any()
            ):
                raise RefinementError("a new stroke gives voxels another label than an earlier stroke did")
            merged_foreground = (  # a copy: the caller may paint more on its array
                foreground.copy()
                if merged_foreground is None
                else np.where(foreground > 0, foreground, merged_foreground)
            )
        if background is not None:
            merged_background = background.astype(bool) if merged_background is None else merged_background | background
        painted = None if merged_foreground is None else merged_foreground > 0
        if painted is not None and merged_background is not None and (painted & merged_background).any():
            raise RefinementError("some voxels are marked as both a label and background; erase one stroke")
        self.foreground, self.background = merged_foreground, merged_background  # only once they are consistent
        best = np.full(self.image.shape, -1.0, np.result_type(self.probabilities.dtype, np.float32))
        out = np.zeros(self.image.shape, np.uint8)
        for value, session in self.sessions.items():  # the background first: it wins ties, as in argmax
            if value:
                own = None if self.foreground is None else self.foreground == value
                others = None if painted is None else painted & (self.foreground != value)
                against = _union(others, self.background)
            else:
                own, against = self.background, painted
            mask = session.refine(_nonempty(own), _nonempty(against))  # strokes it has seen already are ignored
            probability = self._classes[value]
            wins = mask & (probability > best)
            out[wins] = value
            best[wins] = probability[wins]
        unclaimed = best < 0
        if len(self.labels) > 1 and unclaimed.any():  # the background's cut gave them up too: foreground
            likeliest = np.argmax([self.probabilities[v][unclaimed] for v in self.labels], axis=0)
            out[unclaimed] = np.asarray(self.labels, np.uint8)[likeliest]
        if painted is not None:
            out[painted] = self.foreground[painted]
        if self.background is not None:
            out[self.background] = 0
        return out


def _union(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return b
    return a if b is None else a | b


def _nonempty(mask: np.ndarray | None) -> np.ndarray | None:
    return mask if mask is not None and mask.any() else None
