"""DFT: GPAW calculations, labelling structures with them, and checking labels and shortlists."""
