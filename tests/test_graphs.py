"""Crystal graphs on the real JARVIS structures: exact neighbours, stable ties, correct batching."""
from __future__ import annotations

import gzip
import itertools
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from jarvis.core.specie import Specie

from screener.graphs import K, build_graph, build_graphs, collate, line_graph_index

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


@cache
def _atomic_number(element: str) -> int:
    return Specie(element).Z


def _arrays(atoms: dict) -> Arrays:
    """(lattice, cartesian positions, atomic numbers) straight from a JARVIS atoms dict."""
    lattice = np.array(atoms["lattice_mat"], dtype=np.float64)
    coords = np.array(atoms["coords"], dtype=np.float64)
    positions = coords if atoms["cartesian"] else coords @ lattice
    numbers = np.array([_atomic_number(e) for e in atoms["elements"]], dtype=np.int64)
    return lattice, positions, numbers


@pytest.fixture(scope="module")
def structures(shared_data: Path) -> list[Arrays]:
    with gzip.open(shared_data / "jarvis_structures.json.gz", "rt") as f:
        return [_arrays(record["atoms"]) for record in json.load(f)]


def _brute_force_distances(lattice: np.ndarray, positions: np.ndarray, k: int) -> np.ndarray:
    """Sorted k nearest distances per atom over an image block that surely holds them.

    The k-th distance within the 27 nearest cells bounds the true one; the block then reaches
    that far beyond the spread of the (unwrapped) fractional coordinates.
    """
    bound = _kth_distances(lattice, positions, np.ones(3, dtype=int), k)[:, -1].max()
    volume = abs(np.linalg.det(lattice))
    heights = [volume / np.linalg.norm(np.cross(lattice[i - 2], lattice[i - 1])) for i in range(3)]
    frac = positions @ np.linalg.inv(lattice)
    spread = frac.max(axis=0) - frac.min(axis=0)
    reach = np.ceil(bound / np.array(heights) + spread).astype(int) + 1
    return _kth_distances(lattice, positions, reach, k)


def _kth_distances(lattice, positions, reach, k: int) -> np.ndarray:
    """Sorted k smallest distances from each atom to every image in the block, itself excluded."""
    offsets = np.array(list(itertools.product(*[range(-r, r + 1) for r in reach])))
    images = (positions[None, :, :] + (offsets @ lattice)[:, None, :]).reshape(-1, 3)
    zero = int(np.flatnonzero((offsets == 0).all(axis=1))[0]) * len(positions)
    rows = []
    for i, centre in enumerate(positions):
        dist = np.linalg.norm(images - centre, axis=1)
        dist[zero + i] = np.inf
        rows.append(np.sort(np.partition(dist, k - 1)[:k]))
    return np.array(rows)


def _lengths(graph: dict) -> np.ndarray:
    return np.linalg.norm(graph["edge_vec"].astype(np.float64), axis=1).reshape(-1, K)


@pytest.mark.slow
def test_neighbours_match_brute_force_on_every_structure(structures: list[Arrays]) -> None:
    assert len(structures) == 2312
    for index, (lattice, positions, numbers) in enumerate(structures):
        lengths = _lengths(build_graph(lattice, positions, numbers))
        expected = _brute_force_distances(lattice, positions, K)
        assert np.allclose(lengths, expected, rtol=0, atol=1e-6), f"structure {index}"


def _awkward_cells() -> list[Arrays]:
    """Cells that need many images, a wide or a grown cutoff, or the k-d tree's retries."""
    rng = np.random.default_rng(7)
    needle = np.diag([1.4, 1.6, 30.0])
    slab = np.array([[2.5, 0.0, 0.0], [2.4, 0.4, 0.0], [0.0, 0.0, 25.0]])
    big = np.diag([14.0, 15.0, 16.0])
    return [
        (needle, np.zeros((1, 3)), np.array([1])),
        (slab, np.array([[0.1, 0.1, 1.0], [1.3, 0.3, 2.0]]), np.array([6, 8])),
        (big, rng.uniform(size=(300, 3)) @ big, np.full(300, 14)),
        (4.0 * np.eye(3), 4.0 * np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]]), np.array([26, 26])),
    ]


def test_batched_graphs_equal_graphs_built_one_by_one(structures: list[Arrays]) -> None:
    """All 2,312 structures (big cells, cells that need many images or a grown cutoff) plus
    awkward and unbuildable cells in one batch: the same arrays, bit for bit, as one by one."""
    unbuildable = [(np.diag([3.0, 3.0, 0.0]), np.zeros((1, 3)), np.array([1])),
                   (3.0 * np.eye(3), np.zeros((2, 3)), np.array([1, 1]))]
    batch = structures[:1000] + unbuildable[:1] + _awkward_cells() + structures[1000:] + unbuildable[1:]
    built = build_graphs(batch)
    assert len(built) == len(batch)
    for index, (structure, graph) in enumerate(zip(batch, built)):
        try:
            alone = build_graph(*structure)
        except ValueError as error:
            assert isinstance(graph, ValueError) and str(graph) == str(error), f"structure {index}"
            continue
        assert graph.keys() == alone.keys(), f"structure {index}"
        for key in alone:
            assert graph[key].dtype == alone[key].dtype, f"structure {index} {key}"
            assert np.array_equal(graph[key], alone[key]), f"structure {index} {key}"
    assert sum(isinstance(graph, ValueError) for graph in built) == 2


def test_awkward_cells_match_brute_force() -> None:
    for lattice, positions, numbers in _awkward_cells():
        lengths = _lengths(build_graph(lattice, positions, numbers))
        assert np.allclose(lengths, _brute_force_distances(lattice, positions, K), rtol=0, atol=1e-6)


def test_graph_shapes_and_types(structures: list[Arrays]) -> None:
    lattice, positions, numbers = structures[0]
    graph = build_graph(lattice, positions, numbers)
    n = len(numbers)
    assert graph["numbers"].dtype == np.int64 and np.array_equal(graph["numbers"], numbers)
    assert graph["neighbors"].shape == (n * K,) and graph["neighbors"].dtype == np.int64
    assert graph["edge_vec"].shape == (n * K, 3) and graph["edge_vec"].dtype == np.float32
    assert graph["angle_cos"].shape == (n * K * (K - 1),)
    assert graph["angle_cos"].dtype == np.float32
    assert np.all(np.diff(_lengths(graph), axis=1) >= -1e-6)


def test_simple_cubic_single_atom_breaks_ties_by_image() -> None:
    lattice = 3.0 * np.eye(3)
    graph = build_graph(lattice, np.zeros((1, 3)), np.array([29]))
    faces = sorted(v for v in itertools.product((-1, 0, 1), repeat=3) if np.abs(v).sum() == 1)
    edges = sorted(v for v in itertools.product((-1, 0, 1), repeat=3) if np.abs(v).sum() == 2)
    assert np.array_equal(graph["neighbors"], np.zeros(K, dtype=np.int64))
    assert np.allclose(_lengths(graph), [3.0] * 6 + [3.0 * np.sqrt(2)] * 10)
    assert np.array_equal(graph["edge_vec"], 3.0 * np.array(faces + edges[:10], dtype=np.float32))


def test_atom_order_does_not_change_distances(structures: list[Arrays]) -> None:
    lattice, positions, numbers = next(s for s in structures if len(s[2]) >= 8)
    perm = np.random.default_rng(0).permutation(len(numbers))
    original = _lengths(build_graph(lattice, positions, numbers))
    permuted = _lengths(build_graph(lattice, positions[perm], numbers[perm]))
    assert np.allclose(permuted, original[perm], rtol=0, atol=1e-6)


def test_edge_vectors_join_an_atom_to_a_periodic_image(structures: list[Arrays]) -> None:
    for lattice, positions, numbers in structures[:50]:
        graph = build_graph(lattice, positions, numbers)
        centres = np.repeat(np.arange(len(numbers)), K)
        between = positions[graph["neighbors"]] - positions[centres]
        image = (graph["edge_vec"] - between) @ np.linalg.inv(lattice)
        assert np.allclose(image, np.rint(image), atol=1e-4)


def test_angle_cosines_match_direct_computation(structures: list[Arrays]) -> None:
    lattice, positions, numbers = next(s for s in structures if len(s[2]) == 2)
    graph = build_graph(lattice, positions, numbers)
    vec = graph["edge_vec"].astype(np.float64)
    expected = [
        np.dot(vec[i * K + a], vec[i * K + b])
        / (np.linalg.norm(vec[i * K + a]) * np.linalg.norm(vec[i * K + b]))
        for i in range(len(numbers))
        for a in range(K)
        for b in range(K)
        if a != b
    ]
    assert np.allclose(graph["angle_cos"], expected, atol=1e-6)


def test_line_graph_index_follows_angle_order() -> None:
    n, k = 2, 4
    expected = [(i * k + b, i * k + a) for i in range(n) for a in range(k) for b in range(k) if a != b]
    index = line_graph_index(n, k)
    assert index.dtype == np.int64
    assert np.array_equal(index.T, np.array(expected))


def test_collate_offsets_three_graphs(structures: list[Arrays]) -> None:
    picked = [structures[i] for i in (0, 1, 2)]
    graphs = [build_graph(*s) for s in picked]
    sizes = np.array([len(s[2]) for s in picked])
    starts = np.cumsum(sizes) - sizes
    batch = collate(graphs)
    n_atoms, n_edges = sizes.sum(), sizes.sum() * K
    assert int(batch["n_graphs"]) == 3
    assert np.array_equal(np.bincount(batch["node_graph"]), sizes)
    assert np.array_equal(batch["numbers"], np.concatenate([s[2] for s in picked]))
    assert batch["edge_src"].shape == batch["edge_dst"].shape == (n_edges,)
    edge_graph = batch["node_graph"][batch["edge_dst"]]
    assert np.array_equal(edge_graph, batch["node_graph"][batch["edge_src"]])
    assert np.array_equal(np.bincount(edge_graph), sizes * K)
    assert np.array_equal(batch["edge_src"] - starts[edge_graph],
                          np.concatenate([g["neighbors"] for g in graphs]))
    assert np.array_equal(batch["edge_dst"], np.repeat(np.arange(n_atoms), K))
    assert batch["edge_len"].dtype == np.float32
    assert np.allclose(batch["edge_len"], np.concatenate([_lengths(g).ravel() for g in graphs]))
    assert batch["line_src"].shape == batch["angle_cos"].shape == (n_atoms * K * (K - 1),)
    assert batch["line_src"].max() < n_edges and batch["line_dst"].max() < n_edges
    assert np.array_equal(batch["edge_dst"][batch["line_src"]], batch["edge_dst"][batch["line_dst"]])
    assert not np.any(batch["line_src"] == batch["line_dst"])
    assert np.array_equal(batch["angle_cos"], np.concatenate([g["angle_cos"] for g in graphs]))


def test_same_input_gives_identical_graph(structures: list[Arrays]) -> None:
    for lattice, positions, numbers in [(3.0 * np.eye(3), np.zeros((1, 3)), np.array([29]))] + [
        structures[i] for i in (0, 5, 17)
    ]:
        first, second = build_graph(lattice, positions, numbers), build_graph(lattice, positions, numbers)
        assert all(np.array_equal(first[key], second[key]) for key in first)


def test_unbuildable_cells_fail_with_a_reason() -> None:
    with pytest.raises(ValueError, match="degenerate"):
        build_graph(np.diag([3.0, 3.0, 0.0]), np.zeros((1, 3)), np.array([1]))
    with pytest.raises(ValueError, match="no atoms"):
        build_graph(3.0 * np.eye(3), np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="coincide"):
        build_graph(3.0 * np.eye(3), np.zeros((2, 3)), np.array([1, 1]))
