"""screener.io on the real JARVIS data, on files written from it, and on broken inputs."""
import gzip
import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest

from screener.io import (
    MAX_ATOMS,
    Failure,
    Source,
    Structure,
    discover,
    elements,
    formats,
    load,
    read_records,
    records,
)
from screener.io import structure as structure_module

SIC = "POSCAR-JVASP-107"


def load_all(path: Path) -> list[Structure | Failure]:
    return [load(source) for source in discover(path)]


def poscar_text(lattice: np.ndarray, symbols: list[str], positions: np.ndarray,
                scale: float = 1.0) -> str:
    """Cartesian POSCAR at full float precision; symbols must come grouped by species."""
    species = list(dict.fromkeys(symbols))
    counts = [symbols.count(s) for s in species]
    rows = [" ".join(map(repr, map(float, row))) for row in lattice]
    atoms = [" ".join(map(repr, map(float, row))) for row in positions]
    return "\n".join(["test", repr(scale), *rows, " ".join(species), " ".join(map(str, counts)),
                      "Cartesian", *atoms]) + "\n"


def extxyz_text(structure: Structure, symbols: list[str]) -> str:
    lattice = " ".join(map(repr, structure.lattice.ravel().tolist()))
    rows = [f"{s} " + " ".join(map(repr, p)) for s, p in zip(symbols, structure.positions.tolist())]
    header = f'Lattice="{lattice}" Properties=species:S:1:pos:R:3 pbc="T T T"'
    return "\n".join([str(len(rows)), header, *rows]) + "\n"


def same_sites(a: Structure, b: Structure, tol: float) -> bool:
    """Same elements at the same places modulo lattice translations, in any atom order."""
    diff = (a.positions @ np.linalg.inv(a.lattice))[:, None] - (
        b.positions @ np.linalg.inv(b.lattice))[None]
    diff -= np.round(diff)
    distance = np.linalg.norm(diff @ a.lattice, axis=-1)
    distance[a.numbers[:, None] != b.numbers[None]] = np.inf
    return len(a.numbers) == len(b.numbers) and bool((distance.min(axis=1) < tol).all())


@pytest.fixture(scope="module")
def sic(shared_data: Path) -> Structure:
    structure = load(next(discover(shared_data / "poscar" / SIC)))
    assert isinstance(structure, Structure)
    return structure


@pytest.fixture(scope="module")
def jarvis_records(shared_data: Path) -> list[dict]:
    with gzip.open(shared_data / "jarvis_structures.json.gz") as f:
        return json.load(f)


SIC_SYMBOLS = ["Si"] * 4 + ["C"] * 4


def test_all_poscars_load_with_jarvis_ids(shared_data, jarvis_records):
    sources = list(discover(shared_data / "poscar"))
    structures = [load(source) for source in sources]
    assert len(structures) == 201
    assert all(isinstance(s, Structure) for s in structures)
    assert [s.origin for s in sources] == sorted(s.origin for s in sources)
    assert all(s.id.startswith("JVASP-") and s.id == Path(s.source).name[7:] for s in structures)
    records = {r["jid"]: r["atoms"] for r in jarvis_records}
    for structure in structures:
        record = load(Source(structure.id, "", records[structure.id]))
        np.testing.assert_allclose(structure.lattice, record.lattice, atol=1e-9)
        assert same_sites(structure, record, 1e-4)


@pytest.mark.parametrize("name, count", [("jarvis_structures.json.gz", 2312),
                                         ("perov5_structures.json.gz", 18928)])
def test_json_records_load(shared_data, name, count):
    sources = list(discover(shared_data / name))
    structures = [load(source) for source in sources]
    assert len(structures) == count
    assert all(isinstance(s, Structure) for s in structures)
    with gzip.open(shared_data / name) as f:
        records = json.load(f)
    assert [s.id for s in structures] == [r["jid"] for r in records]
    for i in (0, 1, count // 2, count - 1):
        atoms, structure = records[i]["atoms"], structures[i]
        assert structure.source == f"{shared_data / name}[{i}]"
        lattice, coords = np.array(atoms["lattice_mat"]), np.array(atoms["coords"])
        expected = coords if atoms["cartesian"] else coords @ lattice
        np.testing.assert_allclose(structure.positions, expected, atol=1e-12)
        assert structure.n_atoms == len(atoms["elements"])


def test_cartesian_records_keep_their_positions(jarvis_records):
    record = next(r for r in jarvis_records if r["atoms"]["cartesian"])
    structure = load(Source(record["jid"], "x", record["atoms"]))
    np.testing.assert_array_equal(structure.positions, record["atoms"]["coords"])


def test_formula_is_reduced_and_ordered_like_jarvis(jarvis_records, sic):
    from jarvis.core.atoms import Atoms
    from jarvis.core.specie import chem_data

    assert sic.formula == "SiC"
    checked = 0
    for record in jarvis_records[:300]:
        elements = set(record["atoms"]["elements"])
        if len({chem_data[e]["X"] for e in elements}) < len(elements):
            continue
        structure = load(Source(record["jid"], "x", record["atoms"]))
        assert structure.formula == Atoms.from_dict(record["atoms"]).composition.reduced_formula
        checked += 1
    assert checked > 250
    alumina = Structure("a", "a", np.eye(3) * 10, np.zeros((10, 3)),
                        np.array([8, 13, 8, 8, 13, 8, 8, 13, 8, 13]))
    assert alumina.formula == "Al2O3"


def test_cif_written_by_jarvis_round_trips(tmp_path, sic):
    from jarvis.core.atoms import Atoms

    atoms = Atoms(lattice_mat=sic.lattice, coords=sic.positions, elements=SIC_SYMBOLS,
                  cartesian=True)
    atoms.write_cif(str(tmp_path / "SiC.cif"), with_spg_info=False)
    (structure,) = load_all(tmp_path / "SiC.cif")
    assert structure.id == "SiC"
    np.testing.assert_allclose(structure.lattice @ structure.lattice.T,
                               sic.lattice @ sic.lattice.T, rtol=1e-5)
    assert same_sites(structure, sic, 1e-3)


def test_cif_symmetry_operations_are_applied(tmp_path):
    (tmp_path / "nacl.cif").write_text(
        "data_x\n_cell_length_a 5\n_cell_length_b 5\n_cell_length_c 5\n_cell_angle_alpha 90\n"
        "_cell_angle_beta 90\n_cell_angle_gamma 90\nloop_\n_space_group_symop_operation_xyz\n"
        "'x, y, z'\n'-x, -y, -z'\nloop_\n_atom_site_label\n_atom_site_fract_x\n"
        "_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\n"
        "Na1 0.1 0.2 0.3 1.0\nCl1 0.5 0.5 0.5 1.0\n")
    (structure,) = load_all(tmp_path / "nacl.cif")
    np.testing.assert_allclose(structure.positions, [[0.5, 1, 1.5], [2.5, 2.5, 2.5],
                                                     [4.5, 4, 3.5]], atol=1e-9)
    assert structure.formula == "Na2Cl"


def test_extxyz_round_trips_exactly(tmp_path, sic):
    (tmp_path / "SiC.extxyz").write_text(extxyz_text(sic, SIC_SYMBOLS))
    (structure,) = load_all(tmp_path / "SiC.extxyz")
    np.testing.assert_array_equal(structure.lattice, sic.lattice)
    np.testing.assert_array_equal(structure.positions, sic.positions)
    np.testing.assert_array_equal(structure.numbers, sic.numbers)


def test_extxyz_properties_locate_columns(tmp_path, sic):
    rows = [f"{i} {s} " + " ".join(map(repr, p)) + " 0.1 0.2 0.3"
            for i, (s, p) in enumerate(zip(SIC_SYMBOLS, sic.positions.tolist()))]
    lattice = " ".join(map(repr, sic.lattice.ravel().tolist()))
    header = f'energy=-1.5 Properties=id:I:1:species:S:1:pos:R:3:forces:R:3 Lattice="{lattice}"'
    (tmp_path / "a.xyz").write_text("\n".join(["8", header, *rows]) + "\n")
    (structure,) = load_all(tmp_path / "a.xyz")
    np.testing.assert_array_equal(structure.positions, sic.positions)


def test_jarvis_xyz_cell_line_is_read(tmp_path, sic):
    from jarvis.core.atoms import Atoms

    atoms = Atoms(lattice_mat=sic.lattice, coords=sic.positions, elements=SIC_SYMBOLS,
                  cartesian=True)
    atoms.write_xyz(str(tmp_path / "SiC.xyz"))
    (structure,) = load_all(tmp_path / "SiC.xyz")
    np.testing.assert_array_equal(structure.lattice, sic.lattice)
    np.testing.assert_allclose(structure.positions, sic.positions, atol=1e-5)


def test_poscar_scale_factor_applies_to_cartesian_and_volume_forms(tmp_path, sic):
    volume = float(abs(np.linalg.det(sic.lattice)))
    (tmp_path / "POSCAR-scaled").write_text(
        poscar_text(sic.lattice / 2, SIC_SYMBOLS, sic.positions / 2, scale=2.0))
    (tmp_path / "POSCAR-volume").write_text(
        poscar_text(sic.lattice * 3, SIC_SYMBOLS, sic.positions * 3, scale=-volume))
    scaled, by_volume = load_all(tmp_path)
    np.testing.assert_allclose(scaled.lattice, sic.lattice, atol=1e-12)
    np.testing.assert_allclose(scaled.positions, sic.positions, atol=1e-12)
    np.testing.assert_allclose(by_volume.lattice, sic.lattice, atol=1e-12)
    np.testing.assert_allclose(by_volume.positions, sic.positions, atol=1e-12)


def test_vasp6_potcar_symbols_are_reduced_to_elements(tmp_path, sic):
    text = poscar_text(sic.lattice, SIC_SYMBOLS, sic.positions).replace("Si C", "Si_pv C/a1b2c3")
    (tmp_path / "CONTCAR").write_text(text)
    (structure,) = load_all(tmp_path / "CONTCAR")
    np.testing.assert_array_equal(structure.numbers, sic.numbers)


def test_skewed_cell_finds_close_pair(tmp_path, sic):
    """The same crystal in a basis so skewed that, unreduced, it needs several images a side."""
    positions = sic.positions.copy()
    positions[1] = positions[0] + [0.0, 0.0, 0.3]
    skew = np.array([[1, 0, 0], [7, 1, 0], [-5, 9, 1]])
    (tmp_path / "POSCAR-skewed").write_text(poscar_text(skew @ sic.lattice, SIC_SYMBOLS, positions))
    (failure,) = load_all(tmp_path / "POSCAR-skewed")
    assert failure.reason.startswith("atoms 0 (Si) and 1 (Si) are 0.300 A apart")


def test_failures_on_records_and_limits():
    big = {"lattice_mat": (np.eye(3) * 200).tolist(), "coords": np.zeros((MAX_ATOMS + 1, 3)).tolist(),
           "elements": ["H"] * (MAX_ATOMS + 1), "cartesian": True}
    failure = load(Source("big", "big.json[0]", big))
    assert failure == Failure("big", "big.json[0]", "validate",
                              f"{MAX_ATOMS + 1} atoms, more than the limit of 5000 (MAX_ATOMS)")
    empty = {"lattice_mat": np.eye(3).tolist(), "coords": [], "elements": [], "cartesian": False}
    assert load(Source("e", "e", empty)).reason == "no atoms"


def edited(lines: list[str], **changes: str) -> str:
    """The SiC POSCAR with line N (1-based, keyword lN) replaced."""
    lines = list(lines)
    for key, value in changes.items():
        lines[int(key[1:]) - 1] = value
    return "\n".join(lines) + "\n"


def close_pair(lines: list[str]) -> str:
    z = float(lines[8].split()[2]) + 0.3 / 10.151391815821647
    return edited(lines, l10=f"0.6666669999999968 0.3333330000000032 {z!r}")


def across_boundary(lines: list[str]) -> str:
    return edited(lines, l9="0.6666669999999968 0.3333330000000032 0.995",
                  l10="0.6666669999999968 0.3333330000000032 0.005")


@pytest.fixture(scope="module")
def sic_lines(shared_data: Path) -> list[str]:
    return (shared_data / "poscar" / SIC).read_text().splitlines()


@pytest.fixture(scope="module")
def sic_cif(sic_lines: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The SiC structure as jarvis writes a CIF."""
    from jarvis.io.vasp.inputs import Poscar

    path = tmp_path_factory.mktemp("cif") / "SiC.cif"
    Poscar.from_string("\n".join(sic_lines)).atoms.write_cif(str(path), with_spg_info=False)
    return path.read_text()


def half_occupied(cif: str) -> str:
    site = "Si2  1  0.33333  0.66667  0.43785  "
    return cif.replace(site + "1", site + "0.5")


BROKEN = {
    "empty": ("POSCAR-empty", lambda lines, cif: "", "validate", "empty file"),
    "nul-bytes": ("POSCAR-bin", lambda lines, cif: b"\x89PNG\x00\x00junk", "read",
                  "binary data, not text: NUL byte at offset 4"),
    "latin-1": ("a.cif", lambda lines, cif: cif.replace("JARVIS", "M\xfcller").encode("latin-1"),
                "read", "not UTF-8 text: byte 0xfc at offset 24"),
    "bad-coordinate": ("POSCAR-x", lambda lines, cif: edited(lines, l10="0.0 abc 0.5"),
                       "validate", "line 10 should hold 3 coordinates, found '0.0 abc 0.5'"),
    "truncated": ("POSCAR-x", lambda lines, cif: "\n".join(lines[:11]), "validate",
                  "line 7 declares 8 atoms but the file ends after 3 positions"),
    "counts-mismatch": ("POSCAR-x", lambda lines, cif: edited(lines, l7="8"), "validate",
                        "line 6 names 2 elements but line 7 gives 1 counts"),
    "vasp4": ("POSCAR-x", lambda lines, cif: "\n".join(lines[:5] + lines[6:]), "validate",
              "line 6 holds atom counts but no element symbols (VASP 4 format"),
    "zero-scale": ("POSCAR-x", lambda lines, cif: edited(lines, l2="0.0"), "validate",
                   "line 2 should hold a non-zero scale factor, found '0.0'"),
    "coplanar-cell": ("POSCAR-x", lambda lines, cif: edited(lines, l5="3.099785534652722 0 0"),
                      "validate", "cell volume 0 A^3 is too small for 8 atoms"),
    "nan-lattice": ("POSCAR-x", lambda lines, cif: edited(lines, l3="nan 0 0"), "validate",
                    "lattice has non-finite values"),
    "inf-coordinate": ("POSCAR-x", lambda lines, cif: edited(lines, l12="inf 0 0"), "validate",
                       "atom 3 (Si) has a non-finite position"),
    "close-atoms": ("POSCAR-x", lambda lines, cif: close_pair(lines), "validate",
                    "atoms 0 (Si) and 1 (Si) are 0.300 A apart, closer than the 0.5 A minimum"),
    "close-across-boundary": ("POSCAR-x", lambda lines, cif: across_boundary(lines), "validate",
                              "atoms 0 (Si) and 1 (Si) are 0.102 A apart"),
    "tiny-cell": ("x.vasp", lambda lines, cif: "t\n1\n0.3 0 0\n0 3 0\n0 0 3\nSi\n1\nd\n0 0 0\n",
                  "validate", "atom 0 (Si) is 0.300 A from its own periodic image"),
    "hidden-short-vector": ("x.vasp", lambda lines, cif: "t\n1\n100 0 0\n-50 86.6 0\n"
                            "-50 -86.6 0.3\nSi\n1\nd\n0 0 0\n", "validate",
                            "atom 0 (Si) is 0.300 A from its own periodic image"),
    "unknown-element": ("POSCAR-x", lambda lines, cif: edited(lines, l6="Xx Qq"), "validate",
                        "unknown element symbol(s): 'Qq', 'Xx'"),
    "zero-atoms": ("POSCAR-x", lambda lines, cif: edited(lines[:8], l7="0 0"), "validate",
                   "unparsable POSCAR: line 7 declares no atoms"),
    "partial-occupancy": ("a.cif", lambda lines, cif: half_occupied(cif), "validate",
                          "partial occupancy on site(s) Si2 (0.5)"),
    "cif-two-blocks": ("a.cif", lambda lines, cif: cif + "\n" + cif, "validate",
                       "CIF holds 2 data blocks (lines 2, 38)"),
    "cif-no-cell": ("a.cif", lambda lines, cif: cif.replace("_cell_length_c", "_cell_c"),
                    "validate", "unparsable CIF: Lattice information is incomplete. [3.09978, 3.09978, '', 90.0"),
    "xyz-no-cell": ("a.xyz", lambda lines, cif: "1\nmolecule\nH 0 0 0\n", "validate",
                    'no cell: line 2 has no Lattice="..." (extended XYZ)'),
    "xyz-frames": ("a.extxyz", lambda lines, cif: 2 * '1\nLattice="3 0 0 0 3 0 0 0 3"\nH 0 0 0\n',
                   "validate", "more than one frame: line 4 continues after the 1 atoms"),
    "xyz-bad-row": ("a.xyz", lambda lines, cif: '2\nLattice="3 0 0 0 3 0 0 0 3"\nH 0 0 0\nH 1 x\n',
                    "validate", "line 4 should hold a symbol and 3 coordinates, found 'H 1 x'"),
    "unknown-type": ("notes.txt", lambda lines, cif: "hello", "read",
                     "unrecognised file type 'notes.txt'"),
    "invalid-json": ("a.json", lambda lines, cif: '[{"jid": ', "validate", "invalid JSON: "),
    "json-not-records": ("a.json", lambda lines, cif: "3", "validate",
                         "JSON holds a int, not a list of records"),
    "json-no-records": ("a.json", lambda lines, cif: "[]", "validate", "JSON holds no records"),
    "record-without-atoms": ("a.json", lambda lines, cif: '[{"jid": "J-1"}]', "validate",
                             "JARVIS atoms record lacks 'lattice_mat', 'coords', 'elements'"),
    "record-nan": ("a.json", lambda lines, cif: json.dumps([{"jid": "J-1", "atoms": {
        "lattice_mat": [[3, 0, 0], [0, 3, 0], [0, 0, 3]], "coords": [[0, 0, float("nan")]],
        "elements": ["H"], "cartesian": False}}]), "validate", "atom 0 (H) has a non-finite"),
    "bad-gzip": ("a.json.gz", lambda lines, cif: b"not gzip", "read", "not readable gzip data"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_input_gives_one_precise_failure(tmp_path, sic_lines, sic_cif, case):
    name, make, stage, reason = BROKEN[case]
    content = make(sic_lines, sic_cif)
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    results = load_all(path)
    assert len(results) == 1
    (failure,) = results
    assert isinstance(failure, Failure), failure
    assert failure.stage == stage
    assert reason in failure.reason


def test_a_cell_needing_too_many_periodic_images_is_refused_not_searched(tmp_path, monkeypatch):
    """A fuzzer's basis once drove the 0.5 A spacing check to 20 GB of periodic images: past
    MAX_IMAGE_POINTS the check gives up and the cell is refused. Lowered here so that a plain
    3 A cell (27 images) crosses it."""
    monkeypatch.setattr(structure_module, "MAX_IMAGE_POINTS", 10)
    path = tmp_path / "cubic.vasp"
    path.write_text("t\n1\n3 0 0\n0 3 0\n0 0 3\nSi\n1\nd\n0 0 0\n")
    (failure,) = load_all(path)
    assert isinstance(failure, Failure) and "too thin to check" in failure.reason, failure


def test_discover_mixed_folder_yields_every_file_once(tmp_path, shared_data):
    root = tmp_path / "inputs"
    (root / "mp-1").mkdir(parents=True)
    (root / "poscars").mkdir()
    (root / ".cache").mkdir()
    source = shared_data / "poscar" / SIC
    for path in (root / "mp-1" / "POSCAR", root / "poscars" / SIC, root / "poscars" / "CONTCAR_b",
                 root / ".cache" / "POSCAR-hidden", root / ".hidden.vasp", root / "c.vasp"):
        path.write_text(source.read_text())
    (root / "notes.txt").write_text("not a structure")
    with gzip.open(shared_data / "jarvis_structures.json.gz") as f:
        records = json.load(f)[:3]
    (root / "some.json").write_text(json.dumps(records))
    os.symlink(root, root / "poscars" / "loop")
    sources = list(discover(root))
    assert [s.id for s in sources] == ["c", "mp-1", "notes.txt", "poscars/b", "poscars/JVASP-107",
                                       *[r["jid"] for r in records]]
    origins = [s.origin for s in sources]
    assert len(set(origins)) == len(origins) == 8
    assert origins[-1] == f"{root / 'some.json'}[2]"
    assert sources == list(discover(root))
    results = [load(s) for s in sources]
    assert [type(r).__name__ for r in results].count("Structure") == 7
    assert results[2].reason.startswith("unrecognised file type 'notes.txt'")


def test_discover_single_files(shared_data, tmp_path):
    assert list(discover(shared_data / "poscar" / SIC)) == [
        Source("JVASP-107", str(shared_data / "poscar" / SIC), None)]
    (tmp_path / "POSCAR").write_text((shared_data / "poscar" / SIC).read_text())
    assert next(discover(tmp_path / "POSCAR")).id == tmp_path.name
    with pytest.raises(FileNotFoundError):
        next(discover(tmp_path / "missing"))


def test_read_records_raises_what_a_command_reports(shared_data, tmp_path):
    """The reader `label` uses to re-read a shortlisted record: the records `discover` read,
    an unreadable file as its OSError, bad content as a ValueError with the failure's reason."""
    path = shared_data / "jarvis_structures.json.gz"
    records = read_records(path)
    assert [r["jid"] for r in records] == [s.id for s in discover(path)]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(records[0]).encode())
    assert read_records(tmp_path / "bom.json") == records[:1]
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "moved.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="^JSON holds no records$"):
        read_records(tmp_path / "empty.json")


def inputs_that_hang_or_abort(root: Path, good: Path) -> dict[str, str]:
    """Beside one good POSCAR, every kind of path that once hung or aborted a run; returns the
    expected failure reason of each by id."""
    root.mkdir()
    (root / good.name).write_text(good.read_text())
    os.mkfifo(root / "POSCAR-fifo")
    os.mkfifo(root / "records.json")  # a JSON list is read in the driver itself
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "POSCAR-socket"))
    os.symlink("/dev/zero", root / "POSCAR-zero")
    os.symlink(root / "POSCAR-self", root / "POSCAR-self")
    os.symlink(root / "b.cif", root / "a.cif")
    os.symlink(root / "a.cif", root / "b.cif")
    with open(root / "POSCAR-huge", "wb") as fh:  # sparse: no disk is used
        fh.truncate(formats.MAX_FILE_BYTES + 1)
    loop = "cannot read file: [Errno 40] Too many levels of symbolic links"
    return {"fifo": "a FIFO (named pipe), not a regular file",
            "records": "a FIFO (named pipe), not a regular file",
            "socket": "a socket, not a regular file", "zero": "a character device, not a regular file",
            "self": f"{loop}: '{root / 'POSCAR-self'}'", "a": f"{loop}: '{root / 'a.cif'}'",
            "b": f"{loop}: '{root / 'b.cif'}'",
            "huge": "larger than the 64 MiB limit for this kind of input"}


@pytest.fixture
def no_hang():
    """Fails the test instead of hanging it, should a read block."""
    def hung(*_):
        raise TimeoutError("a read blocked")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_inputs_that_are_no_regular_files_fail_alone_without_blocking(tmp_path, shared_data,
                                                                        no_hang):
    expected = inputs_that_hang_or_abort(tmp_path / "in", shared_data / "poscar" / SIC)
    loaded = {s.id: load(s) for s in discover(tmp_path / "in")}
    assert isinstance(loaded.pop("JVASP-107"), Structure)
    assert {i: (f.stage, f.reason) for i, f in loaded.items()} == {
        i: ("read", reason) for i, reason in expected.items()}


def test_reads_stop_at_their_limits(tmp_path, monkeypatch):
    """A gzip bomb is refused after MAX_RECORDS_BYTES of output, never inflated in full."""
    monkeypatch.setattr(records, "MAX_RECORDS_BYTES", 1 << 20)
    bomb = tmp_path / "bomb.json.gz"
    bomb.write_bytes(gzip.compress(b"[" + b" " * (4 << 20) + b"]"))
    (failure,) = load_all(bomb)
    assert failure.reason == ("more than 1 MiB of JSON once decompressed (MAX_RECORDS_BYTES): "
                              "split the file")
    with pytest.raises(ValueError, match="more than 1 MiB"):
        read_records(bomb)


def test_element_symbols_in_any_case_and_unknown_ones_refused():
    assert [elements.element_symbol(s) for s in ("o", "FE", " cl ", "Si")] == ["O", "Fe", "Cl", "Si"]
    for bad in ("Xx", "", "O2"):
        with pytest.raises(ValueError, match="is not an element symbol"):
            elements.element_symbol(bad)
