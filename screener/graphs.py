"""Crystal graphs (k nearest neighbours over periodic images) and their implicit line graphs.

Plain numpy arrays, so graphs can be built in CPU workers, stored in HDF5 and batched for torch.
Structures are graphed many at a time: one k-d tree search and one pass of array operations
serve a few thousand atoms, so a cell of a few atoms costs its share of that work instead of
dozens of numpy calls of its own.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np

K = 16
_TIE = 1e-8
_GROW = 1.3
_START = 1.2
_EXTRA = 1  # images shortlisted beyond self and k; an atom whose k-th distance ties on asks again
_BATCH_ATOMS = 4096  # atoms searched together (a bigger cell alone), so memory stays bounded


class _Cell(NamedTuple):
    """A structure ready for the search: positions moved into the cell, so a cutoff bounds the
    images needed, and the first cutoff: the radius holding k atoms at the mean density, with
    some margin."""

    lattice: np.ndarray
    frac: np.ndarray
    positions: np.ndarray
    numbers: np.ndarray
    cutoff: float


class _Images(NamedTuple):
    """The images that cells sharing one block of image offsets may need, and a tree of them.

    `cols` is an image's index in its cell's full block (atom-major, offsets in lexicographic
    order): the tie-break order. `own` is each atom's image at offset zero.
    """

    points: np.ndarray
    cols: np.ndarray
    per_atom: int
    own: np.ndarray
    centres: np.ndarray
    cutoffs: np.ndarray
    tree: object
    queries: np.ndarray


def build_graph(lattice, positions, numbers, k: int = K) -> dict[str, np.ndarray]:
    """Crystal graph of one structure: each atom's k nearest neighbours, exact for any cell.

    Ties within 1e-8 Angstrom break by neighbour index, then image, so graphs are reproducible.
    """
    (graph,) = build_graphs([(lattice, positions, numbers)], k)
    if isinstance(graph, ValueError):
        raise graph
    return graph


def build_graphs(structures: Sequence[tuple], k: int = K
                 ) -> list[dict[str, np.ndarray] | ValueError]:
    """`build_graph` of each (lattice, positions, numbers), searched together.

    A structure without a graph gets the ValueError that says why, so it fails alone. No search
    reaches another structure's images, so a graph does not depend on its batch.
    """
    cells = [_cell(lattice, positions, numbers, k) for lattice, positions, numbers in structures]
    graphs = iter(_graphs([cell for cell in cells if isinstance(cell, _Cell)], k))
    return [next(graphs) if isinstance(cell, _Cell) else cell for cell in cells]


def line_graph_index(n_atoms: int, k: int = K) -> np.ndarray:
    """[src_edge, dst_edge] of every ordered pair of distinct bonds on the same centre.

    The order matches angle_cos, so the line graph never needs to be stored.
    """
    a, b = np.nonzero(~np.eye(k, dtype=bool))
    first = np.arange(n_atoms, dtype=np.int64)[:, None] * k
    return np.stack([(first + b).reshape(-1), (first + a).reshape(-1)])


def collate(graphs: list[dict], k: int = K) -> dict[str, np.ndarray]:
    """One disjoint batch graph with global atom and edge ids, as the model consumes it."""
    sizes = np.array([len(g["numbers"]) for g in graphs], dtype=np.int64)
    offsets = np.cumsum(sizes) - sizes
    n_atoms = int(sizes.sum())
    neighbors = np.concatenate([g["neighbors"] for g in graphs]).astype(np.int64)
    if len(neighbors) != n_atoms * k:
        raise ValueError(f"graphs hold {len(neighbors)} edges, expected {n_atoms} atoms x k={k}")
    edge_vec = np.concatenate([g["edge_vec"] for g in graphs])
    line_src, line_dst = line_graph_index(n_atoms, k)
    return {
        "numbers": np.concatenate([g["numbers"] for g in graphs]).astype(np.int64),
        "edge_src": neighbors + np.repeat(offsets, sizes * k),
        "edge_dst": np.repeat(np.arange(n_atoms, dtype=np.int64), k),
        "edge_len": np.linalg.norm(edge_vec, axis=1).astype(np.float32),
        "line_src": line_src,
        "line_dst": line_dst,
        "angle_cos": np.concatenate([g["angle_cos"] for g in graphs]).astype(np.float32),
        "node_graph": np.repeat(np.arange(len(graphs), dtype=np.int64), sizes),
        "n_graphs": np.array(len(graphs), dtype=np.int64),
    }


def _cell(lattice, positions, numbers, k: int) -> _Cell | ValueError:
    """The structure ready for the search; a flat, empty or non-finite cell has no neighbour
    graph, and says so instead of searching forever."""
    lattice = np.asarray(lattice, dtype=np.float64).reshape(3, 3)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(positions) == 0:
        return ValueError("structure has no atoms")
    volume = abs(np.linalg.det(lattice))
    if not volume > 1e-6:
        return ValueError(f"lattice is degenerate (cell volume {volume:.3g} A^3)")
    frac = np.linalg.solve(lattice.T, positions.T).T
    if not np.isfinite(frac).all():
        return ValueError("positions are not finite")
    frac -= np.floor(frac)
    cutoff = _START * (3 * k * volume / (4 * np.pi * len(positions))) ** (1 / 3)
    numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
    return _Cell(lattice, frac, frac @ lattice, numbers, cutoff)


def _graphs(cells: list[_Cell], k: int) -> list[dict[str, np.ndarray] | ValueError]:
    """Graphs of the cells, growing the cutoff of a cell until its search is exact. Cells that
    need the same block of image offsets are searched together."""
    graphs: list = [None] * len(cells)
    sizes = np.array([len(cell.frac) for cell in cells], dtype=np.int64)
    cutoffs = np.array([cell.cutoff for cell in cells])
    lattices = np.array([cell.lattice for cell in cells]).reshape(-1, 3, 3)
    inverse = np.linalg.norm(np.linalg.inv(lattices), axis=1)
    pending = np.arange(len(cells))
    while len(pending):
        margins = cutoffs[:, None] * inverse
        reach = np.floor(margins).astype(np.int64) + 1
        for batch in _batches(pending, reach[pending], sizes):
            found = _batch_graphs([cells[i] for i in batch], cutoffs[batch], margins[batch],
                                  reach[batch[0]], k)
            for i, graph in zip(batch, found):
                graphs[i] = graph
        pending = np.array([i for i in pending if graphs[i] is None], dtype=np.int64)
        cutoffs[pending] *= _GROW
    return graphs


def _batches(cells: np.ndarray, reach: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """The cells grouped by their block of image offsets, a few thousand atoms at a time."""
    _, kind = np.unique(reach, axis=0, return_inverse=True)
    order = np.argsort(kind.reshape(-1), kind="stable")
    cells, kind = cells[order], kind.reshape(-1)[order]
    part = (np.cumsum(sizes[cells]) - sizes[cells]) // _BATCH_ATOMS
    return np.split(cells, np.flatnonzero((np.diff(kind) != 0) | (np.diff(part) != 0)) + 1)


def _batch_graphs(cells: list[_Cell], cutoffs: np.ndarray, margins: np.ndarray,
                  reach: np.ndarray, k: int) -> list[dict[str, np.ndarray] | ValueError | None]:
    """Graph of each cell, why it has none, or None where its cutoff holds fewer than k
    images for some atom."""
    images = _images(cells, cutoffs, margins, reach)
    sizes = np.array([len(cell.frac) for cell in cells])
    chosen, short = _nearest(images, sizes, k)
    neighbors = images.cols[chosen] // images.per_atom
    edge_vec = images.points[chosen] - images.centres[:, None, :]
    length = np.linalg.norm(edge_vec, axis=-1)
    ends = np.cumsum(sizes)
    apart = np.logical_and.reduceat(np.all(length > _TIE, axis=1), ends - sizes)
    with np.errstate(divide="ignore", invalid="ignore"):  # coincident atoms: that graph is dropped
        angle_cos = _angle_cos(edge_vec, length)
    edge_vec = edge_vec.astype(np.float32)
    return [None if miss else {
        "numbers": cell.numbers,
        "neighbors": neighbors[end - n:end].reshape(-1),
        "edge_vec": edge_vec[end - n:end].reshape(-1, 3),
        "angle_cos": angle_cos[end - n:end].reshape(-1),
    } if ok else ValueError("two atoms coincide: a bond has zero length")
        for cell, end, n, ok, miss in zip(cells, ends, sizes, apart, short)]


def _images(cells: list[_Cell], cutoffs: np.ndarray, margins: np.ndarray, reach: np.ndarray
            ) -> _Images:
    """The images that can lie within a cell's cutoff of one of its atoms, for cells that share
    one block of image offsets: those within the cell's margin (cutoff / height) of the cell
    along each axis, in fractional terms.

    Images needed lie nearer still (cutoff - 1e-8), so rounding of the fractional coordinates
    cannot drop one.
    """
    sizes = np.array([len(cell.frac) for cell in cells])
    cell_of = np.repeat(np.arange(len(cells)), sizes)
    frac = np.concatenate([cell.frac for cell in cells])
    centres = np.concatenate([cell.positions for cell in cells])
    margin = margins[cell_of]
    a, b, c = (np.abs(frac[:, i, None] + np.arange(-r, r + 1) - 0.5) <= 0.5 + margin[:, i, None]
               for i, r in enumerate(reach.tolist()))
    near = a[:, :, None, None] & b[:, None, :, None] & c[:, None, None, :]
    atom, image = np.nonzero(near.reshape(len(frac), -1))
    offsets = _image_offsets(*reach.tolist())
    shifts = offsets @ np.array([cell.lattice for cell in cells])
    points = centres[atom] + shifts[cell_of[atom], image]
    cols = (atom - (np.cumsum(sizes) - sizes)[cell_of[atom]]) * len(offsets) + image
    tree, queries = _tree(points, cell_of[atom], centres, cell_of, cutoffs)
    own = np.flatnonzero(image == len(offsets) // 2)
    return _Images(points, cols, len(offsets), own, centres, cutoffs[cell_of], tree, queries)


def _tree(points: np.ndarray, point_cell: np.ndarray, centres: np.ndarray, centre_cell: np.ndarray,
          cutoffs: np.ndarray) -> tuple[object, np.ndarray]:
    """A k-d tree of all cells' images where one search radius (1) serves every cell and no
    search reaches another cell's images, and the atoms' coordinates to search from.

    Coordinates are divided by the cell's cutoff, and cells laid side by side along x, 2
    apart. The rounding that adds (1e-16 of the row's length) only blurs the shortlist, far
    below the 1e-8 margins of the exactness checks.
    """
    from scipy.spatial import cKDTree

    scaled, queries = points / cutoffs[point_cell, None], centres / cutoffs[centre_cell, None]
    starts = np.searchsorted(point_cell, np.arange(len(cutoffs)))
    low = np.minimum.reduceat(scaled[:, 0], starts)
    width = np.maximum.reduceat(scaled[:, 0], starts) - low + 2.0
    apart = np.cumsum(width) - width - low
    scaled[:, 0] += apart[point_cell]
    queries[:, 0] += apart[centre_cell]
    return cKDTree(scaled, leafsize=64, balanced_tree=False, compact_nodes=False), queries


@lru_cache(maxsize=64)
def _image_offsets(*reach: int) -> np.ndarray:
    """Integer image offsets in lexicographic order (the tie-break order), zero in the middle."""
    axes = [np.arange(-r, r + 1) for r in reach]
    shifts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.float64)
    shifts.setflags(write=False)
    return shifts


def _nearest(images: _Images, sizes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each atom's k nearest images (atoms, k) among those kept, and which cells have an atom
    with fewer than k within the cutoff (their rows are left unfinished).

    With positions inside the cell, every image closer than cutoff is among the images kept,
    so a k-th distance below cutoff is the true one.
    """
    cell_of = np.repeat(np.arange(len(sizes)), sizes)
    chosen = np.zeros((len(cell_of), k), dtype=np.int64)
    short = np.zeros(len(sizes), dtype=bool)
    rows, extra = np.arange(len(cell_of)), _EXTRA
    while len(rows):
        picks, kth, complete = _shortlist(images, rows, k, k + 1 + extra)
        short[cell_of[rows[kth + 2 * _TIE > images.cutoffs[rows]]]] = True
        chosen[rows[complete]] = picks[complete]
        rows = rows[~complete & ~short[cell_of[rows]]]
        extra *= 4
    return chosen, short


def _shortlist(images: _Images, rows: np.ndarray, k: int, count: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k nearest images of some atoms in (rounded distance, col) order, their k-th
    distances, and whether each shortlist of `count` reached past that k-th distance's ties.

    The tree only shortlists; the order comes from distances computed directly, like the
    bond vectors, so the tree's rounding cannot change it.
    """
    reached, found = images.tree.query(images.queries[rows], k=count, distance_upper_bound=1.0)
    own = images.own[rows, None]
    found = np.where(found == len(images.points), own, found)
    dist = np.linalg.norm(images.points[found] - images.centres[rows, None, :], axis=-1)
    dist[found == own] = np.inf
    order = np.lexsort((images.cols[found], np.rint(dist / _TIE)), axis=1)[:, :k]
    found, dist = np.take_along_axis(found, order, 1), np.take_along_axis(dist, order, 1)
    kth = dist[:, k - 1]
    return found, kth, reached[:, -1] * images.cutoffs[rows] > kth + 3 * _TIE


def _angle_cos(edge_vec: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Cosines of all ordered bond pairs per centre, in line_graph_index order: the
    off-diagonal of each k x k matrix row by row, which is its flat form after the first entry
    cut into rows of k + 1, less the last of each.

    The transpose is copied so that numpy multiplies by gemm: for a product with its own
    transpose it takes syrk, which gives the same numbers here at half the speed.
    """
    n, k = length.shape
    unit = edge_vec / length[..., None]
    flat = (unit @ unit.transpose(0, 2, 1).copy()).reshape(n, k * k)
    cos = flat[:, 1:].reshape(n, k - 1, k + 1)[:, :, :k].astype(np.float32)
    return np.clip(cos, -1.0, 1.0, out=cos).reshape(n, -1)
