"""One DOS scale: the committed GPAW labels are per JARVIS valence electron, like edos_up."""
import json

import numpy as np
from conftest import GPAW_LABELS

from screener.dos import E_STEP, ENERGY_GRID, valence_electrons
from screener.training.dataset import read_structures, read_training_set

BELOW_EF = ENERGY_GRID < 0
# Of the 10 JARVIS eDOS structures, those without magnetic ions: JARVIS is spin-polarized and
# publishes the up channel only, so a magnetic compound's edos_up is not half its states.
NON_MAGNETIC = ("JVASP-1372", "JVASP-1996", "JVASP-15345", "JVASP-89025")


def _labels(path):
    data = read_training_set(path, graphs=False)
    counts = np.array([valence_electrons(s.numbers) for s in read_structures(path)])
    return data, data.dos.astype(np.float64), counts, data.extra["n_electrons"], data.attrs


def electrons_below_ef(dos: np.ndarray, n_valence: np.ndarray) -> np.ndarray:
    """Electrons per cell between -5 eV and E_F of spectra per spin per valence electron."""
    return dos[..., BELOW_EF].sum(-1) * E_STEP * 2 * n_valence


def test_no_label_holds_more_electrons_than_its_calculation():
    """On GPAW's own count, 61 labels held more electrons above -5 eV than GPAW had in all.
    The up channel holds (n + moment) / 2 of GPAW's n electrons."""
    data, dos, jarvis_count, gpaw_count, provenance = _labels(GPAW_LABELS)
    assert "JARVIS valence electron count" in provenance["dos"]
    assert provenance["settings"]["valence"] == "jarvis"
    assert np.any(jarvis_count != gpaw_count)
    up = electrons_below_ef(dos, jarvis_count) / 2
    assert np.all(up <= (gpaw_count + np.abs(data.extra["magmom"])) / 2 + 0.25)


def test_gpaw_labels_and_jarvis_edos_count_the_same_electrons(shared_data):
    data, dos, counts, _, _ = _labels(GPAW_LABELS)
    ids = data.ids
    records = {r["jid"]: r for r in json.loads(
        (shared_data / "jarvis_edos_sample10.json").read_text())}
    for jid in NON_MAGNETIC:
        i = list(ids).index(jid)
        gpaw = electrons_below_ef(dos[i], counts[i])
        jarvis = electrons_below_ef(np.array(records[jid]["edos_up"]), counts[i])
        assert abs(gpaw - jarvis) <= 0.05 * jarvis, (jid, gpaw, jarvis)
