"""Generated malformed and absurd inputs: each becomes one valid structure with a sound graph, or
one failure whose reason says what is wrong, never an exception; in process and in a real run."""
import json
import re
import string
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import complete_ids
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from screener.io import MAX_ATOMS, Failure, discover
from screener.io.structure import MIN_DISTANCE
from screener.pipeline import RunOptions, graphs_or_failures, run
from screener.results.query import read_failures, read_predictions

CASES: Counter = Counter()
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# A reason that is only an internal exception name means the catch-all in load() fired: the
# input was not understood, so the user is not told what is wrong with it.
INTERNAL = re.compile(r"(IndexError|KeyError|TypeError|AttributeError|ZeroDivisionError|"
                      r"UnboundLocalError|AssertionError|RecursionError|OverflowError|"
                      r"StopIteration|NameError|LinAlgError)\b")


@pytest.fixture(scope="module", autouse=True)
def report_cases(request):
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None and CASES:
        detail = ", ".join(f"{kind} {n}" for kind, n in sorted(CASES.items()))
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nfuzz: {sum(CASES.values())} generated inputs ({detail})")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check(path: Path, kind: str) -> list:
    """Every input of a generated file ends as exactly one sound outcome."""
    outcomes = []
    sources = list(discover(path))
    for source, result in zip(sources, graphs_or_failures(sources), strict=True):
        CASES[kind] += 1
        if isinstance(result, Failure):
            assert (result.id, result.source) == (source.id, source.origin)
            assert result.stage in ("read", "validate", "graph"), result
            assert result.reason.strip() and not INTERNAL.match(result.reason), result
        else:
            structure, graph = result
            n = structure.n_atoms
            assert structure.id == source.id and 0 < n <= MAX_ATOMS
            assert np.isfinite(structure.lattice).all() and np.isfinite(structure.positions).all()
            assert len(graph["neighbors"]) == 16 * n and graph["neighbors"].max() < n
            lengths = np.linalg.norm(graph["edge_vec"], axis=1)
            assert np.isfinite(lengths).all() and lengths.min() >= MIN_DISTANCE * (1 - 1e-6)
            assert np.isfinite(graph["angle_cos"]).all()
        outcomes.append(result)
    return outcomes


ODD_NUMBERS = st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-300,
                               1e300, -1.0, 1e6])
ELEMENTS = ["Si", "O", "Al", "Fe", "Na", "Cl", "H", "Ga", "As", "Og"]
NOT_ELEMENTS = ["Xx", "si", "Q", "1", "Si_pv", "O/abc", ""]


@st.composite
def lattices(draw) -> np.ndarray:
    """Mostly ordinary cells; also skewed, flat, left-handed, tiny, huge or non-finite ones."""
    kind = draw(st.sampled_from(["cubic", "cubic", "skewed", "random", "odd", "flat"]))
    if kind == "cubic":
        return np.eye(3) * draw(st.floats(2.5, 15))
    matrix = np.array(draw(st.lists(st.floats(-30, 30), min_size=9, max_size=9))).reshape(3, 3)
    if kind == "skewed":
        return np.eye(3) * draw(st.floats(3, 15)) + matrix / 10
    if kind == "odd":
        matrix.flat[draw(st.integers(0, 8))] = draw(ODD_NUMBERS)
    if kind == "flat":
        matrix[2] = matrix[0] * draw(st.floats(-2, 2))
    return matrix


@st.composite
def crystals(draw, max_atoms: int = 12) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(lattice, symbols, fractional coordinates): atoms on a jittered grid, or anywhere, with
    unknown symbols, coincident or non-finite atoms at times."""
    lattice = draw(lattices())
    n = draw(st.integers(1, max_atoms))
    names = st.sampled_from(ELEMENTS + NOT_ELEMENTS if draw(st.integers(0, 3)) == 0 else ELEMENTS)
    symbols = draw(st.lists(names, min_size=n, max_size=n))
    jitter = np.array(draw(st.lists(st.floats(-0.5, 0.5), min_size=3 * n, max_size=3 * n)))
    if draw(st.booleans()):
        side = int(np.ceil(n ** (1 / 3)))
        grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
        coords = (grid[:n] + 0.3 * jitter.reshape(n, 3)) / side
    else:
        coords = 3 * jitter.reshape(n, 3)
    if n > 1 and draw(st.integers(0, 4)) == 0:
        coords[-1] = coords[0]
    if draw(st.integers(0, 9)) == 0:
        coords.flat[draw(st.integers(0, 3 * n - 1))] = draw(ODD_NUMBERS)
    return lattice, symbols, coords


def numbers(values) -> str:
    return " ".join(repr(float(v)) for v in np.ravel(values))


def poscar_text(lattice, symbols, coords, scale: str, cartesian: bool) -> str:
    species = list(dict.fromkeys(symbols))
    order = sorted(range(len(symbols)), key=lambda i: species.index(symbols[i]))
    counts = [symbols.count(s) for s in species]
    with np.errstate(all="ignore"):
        positions = coords @ lattice if cartesian else coords
    return "\n".join(["fuzz", scale, *(numbers(row) for row in lattice), " ".join(species),
                      " ".join(map(str, counts)), "Cartesian" if cartesian else "Direct",
                      *(numbers(positions[i]) for i in order)]) + "\n"


def cif_text(lattice, symbols, coords, occupancy: str) -> str:
    with np.errstate(all="ignore"):
        lengths = np.linalg.norm(lattice, axis=1)
        cosines = [lattice[1] @ lattice[2], lattice[0] @ lattice[2], lattice[0] @ lattice[1]]
        pairs = [lengths[1] * lengths[2], lengths[0] * lengths[2], lengths[0] * lengths[1]]
        angles = np.degrees(np.arccos(np.clip(np.divide(cosines, pairs), -1, 1)))
    cell = [f"_cell_length_{axis} {value!r}" for axis, value in zip("abc", lengths.tolist())]
    cell += [f"_cell_angle_{name} {value!r}"
             for name, value in zip(("alpha", "beta", "gamma"), angles.tolist())]
    sites = [f"{s or 'X'}{i} {s} {numbers(c)} {occupancy}" for i, (s, c) in
             enumerate(zip(symbols, coords))]
    return "\n".join(["data_fuzz", *cell, "loop_", "_atom_site_label", "_atom_site_type_symbol",
                      "_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z",
                      "_atom_site_occupancy", *sites]) + "\n"


def xyz_text(lattice, symbols, coords, count_offset: int) -> str:
    header = f'Lattice="{numbers(lattice)}" Properties=species:S:1:pos:R:3'
    with np.errstate(all="ignore"):
        rows = [f"{s} {numbers(p)}" for s, p in zip(symbols, coords @ lattice)]
    return "\n".join([str(len(symbols) + count_offset), header, *rows]) + "\n"


@st.composite
def mutated(draw, text: str) -> bytes:
    """The text with a few damaging edits: lines lost, repeated or swapped, a token replaced,
    the end cut off, or bytes that are not UTF-8 text."""
    lines = text.splitlines()
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        edit = draw(st.sampled_from(["drop", "repeat", "swap", "token", "junk"]))
        if edit == "drop":
            del lines[i]
        elif edit == "repeat":
            lines.insert(i, lines[i])
        elif edit == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif edit == "token":
            tokens = lines[i].split() or [""]
            k = draw(st.integers(0, len(tokens) - 1))
            tokens[k] = draw(st.one_of(st.text(string.printable.strip(), max_size=6),
                                       st.sampled_from(["nan", "1e999", "-", "''", "?", "0"])))
            lines[i] = " ".join(tokens)
        else:
            lines[i] = draw(st.text(max_size=30))
    data = "\n".join(lines).encode()
    if draw(st.integers(0, 4)) == 0:
        data = data[:draw(st.integers(len(data) // 4, len(data)))]
    return data + draw(st.sampled_from([b""] * 6 + [b"\0", b"\xff\xfe", b"\n\n"]))


@st.composite
def poscar_files(draw) -> bytes:
    lattice, symbols, coords = draw(crystals())
    scale = draw(st.sampled_from(["1.0"] * 5 + ["-40.0", "0", "-0", "abc", "nan"]))
    return draw(mutated(poscar_text(lattice, symbols, coords, scale, draw(st.booleans()))))


@st.composite
def cif_files(draw) -> bytes:
    lattice, symbols, coords = draw(crystals())
    occupancy = draw(st.sampled_from(["1.0", "1", "0.5", "1.0(2)", "?", "."]))
    return draw(mutated(cif_text(lattice, symbols, coords, occupancy)))


@st.composite
def xyz_files(draw) -> bytes:
    lattice, symbols, coords = draw(crystals())
    return draw(mutated(xyz_text(lattice, symbols, coords, draw(st.sampled_from([0, 0, 1, -1])))))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=12)


@st.composite
def json_files(draw) -> bytes:
    """Record lists with damaged fields, arbitrary JSON, or JSON that parsers choke on."""
    kind = draw(st.sampled_from(["records", "records", "any", "deep", "huge number"]))
    if kind == "deep":
        depth = draw(st.integers(1, 100_000))
        return ("[" * depth + "]" * depth).encode()
    if kind == "huge number":
        return b'[{"jid": "n", "atoms": {"lattice_mat": ' + b"9" * 5000 + b"}}]"
    if kind == "any":
        return json.dumps(draw(JSON_VALUES)).encode()
    records = []
    for i in range(draw(st.integers(1, 3))):
        lattice, symbols, coords = draw(crystals())
        atoms = {"lattice_mat": lattice.tolist(), "coords": coords.tolist(), "elements": symbols,
                 "cartesian": draw(st.booleans())}
        for key in draw(st.sets(st.sampled_from(sorted(atoms)), max_size=2)):
            if draw(st.booleans()):
                del atoms[key]
            else:
                atoms[key] = draw(JSON_VALUES)
        records.append({"jid": f"r{i}", "atoms": atoms})
    return json.dumps(records).encode()


FILES = {"POSCAR": ("POSCAR-{}", poscar_files()), "CIF": ("{}.cif", cif_files()),
         "XYZ": ("{}.xyz", xyz_files()), "JSON": ("{}.json", json_files())}


@pytest.mark.parametrize("kind", sorted(FILES))
def test_malformed_files_fail_precisely(kind, scratch):
    name, files = FILES[kind]

    @FUZZ
    @given(files)
    def one_file(data: bytes) -> None:
        path = scratch / name.format("fuzz")
        path.write_bytes(data)
        assert check(path, kind)

    one_file()


@st.composite
def absurd_records(draw) -> dict:
    """Structures a parser accepts but physics does not: a lone atom in a vast cell, hundreds of
    atoms, coincident atoms, non-finite coordinates, zero, flat or left-handed cells."""
    kind = draw(st.sampled_from(["lone", "many", "coincident", "nan", "zero", "flat", "left"]))
    lattice = np.eye(3) * draw(st.floats(4, 20))
    coords = np.array(draw(st.lists(st.floats(0, 1), min_size=3, max_size=12))[:3 * 4])
    coords = coords[:len(coords) // 3 * 3].reshape(-1, 3)
    symbols = ["Si"] * len(coords)
    if kind == "lone":
        lattice, symbols, coords = np.eye(3) * draw(st.floats(50, 1000)), ["O"], coords[:1]
    elif kind == "many":
        side = draw(st.integers(8, 9))
        grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
        n = draw(st.integers(400, min(600, len(grid))))
        lattice, coords = np.eye(3) * side * draw(st.floats(0.3, 3.0)), grid[:n] / side
        symbols = ["Na", "Cl"] * (n // 2) + ["Na"] * (n % 2)
    elif kind == "coincident":
        coords = np.vstack([coords, coords[:1]])
        symbols = [*symbols, "O"]
    elif kind == "nan":
        coords[0, draw(st.integers(0, 2))] = draw(st.sampled_from([float("nan"), float("inf")]))
    elif kind == "zero":
        lattice = np.zeros((3, 3))
    elif kind == "flat":
        lattice[2] = lattice[0] + lattice[1]
    else:
        lattice = -np.eye(3) * draw(st.floats(2, 20))
    return {"kind": kind, "atoms": {"lattice_mat": lattice.tolist(), "coords": coords.tolist(),
                                    "elements": symbols}}


EXPECTED = {"coincident": "apart", "nan": "non-finite", "zero": "volume", "flat": "volume"}


@settings(FUZZ, max_examples=200)
@given(absurd_records())
def test_absurd_structures_are_refused_or_graphed(scratch, record):
    path = scratch / "absurd.json"
    path.write_text(json.dumps([{"jid": record["kind"], "atoms": record["atoms"]}]))
    (outcome,) = check(path, "absurd")
    if record["kind"] in EXPECTED:
        assert isinstance(outcome, Failure) and EXPECTED[record["kind"]] in outcome.reason
    if record["kind"] == "lone":
        assert not isinstance(outcome, Failure), outcome


@st.composite
def input_folders(draw) -> list[tuple[str, bytes]]:
    kinds = draw(st.lists(st.sampled_from(sorted(FILES)), min_size=30, max_size=30))
    return [(FILES[kind][0].format(i), draw(FILES[kind][1])) for i, kind in enumerate(kinds)]


@pytest.mark.slow
@settings(FUZZ, max_examples=1, phases=[Phase.generate])
@given(input_folders())
def test_a_run_over_generated_files_accounts_for_each_once(ray_local, tiny_model, scratch, files):
    folder = Path(tempfile.mkdtemp(dir=scratch))
    out = folder.with_name(folder.name + "-results")
    for name, data in files:
        (folder / name).write_bytes(data)
    run(RunOptions(str(folder), out, tiny_model, shard_size=4, workers=1))
    inputs = Counter((s.id, s.origin) for s in discover(folder))
    CASES["run"] += sum(inputs.values())
    predicted = read_predictions(out, columns=["ids", "source"])
    found = Counter(zip(map(str, predicted["ids"]), map(str, predicted["source"])))
    found.update((f.id, f.source) for f in read_failures(out))
    assert found == inputs
    assert len(complete_ids(out)) == sum(inputs.values())
