"""The pure-torch models: one convolution against hand arithmetic, batching and layout
independence on real crystals, the autoencoder head, and checkpoint round trips."""
import hashlib
import time

import numpy as np
import pytest
import torch

from screener.dos import GAP_THRESHOLD
from screener.graphs import build_graph, collate
from screener.io import discover, load
from screener.model import (
    AEALIGNN,
    ALIGNN,
    ALIGNNConfig,
    CheckpointError,
    DOSAutoencoder,
    EdgeGatedGraphConv,
    build_model,
    checkpoint_info,
    load_checkpoint,
    save_checkpoint,
    to_tensors,
)
from screener.model import alignn as alignn_module

SMALL = {"hidden": 16, "embedding": 8, "edge_rbf": 12, "angle_rbf": 6, "alignn_layers": 2,
         "gcn_layers": 2}
IDS = ("JVASP-107", "JVASP-110", "JVASP-12064", "JVASP-137")  # SiC, BaTiO3, VO2, SiS2


@pytest.fixture(scope="module")
def graphs(shared_data):
    structures = {s.id: load(s) for s in discover(shared_data / "poscar") if s.id in IDS}
    return [build_graph(s.lattice, s.positions, s.numbers) for s in map(structures.get, IDS)]


@pytest.fixture(scope="module")
def batch(graphs):
    return to_tensors(collate(graphs))


def small_model(arch: str = "d-alignn", seed: int = 0, **extra):
    torch.manual_seed(seed)
    return build_model(arch, {**SMALL, **extra}).eval()


# -- EdgeGatedGraphConv against eqs (1)-(3) worked by hand --------------------------------

X = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [-1.0, 1.0, 0.5]])
OMEGA_SRC = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
OMEGA_DST = np.array([[0.0, 0.5, 0.0], [0.0, 0.0, 0.5], [0.5, 0.0, 0.0]])
LAMBDA_1 = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
LAMBDA_2 = np.array([[2.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
OMEGA_E = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.5]])
B_SRC, B_DST = np.array([0.1, 0.0, -0.1]), np.array([0.0, 0.2, 0.0])
B_1, B_2 = np.array([0.0, 0.0, 0.5]), np.array([-0.5, 0.0, 0.0])
# (src, dst) pairs: messages src -> dst. Irregular: node 0 gets two, node 1 one, node 2 none.
IRREGULAR = [(1, 0), (2, 0), (0, 1)]
REGULAR = [(1, 0), (2, 0), (0, 1), (2, 1), (0, 2), (1, 2)]  # two each, grouped by dst


def edge_features(n_edges: int) -> np.ndarray:
    return np.array([[0.2 * k, -0.1 * k, 1.0] for k in range(n_edges)])


def hand_conv(x: np.ndarray, e: np.ndarray, pairs: list) -> tuple[np.ndarray, np.ndarray]:
    """Eqs (1)-(3) written out edge by edge and node by node."""

    def layer_norm(v):
        return (v - v.mean()) / np.sqrt(v.var() + 1e-5)

    def silu(v):
        return v / (1.0 + np.exp(-v))

    pre = np.array([OMEGA_SRC @ x[i] + B_SRC + OMEGA_DST @ x[j] + B_DST + OMEGA_E @ e[k]
                    for k, (i, j) in enumerate(pairs)])
    sigma = 1.0 / (1.0 + np.exp(-pre))
    x_new = np.empty_like(x)
    for j in range(len(x)):
        incoming = [k for k, (_, dst) in enumerate(pairs) if dst == j]
        weighted = sum((sigma[k] * (LAMBDA_2 @ x[pairs[k][0]] + B_2) for k in incoming),
                       np.zeros(3))
        gate_sum = sum((sigma[k] for k in incoming), np.zeros(3)) + 1e-6
        h = LAMBDA_1 @ x[j] + B_1 + weighted / gate_sum
        x_new[j] = x[j] + silu(layer_norm(h))
    e_new = np.array([e[k] + silu(layer_norm(pre[k])) for k in range(len(pairs))])
    return x_new, e_new


def set_hand_weights(conv: EdgeGatedGraphConv) -> None:
    with torch.no_grad():
        conv.node_linear.weight.copy_(torch.from_numpy(
            np.vstack([OMEGA_SRC, OMEGA_DST, LAMBDA_1, LAMBDA_2])))
        conv.node_linear.bias.copy_(torch.from_numpy(np.concatenate([B_SRC, B_DST, B_1, B_2])))
        conv.edge_gate.weight.copy_(torch.from_numpy(OMEGA_E))


@pytest.mark.parametrize("pairs, in_degree", [(IRREGULAR, None), (REGULAR, None), (REGULAR, 2)])
@pytest.mark.parametrize("block_elements", [6, 1 << 21])
def test_edge_gated_conv_matches_hand_arithmetic(pairs, in_degree, block_elements, monkeypatch):
    """Also in blocks of two edges, as a large batch on the CPU runs."""
    monkeypatch.setattr(alignn_module, "BLOCK_ELEMENTS", block_elements)
    conv = EdgeGatedGraphConv(3).double()
    set_hand_weights(conv)
    e = edge_features(len(pairs))
    src, dst = torch.tensor(pairs).T
    with torch.no_grad():
        x_new, e_new = conv(torch.from_numpy(X), torch.from_numpy(e), src, dst, in_degree)
    want_x, want_e = hand_conv(X, e, pairs)
    np.testing.assert_allclose(x_new.numpy(), want_x, atol=1e-6, rtol=0)
    np.testing.assert_allclose(e_new.numpy(), want_e, atol=1e-6, rtol=0)


@pytest.mark.parametrize("in_degree", [None, 2])
def test_edge_gated_conv_gradients(in_degree, monkeypatch):
    """The in-place arithmetic must leave autograd exact: training depends on it."""
    monkeypatch.setattr(alignn_module, "BLOCK_ELEMENTS", 6)
    torch.manual_seed(0)
    conv = EdgeGatedGraphConv(3).double()
    src, dst = torch.tensor(REGULAR).T
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    e = torch.randn(len(REGULAR), 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, e: conv(x, e, src, dst, in_degree), (x, e),
                                    fast_mode=True)


# -- ALIGNN on real crystals ----------------------------------------------------------------

def test_to_tensors_types(graphs):
    batch = to_tensors(collate(graphs))
    for key in ("numbers", "edge_src", "edge_dst", "line_src", "line_dst", "node_graph"):
        assert batch[key].dtype == torch.int64, key
    for key in ("edge_len", "angle_cos"):
        assert batch[key].dtype == torch.float32, key
    assert int(batch["n_graphs"]) == len(graphs) and batch["n_graphs"].device.type == "cpu"


def test_alignn_output_is_nonnegative_and_independent_of_batching(graphs, batch):
    model = small_model()
    with torch.inference_mode():
        together = model(batch)
        alone = torch.cat([model(to_tensors(collate([g]))) for g in graphs])
    assert together.shape == (len(graphs), 300)
    assert bool((together >= 0).all())
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert (together[0] - together[1]).abs().max() > 1e-4, "different crystals, same output"


def test_alignn_output_is_independent_of_edge_order(batch):
    """Shuffled edges take the general scatter path; collate's layout the reshape fast path."""
    rng = np.random.default_rng(0)
    edge_perm = torch.from_numpy(rng.permutation(len(batch["edge_src"])))
    line_perm = torch.from_numpy(rng.permutation(len(batch["line_src"])))
    new_edge_id = torch.argsort(edge_perm)
    shuffled = dict(batch)
    for key in ("edge_src", "edge_dst", "edge_len"):
        shuffled[key] = batch[key][edge_perm]
    for key in ("line_src", "line_dst"):
        shuffled[key] = new_edge_id[batch[key][line_perm]]
    shuffled["angle_cos"] = batch["angle_cos"][line_perm]
    model = small_model()
    with torch.inference_mode():
        torch.testing.assert_close(model(shuffled), model(batch), atol=1e-5, rtol=0)


def test_alignn_trains(batch):
    model = small_model().train()
    target = torch.full((int(batch["n_graphs"]), 300), 0.05)
    loss = torch.nn.functional.mse_loss(model(batch), target)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(g.isfinite().all()) for g in grads)
    assert model.fc.weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bool(model(batch).float().isfinite().all())


def test_default_size(batch):
    """Upstream ALIGNN's size: about 4.1 M parameters (4 ALIGNN + 4 GCN layers, hidden 256)."""
    model = ALIGNN(ALIGNNConfig()).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"default D-ALIGNN: {n_params:,} parameters")
    assert 4.0e6 < n_params < 4.2e6
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(batch)
    print(f"default D-ALIGNN: {int(batch['n_graphs'])} crystals in {time.perf_counter() - start:.2f} s")
    assert out.shape == (int(batch["n_graphs"]), 300) and bool(out.isfinite().all())


# -- AE-ALIGNN ------------------------------------------------------------------------------

def test_ae_alignn_spectrum_is_the_decoded_latent(batch):
    model = small_model("ae-alignn", latent=6)
    autoencoder = DOSAutoencoder(latent=6)
    model.decoder.load_state_dict(autoencoder.decoder.state_dict())
    with torch.inference_mode():
        latent, dos = model.latent(batch), model(batch)
        torch.testing.assert_close(dos, autoencoder.decoder(latent))
    assert latent.shape == (int(batch["n_graphs"]), 6)
    assert dos.shape == (int(batch["n_graphs"]), 300)
    assert bool((dos >= 0).all())


def test_autoencoder_round_trip_shapes():
    autoencoder = DOSAutoencoder(latent=12)
    dos = torch.rand(5, 300)
    assert autoencoder.encoder(dos).shape == (5, 12)
    assert autoencoder(dos).shape == (5, 300)


def test_log_standard_scores_give_back_the_spectrum_and_keep_gaps_empty():
    """Scores of log DOS and back: the same spectrum, zeros (a gap) under the gap threshold
    and a metal's few states at E_F kept."""
    dos = torch.rand(6, 300) * 0.05
    dos[:3, 95:110] = 0.0
    dos[3:, 99:101] = 2e-3
    autoencoder = DOSAutoencoder(latent=4)
    autoencoder.fit_scale(dos)
    back = autoencoder.decoder[-1](autoencoder.encoder[0](dos))
    torch.testing.assert_close(back, dos, atol=1e-6, rtol=1e-4)
    assert float(back[:3, 95:110].max()) < GAP_THRESHOLD
    assert float(back[3:, 99:101].min()) > GAP_THRESHOLD


def test_an_autoencoder_without_log_scales_does_not_load(tmp_path):
    """A linear-scale AE-ALIGNN would decode wrongly with today's decoder: it must not load."""
    model = small_model("ae-alignn", latent=4)
    save_checkpoint(tmp_path / "m.pt", model, {})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items()
                             if not k.endswith(".floor")}
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "old.pt")


# -- checkpoints ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch, extra", [("d-alignn", {}), ("ae-alignn", {"latent": 4})])
def test_checkpoint_round_trip(arch, extra, batch, tmp_path):
    model = small_model(arch, **extra)
    meta = {"split": {"train": np.arange(3)}, "val_mae": np.float32(0.01), "note": "test"}
    digest = save_checkpoint(tmp_path / "m.pt", model, meta)
    assert digest == hashlib.sha256((tmp_path / "m.pt").read_bytes()).hexdigest()
    assert save_checkpoint(tmp_path / "again.pt", model, meta) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.pt", "m.pt"]

    loaded, info = load_checkpoint(tmp_path / "m.pt", "cpu")
    assert type(loaded) is type(model) and not loaded.training
    with torch.inference_mode():
        assert torch.equal(loaded(batch), model(batch))
    assert info["arch"] == arch and info["config"] == model.config_dict()
    assert info["model_id"] == "m" and info["hash"] == digest
    assert info["split"] == {"train": [0, 1, 2]} and info["note"] == "test"
    np.testing.assert_allclose(info["energy_grid"], -5 + 0.05 * np.arange(300))
    assert "valence electron" in info["normalization"]
    assert checkpoint_info(tmp_path / "m.pt") | {"energy_grid": None} == info | {"energy_grid": None}
    torch.load(tmp_path / "m.pt", weights_only=True)


def test_checkpoint_keeps_model_id_and_grid(tmp_path):
    grid = np.linspace(-10, 10, 300)
    save_checkpoint(tmp_path / "m.pt", small_model(), {"model_id": "dos-v1", "energy_grid": grid})
    info = checkpoint_info(tmp_path / "m.pt")
    assert info["model_id"] == "dos-v1"
    np.testing.assert_array_equal(info["energy_grid"], grid)


def test_foreign_files_are_refused_by_name(tmp_path):
    garbage, foreign = tmp_path / "garbage.pt", tmp_path / "foreign.pt"
    garbage.write_bytes(b"not a torch file")
    torch.save({"weights": torch.zeros(2)}, foreign)
    for path in (garbage, foreign):
        with pytest.raises(CheckpointError, match=path.name):
            load_checkpoint(path)
    with pytest.raises(TypeError, match="meta\\['when'\\]"):
        save_checkpoint(tmp_path / "m.pt", small_model(), {"when": object()})


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("cgcnn", {})
    with pytest.raises(ValueError, match="latent"):
        build_model("d-alignn", {"latent": 12})
    assert isinstance(build_model("ae-alignn", {"hidden": 8, "latent": 3}), AEALIGNN)
