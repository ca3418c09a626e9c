"""A screening run's results directory: HDF5 shards (shards.py, on the shared HDF5 layer of
hdf5.py), the manifest that lists the complete ones (manifest.py), queries over them
(query.py), and the tables people read (tables.py)."""
