"""ALIGNN (Choudhary & DeCost 2021) in plain torch, predicting a DOS per crystal.

Graphs arrive in the flat `screener.graphs.collate` layout, so message passing is
`index_select` / `index_add_` over index arrays: no DGL, and the same code runs on CPU and CUDA.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from screener.dos import N_BINS
from screener.model.gap_head import GapHead

MAX_Z = 118
GATE_EPS = 1e-6
BLOCK_ELEMENTS = 1 << 22
INDEX_KEYS = ("numbers", "edge_src", "edge_dst", "line_src", "line_dst", "node_graph")


@dataclass
class ALIGNNConfig:
    """Hyperparameters; the defaults are upstream ALIGNN's."""

    hidden: int = 256
    embedding: int = 64
    edge_rbf: int = 80
    angle_rbf: int = 40
    alignn_layers: int = 4
    gcn_layers: int = 4
    outputs: int = N_BINS
    cutoff: float = 8.0
    atom_features: str = "cgcnn"
    gap_members: int = 0


@lru_cache(maxsize=1)
def cgcnn_table() -> np.ndarray:
    """(119, 92) CGCNN element vectors from jarvis-tools indexed by Z; unknown elements are zero.

    A table lets the model take bare atomic numbers, so graphs stay small and feature-free.
    """
    from jarvis.core.specie import cgcnn_feature_json

    with open(cgcnn_feature_json) as f:
        features = {int(z): v for z, v in json.load(f).items()}
    table = np.zeros((MAX_Z + 1, len(features[1])), np.float32)
    for z, vector in features.items():
        if z <= MAX_Z:
            table[z] = vector
    table.setflags(write=False)
    return table


class RBF(nn.Module):
    """Gaussians exp(-gamma (d - c)^2) on evenly spaced centres, gamma = 1 / spacing (upstream)."""

    def __init__(self, vmin: float, vmax: float, bins: int):
        super().__init__()
        self.register_buffer("centers", torch.linspace(vmin, vmax, bins), persistent=False)
        self.gamma = (bins - 1) / (vmax - vmin)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return (d.unsqueeze(1) - self.centers).square_().mul_(-self.gamma).exp_()


def mlp_layer(n_in: int, n_out: int) -> nn.Sequential:
    """Linear, LayerNorm, SiLU: upstream ALIGNN's embedding block."""
    return nn.Sequential(nn.Linear(n_in, n_out), nn.LayerNorm(n_out), nn.SiLU(inplace=True))


def blocks(n_rows: int, width: int, device: torch.device, multiple: int = 1) -> list[slice]:
    """Row ranges (multiples of `multiple` rows) for blockwise work on the CPU.

    There a fresh 100 MB temporary costs more in page faults than the arithmetic done on it,
    while blocks of BLOCK_ELEMENTS values (16 MB in float32, below malloc's 32 MB mmap limit)
    reuse memory already mapped. Bigger blocks mean fewer ops, which matters on a busy machine.
    Accelerators get one block.
    """
    if device.type != "cpu":
        return [slice(0, n_rows)]
    step = multiple * max(1, BLOCK_ELEMENTS // (width * multiple))
    return [slice(i, min(i + step, n_rows)) for i in range(0, max(n_rows, 1), step)]


def blockwise(module: nn.Module, rows: torch.Tensor, width: int) -> torch.Tensor:
    """`module(rows)` for a row-wise module with `width` outputs, computed block by block."""
    return torch.cat([module(rows[part]) for part in blocks(len(rows), width, rows.device)])


class EdgeGatedGraphConv(nn.Module):
    """Edge-gated graph convolution, eqs (1)-(3), with residual node and edge updates.

    e'_ij = Ω_src x_i + Ω_dst x_j + Ω_e e_ij for a message i -> j (src -> dst); the gates
    sigmoid(e'_ij) are normalised over the edges entering each node, which then takes
    x_j + SiLU(Norm(Λ1 x_j + Σ_i gate_ij ⊙ Λ2 x_i)); edges take e_ij + SiLU(Norm(e'_ij)).
    LayerNorm stands in for the paper's BatchNorm so that a structure's prediction does not
    depend on which other structures share its batch. `node_linear` stacks Ω_src, Ω_dst, Λ1, Λ2
    (in that order) so the node side is one GEMM instead of four.
    """

    def __init__(self, features: int):
        super().__init__()
        self.node_linear = nn.Linear(features, 4 * features)
        self.edge_gate = nn.Linear(features, features, bias=False)
        self.node_norm = nn.LayerNorm(features)
        self.edge_norm = nn.LayerNorm(features)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        src: torch.Tensor,
        dst: torch.Tensor,
        in_degree: int | None = None,
        update_edges: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New (x, e); e is None without `update_edges`, for a last layer whose edges go unused.

        `in_degree`: every node has exactly that many incoming edges, stored consecutively in
        node order (the `collate` layout), so gathers at dst become broadcasts and scatters
        become reshape-sums.
        """
        f = x.shape[1]
        gate_src, gate_dst, self_update, neighbour_update = self.node_linear(x).split(f, dim=1)
        summed, norm = torch.zeros_like(self_update), torch.zeros_like(self_update)
        block_sums, new_edges = [], []
        for rows in blocks(len(src), f, x.device, in_degree or 1):
            m = torch.addmm(gate_src.index_select(0, src[rows]), e[rows], self.edge_gate.weight.t())
            if in_degree is None:
                m += gate_dst.index_select(0, dst[rows])
            else:
                nodes = slice(rows.start // in_degree, rows.stop // in_degree)
                m.view(-1, in_degree, f).add_(gate_dst[nodes].unsqueeze(1))
            sigma = torch.sigmoid(m)
            messages = neighbour_update.index_select(0, src[rows]).mul_(sigma)
            if in_degree is None:
                summed.index_add_(0, dst[rows], messages)
                norm.index_add_(0, dst[rows], sigma)
            else:
                block_sums.append((messages.view(-1, in_degree, f).sum(1),
                                   sigma.view(-1, in_degree, f).sum(1)))
            if update_edges:
                new_edges.append(F.silu(self.edge_norm(m), inplace=True).add_(e[rows]))
        if block_sums:
            summed, norm = (torch.cat(parts) for parts in zip(*block_sums))
        h = summed.div_(norm.add_(GATE_EPS)).add_(self_update)
        x = F.silu(self.node_norm(h), inplace=True).add_(x)
        return x, torch.cat(new_edges) if update_edges else None


Edges = tuple[torch.Tensor, torch.Tensor, int | None]


class ALIGNNLayer(nn.Module):
    """Line graph first (bonds gated by angles), then the crystal graph with the new bonds."""

    def __init__(self, features: int):
        super().__init__()
        self.line_conv = EdgeGatedGraphConv(features)
        self.crystal_conv = EdgeGatedGraphConv(features)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        z: torch.Tensor,
        bonds: Edges,
        angles: Edges,
        update_angles: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        y, z = self.line_conv(y, z, *angles, update_edges=update_angles)
        x, y = self.crystal_conv(x, y, *bonds)
        return x, y, z


class ALIGNN(nn.Module):
    """D-ALIGNN: crystal + line graph -> `outputs` values per structure.

    With `nonnegative` the head ends in softplus, since a DOS is never negative; AE-ALIGNN
    turns it off because its latent vectors can be.
    """

    arch = "d-alignn"

    def __init__(self, config: ALIGNNConfig | None = None, nonnegative: bool = True):
        super().__init__()
        config = config or ALIGNNConfig()
        if config.atom_features != "cgcnn":
            raise ValueError(f"atom_features {config.atom_features!r}: only 'cgcnn' is supported")
        self.config = config
        self.nonnegative = nonnegative
        table = torch.from_numpy(cgcnn_table().copy())
        self.register_buffer("atom_table", table)
        h, emb = config.hidden, config.embedding
        self.atom_embedding = mlp_layer(table.shape[1], h)
        self.edge_embedding = nn.Sequential(
            RBF(0.0, config.cutoff, config.edge_rbf),
            mlp_layer(config.edge_rbf, emb),
            mlp_layer(emb, h),
        )
        self.angle_embedding = nn.Sequential(
            RBF(-1.0, 1.0, config.angle_rbf),
            mlp_layer(config.angle_rbf, emb),
            mlp_layer(emb, h),
        )
        self.alignn_layers = nn.ModuleList(ALIGNNLayer(h) for _ in range(config.alignn_layers))
        self.gcn_layers = nn.ModuleList(EdgeGatedGraphConv(h) for _ in range(config.gcn_layers))
        self.fc = nn.Linear(h, config.outputs)
        self.gap_head = (GapHead(h + config.outputs, config.gap_members)
                         if config.gap_members else None)

    def config_dict(self) -> dict:
        return asdict(self.config)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, outputs) for a `to_tensors(collate(...))` batch."""
        return self.head(self.pooled(batch))

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        out = self.fc(pooled)
        return F.softplus(out) if self.nonnegative else out

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, hidden): the mean over each structure's atoms of their last features."""
        numbers = batch["numbers"]
        bonds = adjacency(batch["edge_src"], batch["edge_dst"], len(numbers))
        angles = adjacency(batch["line_src"], batch["line_dst"], len(bonds[0]))
        x = self.atom_embedding(self.atom_table).index_select(0, numbers)
        y = blockwise(self.edge_embedding, batch["edge_len"], self.config.hidden)
        z = blockwise(self.angle_embedding, batch["angle_cos"], self.config.hidden)
        for i, layer in enumerate(self.alignn_layers, 1):
            x, y, z = layer(x, y, z, bonds, angles, update_angles=i < len(self.alignn_layers))
        for i, conv in enumerate(self.gcn_layers, 1):
            x, y = conv(x, y, *bonds, update_edges=i < len(self.gcn_layers))
        return mean_pool(x, batch["node_graph"], int(batch["n_graphs"]))


def adjacency(src: torch.Tensor, dst: torch.Tensor, n_nodes: int) -> Edges:
    """(src, dst, in_degree), in_degree set when dst is 0,0,..,1,1,.. with equal runs."""
    if n_nodes == 0 or len(dst) % n_nodes:
        return src, dst, None
    degree = len(dst) // n_nodes
    if degree == 0:
        return src, dst, None
    runs = dst.reshape(n_nodes, degree) == torch.arange(n_nodes, device=dst.device).unsqueeze(1)
    return src, dst, degree if bool(runs.all()) else None


def mean_pool(x: torch.Tensor, node_graph: torch.Tensor, n_graphs: int) -> torch.Tensor:
    """Average of the atom features of each graph."""
    total = x.new_zeros(n_graphs, x.shape[1]).index_add_(0, node_graph, x)
    count = x.new_zeros(n_graphs).index_add_(0, node_graph, x.new_ones(len(node_graph)))
    return total / count.clamp_min(1.0).unsqueeze(1)


def to_tensors(batch: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict:
    """A `collate` batch as torch tensors on `device`: indices int64, features float32.

    `n_graphs` stays on the CPU: the model reads it as a size, which would otherwise force a
    device sync.
    """
    device = torch.device(device)
    pinned = device.type == "cuda"
    out = {"n_graphs": torch.as_tensor(np.asarray(batch["n_graphs"]), dtype=torch.int64)}
    for key, value in batch.items():
        if key == "n_graphs":
            continue
        dtype = torch.int64 if key in INDEX_KEYS else torch.float32
        tensor = torch.as_tensor(np.asarray(value), dtype=dtype)
        if pinned:
            tensor = tensor.pin_memory()
        out[key] = tensor.to(device, non_blocking=pinned)
    return out
