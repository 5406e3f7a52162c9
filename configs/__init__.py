"""Training presets, shipped inside the package as ``diti_fast.presets`` (this folder is mapped there in
pyproject.toml, as kernels/ is to diti_fast.kernels): ``--config NAME`` finds ``NAME.yaml`` here,
in a source checkout and in an installed wheel alike."""
