"""Crystal graphs (k nearest neighbours over periodic images) and their implicit line graphs.

Plain numpy arrays, so graphs can be built in CPU workers, stored in HDF5 and batched for torch.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

K = 16
_TIE = 1e-8
_GROW = 1.3
_START = 1.2
_BRUTE_MAX = 4096  # centres x images above which a k-d tree beats the full distance matrix


def build_graph(lattice, positions, numbers, k: int = K) -> dict[str, np.ndarray]:
    """Crystal graph of one structure: each atom's k nearest neighbours, exact for any cell.

    Ties within 1e-8 Angstrom break by neighbour index, then image, so graphs are reproducible.
    """
    lattice = np.asarray(lattice, dtype=np.float64).reshape(3, 3)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    _check(lattice, positions)
    neighbors, edge_vec = _nearest(lattice, _wrap(lattice, positions), k)
    return {
        "numbers": np.asarray(numbers, dtype=np.int64).reshape(-1),
        "neighbors": neighbors.reshape(-1),
        "edge_vec": edge_vec.reshape(-1, 3).astype(np.float32),
        "angle_cos": _angle_cos(edge_vec, k),
    }


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


def _check(lattice: np.ndarray, positions: np.ndarray) -> None:
    """A flat cell or an empty one has no neighbour graph; fail instead of searching forever."""
    if len(positions) == 0:
        raise ValueError("structure has no atoms")
    volume = abs(np.linalg.det(lattice))
    if not volume > 1e-6:
        raise ValueError(f"lattice is degenerate (cell volume {volume:.3g} A^3)")


def _wrap(lattice: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Positions moved into the cell, so a cutoff bounds the image range needed."""
    frac = np.linalg.solve(lattice.T, positions.T).T
    return (frac - np.floor(frac)) @ lattice


def _nearest(lattice, positions, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour indices (n, k) and bond vectors (n, k, 3), growing the cutoff until exact.

    The first cutoff is the radius holding k atoms at the mean density, with some margin.
    """
    volume = abs(np.linalg.det(lattice))
    heights = 1.0 / np.linalg.norm(np.linalg.inv(lattice), axis=0)
    cutoff = _START * (3 * k * volume / (4 * np.pi * len(positions))) ** (1 / 3)
    while (found := _nearest_within(lattice, heights, positions, k, cutoff)) is None:
        cutoff *= _GROW
    return found


def _nearest_within(lattice, heights, positions, k: int, cutoff: float):
    """k nearest among all images within cutoff, or None when some atom has fewer than k there.

    With positions inside the cell, every atom closer than cutoff lies in the image block, so a
    k-th distance below cutoff is the true one.
    """
    reach = np.floor(cutoff / heights).astype(np.int64) + 1
    shifts = _image_shifts(*reach.tolist()) @ lattice
    images = (positions[:, None, :] + shifts).reshape(-1, 3)
    per_atom = len(shifts)
    self_cols = np.arange(len(positions)) * per_atom + per_atom // 2
    if len(positions) * len(images) > _BRUTE_MAX:
        cols = _select_tree(images, positions, self_cols, k, cutoff)
        if cols is None:
            return None
        return cols // per_atom, images[cols] - positions[:, None, :]
    cols = _select(images, positions, self_cols, k, cutoff)
    if cols is None:
        return None
    return cols // per_atom, images[cols] - positions[:, None, :]


@lru_cache(maxsize=64)
def _image_shifts(*reach: int) -> np.ndarray:
    """Integer image offsets in lexicographic order (the tie-break order), zero in the middle."""
    axes = [np.arange(-r, r + 1) for r in reach]
    shifts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.float64)
    shifts.setflags(write=False)
    return shifts


def _select(images, centres, self_cols, k: int, cutoff: float):
    """Columns of the k nearest images per centre, ordered by (rounded distance, column).

    Squared distances by matrix product only shortlist candidates; the order comes from
    distances computed directly, so rounding noise of the product cannot change it.
    """
    rows = np.arange(len(centres))
    sq = (images * images).sum(1) - 2 * centres @ images.T + (centres * centres).sum(1)[:, None]
    sq[rows, self_cols] = np.inf
    kth = np.sqrt(np.maximum(np.partition(sq, k - 1, axis=1)[:, k - 1], 0.0))
    if np.any(kth + 2 * _TIE > cutoff):
        return None
    cand_rows, cand_cols = np.nonzero(sq <= ((kth + 2 * _TIE) ** 2)[:, None])
    dist = np.linalg.norm(images[cand_cols] - centres[cand_rows], axis=1)
    order = np.lexsort((np.rint(dist / _TIE), cand_rows))
    counts = np.bincount(cand_rows, minlength=len(centres))
    firsts = np.cumsum(counts) - counts
    return cand_cols[order[firsts[:, None] + np.arange(k)]]


def _select_tree(images, centres, self_cols, k: int, cutoff: float, extra: int = 8):
    """`_select` for large cells: a k-d tree shortlists k + 1 + extra images per centre (self
    included), enough once the last lies beyond every k-th neighbour's tie window."""
    from scipy.spatial import cKDTree

    tree = cKDTree(images)
    while True:
        reached, cols = tree.query(centres, k=k + 1 + extra, distance_upper_bound=cutoff)
        found = cols < len(images)
        cols = np.where(found, cols, self_cols[:, None])
        dist = np.linalg.norm(images[cols] - centres[:, None, :], axis=-1)
        dist[(cols == self_cols[:, None]) | ~found] = np.inf
        order = np.lexsort((cols, np.rint(dist / _TIE)), axis=1)
        cols, dist = np.take_along_axis(cols, order, 1), np.take_along_axis(dist, order, 1)
        kth = dist[:, k - 1]
        if np.any(kth + 2 * _TIE > cutoff):
            return None
        if np.all(reached[:, -1] > kth + 3 * _TIE) or k + 1 + extra >= len(images):
            return cols[:, :k]
        extra *= 2


def _angle_cos(edge_vec: np.ndarray, k: int) -> np.ndarray:
    """Cosines of all ordered bond pairs per centre, in line_graph_index order."""
    length = np.linalg.norm(edge_vec, axis=-1, keepdims=True)
    if not np.all(length > _TIE):
        raise ValueError("two atoms coincide: a bond has zero length")
    unit = edge_vec / length
    cos = unit @ unit.transpose(0, 2, 1)
    return np.clip(cos[:, ~np.eye(k, dtype=bool)], -1.0, 1.0).astype(np.float32).reshape(-1)
