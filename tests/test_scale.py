"""One DOS scale: the committed GPAW labels are per JARVIS valence electron, like edos_up."""
import json
from itertools import pairwise

import h5py
import numpy as np
from conftest import GPAW_LABELS, REPO

from screener.dos import E_STEP, ENERGY_GRID, valence_electrons

EDOS_LABELS = REPO / "data" / "edos_labels.h5"
BELOW_EF = ENERGY_GRID < 0
# Of the 10 JARVIS eDOS structures, those without magnetic ions: JARVIS is spin-polarized and
# publishes the up channel only, so a magnetic compound's edos_up is not half its states.
NON_MAGNETIC = ("JVASP-1372", "JVASP-1996", "JVASP-15345", "JVASP-89025")


def _labels(path):
    with h5py.File(path, "r") as f:
        offsets = f["structures/atom_offsets"][()]
        numbers = f["structures/numbers"][()]
        counts = np.array([valence_electrons(numbers[a:b])
                           for a, b in pairwise(offsets)])
        return (f["ids"].asstr()[()], f["dos"][()].astype(np.float64), counts,
                f["extra/n_electrons"][()], json.loads(f.attrs["provenance"]))


def electrons_below_ef(dos: np.ndarray, n_valence: np.ndarray) -> np.ndarray:
    """Electrons per cell between -5 eV and E_F of spectra per spin per valence electron."""
    return dos[..., BELOW_EF].sum(-1) * E_STEP * 2 * n_valence


def test_no_label_holds_more_electrons_than_its_calculation():
    """On GPAW's own count, 61 labels held more electrons above -5 eV than GPAW had in all."""
    _, dos, jarvis_count, gpaw_count, provenance = _labels(GPAW_LABELS)
    assert "JARVIS valence electron count" in provenance["dos"]
    assert provenance["settings"]["valence"] == "jarvis"
    assert np.any(jarvis_count != gpaw_count)
    assert np.all(electrons_below_ef(dos, jarvis_count) <= gpaw_count + 0.5)


def test_gpaw_labels_and_jarvis_edos_count_the_same_electrons(shared_data):
    ids, dos, counts, _, _ = _labels(EDOS_LABELS)
    records = {r["jid"]: r for r in json.loads(
        (shared_data / "jarvis_edos_sample10.json").read_text())}
    for jid in NON_MAGNETIC:
        i = list(ids).index(jid)
        gpaw = electrons_below_ef(dos[i], counts[i])
        jarvis = electrons_below_ef(np.array(records[jid]["edos_up"]), counts[i])
        assert abs(gpaw - jarvis) <= 0.05 * jarvis, (jid, gpaw, jarvis)
