"""`screen generate` on real JARVIS prototypes: Hautier substitution, CHGNet relaxation, the
rejection rules, exclusion of known compositions, resume, and records that `screen run` and
`screen label` read."""
import dataclasses
import gzip
import json
import socket

import numpy as np
import pytest
from click.testing import CliRunner

from screener.cli import main
from screener.dft.label import read_inputs
from screener.graphs import build_graph
from screener.io import Structure, discover, load, read_records, record_sources
from screener.pool import generate as gen
from screener.pool.relax import (
    CONTACT,
    FAILED,
    NOT_CONVERGED,
    VOLUME,
    Limits,
    Relaxed,
    closest_contact,
    judge,
    relax,
)
from screener.pool.substitution import (
    candidate_id,
    charge,
    enumerate_candidates,
    parent_of,
    reduced_formula,
    substitute,
    substitutions,
)

# real gapped JARVIS cells of two atoms (ZnS zincblende, the rest rocksalt), plus a metal
TINY = {"JVASP-1130": "LiF", "JVASP-116": "MgO", "JVASP-1300": "MgS", "JVASP-1702": "ZnS",
        "JVASP-1405": "CaO"}
METAL = "JVASP-100010"


@pytest.fixture(scope="module")
def jarvis(shared_data):
    return shared_data / "jarvis_structures.json.gz"


@pytest.fixture(scope="module")
def parents(jarvis) -> dict:
    records = read_records(jarvis)
    found = {r["jid"]: parent_of(load(s), r["optb88vdw_bandgap"])
             for s, r in zip(record_sources(jarvis, records), records) if r["jid"] in TINY}
    assert {jid: p.formula for jid, p in found.items()} == TINY
    return found


@pytest.fixture(scope="module")
def offline_chgnet():
    """CHGNet loaded with every network connection refused: its weights ship in the wheel."""
    from screener.pool import relax as relax_module

    def refuse(*_args, **_kwargs):
        raise OSError("network access during a test")

    relax_module._optimizer.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        optimizer = relax_module._optimizer()
    return optimizer


def _candidate(parent, **substitution):
    """`parent` with the species map given as element -> element, oxidation states kept."""
    from pymatgen.core import Species

    mapping = {}
    for element, oxi in parent.oxidation.items():
        new = substitution.get(element, element)
        mapping[str(Species(element, oxi))] = str(Species(new, oxi))
    return substitute(parent, mapping, 0.05)


def test_substitution_probability_is_pymatgens_conditional(parents):
    """P(map) = prod P(new | old), pymatgen's cond_prob with the parent's species fixed."""
    from pymatgen.analysis.structure_prediction.substitution_probability import (
        SubstitutionProbability,
    )

    table = SubstitutionProbability()
    found = list(substitutions(parents["JVASP-116"], 1e-3))
    assert len(found) > 20
    for mapping, probability, _ in found:
        expected = np.prod([table.cond_prob(new, old) for old, new in mapping.items()])
        assert probability == pytest.approx(expected, rel=1e-12)
        assert probability >= 1e-3
        assert mapping != {"Mg2+": "Mg2+", "O2-": "O2-"}
        assert len({new.rstrip("+-0123456789") for new in mapping.values()}) == 2


def test_charge_balance(parents):
    """Maps are flagged by charge, and only the balanced ones become candidates."""
    mgo = parents["JVASP-116"]
    flags = {(m["Mg2+"], m["O2-"]): balanced for m, _, balanced in substitutions(mgo, 1e-3)}
    assert flags[("Ca2+", "O2-")] and flags[("Mg2+", "S2-")]
    assert not flags[("Na+", "O2-")]
    result = enumerate_candidates([mgo], 1e-3)
    assert result.n_unbalanced == sum(not b for b in flags.values()) > 0
    assert len(result.candidates) + result.n_duplicates == sum(flags.values())
    assert all(charge(c) == 0 for c in result.candidates)


def test_known_compositions_are_never_made(parents, jarvis, shared_data):
    """CaO (from MgO) is in the JARVIS set and ZnSe (from ZnS) is one of the POSCARs."""
    tiny = [parents["JVASP-116"], parents["JVASP-1702"]]
    everything = enumerate_candidates(tiny, 1e-3)
    free = {c.formula for c in everything.candidates}
    assert {"CaO", "ZnSe"} <= free
    poscars = gen.known_formulas([shared_data / "poscar"])
    assert len(poscars) > 150 and "ZnSe" in poscars and "CaO" not in poscars
    known = gen.known_formulas([jarvis, shared_data / "poscar"])
    result = enumerate_candidates(tiny, 1e-3, known)
    made = {c.formula for c in result.candidates}
    assert not made & known
    assert result.n_known >= len(free & known) >= 2
    assert (result.n_known + len(result.candidates) + result.n_duplicates
            == len(everything.candidates) + everything.n_duplicates)


def test_one_candidate_per_composition_and_prototype(parents):
    """MgSe from rocksalt MgO and from rocksalt MgS is one crystal; CdS from rocksalt MgS and
    from zincblende ZnS are two."""
    result = enumerate_candidates([parents[j] for j in ("JVASP-116", "JVASP-1300",
                                                         "JVASP-1702")], 1e-3)
    cds = [c for c in result.candidates if c.formula == "CdS"]
    assert sorted(c.parent for c in cds) == ["JVASP-1300", "JVASP-1702"]
    cdo = [c for c in result.candidates if c.formula == "CdO"]
    assert len(cdo) == 2 and result.n_duplicates >= 1
    both = enumerate_candidates([parents["JVASP-116"], parents["JVASP-1300"]], 1e-3)
    rocksalt = [c for c in both.candidates if c.formula == "MgSe"]
    assert len(rocksalt) == 1 and both.n_duplicates > 0


def test_relaxation_keeps_a_physical_candidate(parents, offline_chgnet):
    candidate = _candidate(parents["JVASP-1130"], Li="Na")
    assert candidate.jid == candidate_id("JVASP-1130", {"F-": "F-", "Li+": "Na+"})
    result = relax(candidate)
    assert result.reason is None, result.detail
    assert 0 < result.steps < Limits().max_steps
    assert result.energy_after <= result.energy_before + 1e-6
    assert abs(result.volume_change) < 0.3
    assert sorted(result.elements) == ["F", "Na"]


def test_unconverged_relaxation_is_rejected(parents, offline_chgnet):
    result = relax(_candidate(parents["JVASP-116"], Mg="Ba"), Limits(max_steps=1))
    assert result.reason == NOT_CONVERGED and result.steps == 1


def test_large_volume_change_is_rejected(parents, offline_chgnet):
    """MgO -> BaO relaxed from MgO's own cell, not the scaled one, grows by far over 30%."""
    candidate = _candidate(parents["JVASP-116"], Mg="Ba")
    unscaled = dataclasses.replace(candidate, lattice=parents["JVASP-116"].lattice)
    result = relax(unscaled)
    assert result.reason == VOLUME and result.volume_change > 0.3, result.detail


def test_failed_relaxation_is_rejected(parents, offline_chgnet):
    """A cell blown up fourfold leaves every atom without a neighbour: CHGNet refuses it."""
    candidate = _candidate(parents["JVASP-116"], Mg="Ca")
    blown = dataclasses.replace(candidate, lattice=candidate.lattice * 4)
    result = relax(blown)
    assert result.reason == FAILED and "isolated" in result.detail.lower(), result.detail


def test_close_contacts(parents):
    """Real MgO passes; squeezed to 60% of its lattice, Mg-O is under 0.7 x (r_Mg + r_O)."""
    mgo = parents["JVASP-116"]
    assert closest_contact(mgo.lattice, mgo.frac, mgo.elements, Limits()) is None
    squeezed = closest_contact(mgo.lattice * 0.6, mgo.frac, mgo.elements, Limits())
    assert squeezed is not None and sorted(squeezed[:4].split("-")) == ["Mg", "O"], squeezed
    squeezed_cell = Relaxed("x", mgo.lattice * 0.6, mgo.frac, mgo.elements, -5.0, -5.0, 0.0,
                            3, 0.1, None)
    assert judge(squeezed_cell, Limits())[0] == CONTACT


def _parents_file(tmp_path, jarvis, extra=(METAL,)):
    records = [r for r in read_records(jarvis) if r["jid"] in {*TINY, *extra}]
    path = tmp_path / "parents.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(records, f)
    return path


def test_generate_writes_readable_records_and_resumes(tmp_path, jarvis, shared_data,
                                                      offline_chgnet):
    parents_file = _parents_file(tmp_path, jarvis)
    out = tmp_path / "pool.json.gz"
    args = ["generate", "--parents", str(parents_file), "--exclude", str(jarvis),
            "--exclude", str(shared_data / "poscar"), "--threshold", "0.02", "--limit", "3",
            "-o", str(out), "--quiet"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "parents: 5 gapped" in first.output and "relaxed 3" in first.output
    kept = read_records(out)
    rejected = gen.read_output(out)[1]
    assert len(kept) + len(rejected) == 3 and kept
    known = gen.known_formulas([jarvis, shared_data / "poscar"])
    for record in kept:
        provenance = record["generated"]
        assert record["jid"] == candidate_id(provenance["parent"], provenance["substitution"])
        assert provenance["parent"] in TINY
        assert provenance["formula"] == reduced_formula(record["atoms"]["elements"])
        assert provenance["formula"] not in known
        assert provenance["chgnet"] and provenance["chgnet_model"] == "0.3.0"
        assert provenance["relaxation_steps"] >= 0 and provenance["probability"] >= 0.02
    structures = [load(s) for s in discover(out)]
    assert all(isinstance(s, Structure) for s in structures)
    assert {s.id for s in structures} == {r["jid"] for r in kept}
    to_label = read_inputs(out)
    assert [item.id for item, _ in to_label] == [s.id for s in structures]
    assert all(isinstance(item, Structure) and np.isnan(gap) for item, gap in to_label)
    graph = build_graph(structures[0].lattice, structures[0].positions, structures[0].numbers)
    assert graph["neighbors"].shape == (structures[0].n_atoms * 16,)

    before = out.read_bytes()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "3 already done; relaxed 0" in again.output
    assert out.read_bytes() == before


def test_an_interrupted_run_keeps_its_work(tmp_path, jarvis, offline_chgnet, monkeypatch):
    """A run stopped after its first relaxation has written it; the rerun does the rest."""
    parents_file = _parents_file(tmp_path, jarvis, extra=())
    out = tmp_path / "pool.json.gz"
    calls = []

    def stop_second(candidate, limits):
        calls.append(candidate.jid)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return relax(candidate, limits)

    monkeypatch.setattr(gen, "relax", stop_second)
    with pytest.raises(KeyboardInterrupt):
        gen.generate(parents_file, out, threshold=0.02, limit=2, progress=False)
    kept, rejected = gen.read_output(out)
    assert set(kept) | set(rejected) == {calls[0]}
    monkeypatch.setattr(gen, "relax", relax)
    summary = gen.generate(parents_file, out, threshold=0.02, limit=2, progress=False)
    assert (summary.n_already, summary.n_relaxed) == (1, 1)
    assert gen.generate(parents_file, out, threshold=0.02, limit=2, progress=False).n_relaxed == 0


@pytest.mark.slow
def test_relaxations_on_ray_workers(tmp_path, jarvis, ray_local):
    """Two one-CPU Ray tasks give the records the in-process path gives."""
    parents_file = _parents_file(tmp_path, jarvis, extra=())
    on_ray = gen.generate(parents_file, tmp_path / "ray.json.gz", threshold=0.02, limit=2,
                          workers=2, progress=False)
    here = gen.generate(parents_file, tmp_path / "here.json.gz", threshold=0.02, limit=2,
                        progress=False)
    assert on_ray.n_relaxed == here.n_relaxed == 2 and on_ray.n_lost == 0
    ray_kept, ray_rejected = gen.read_output(tmp_path / "ray.json.gz")
    here_kept, here_rejected = gen.read_output(tmp_path / "here.json.gz")
    assert (ray_kept.keys(), ray_rejected.keys()) == (here_kept.keys(), here_rejected.keys())
    for jid, record in ray_kept.items():
        assert np.allclose(record["atoms"]["lattice_mat"], here_kept[jid]["atoms"]["lattice_mat"],
                           atol=1e-6)


def test_cli_defaults_are_the_library_defaults():
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(gen.generate).parameters.items()
                if isinstance(p.default, (int, float))}
    given = {p.name: p.default for p in main.commands["generate"].params if p.name in defaults}
    assert given.keys() == {"max_atoms", "threshold", "seed", "workers"}
    assert given == {name: defaults[name] for name in given}
