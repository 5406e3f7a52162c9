"""The claim run (``make claim``): does DiTi put fine factors in early chunks and coarse ones in late
chunks, where the PDAE baseline shows no such order? Synthetic shards with known factors -> a DDPM
trained until its samples are recognisable -> DiTi (base) and PDAE on the same frozen DDPM for the
same images -> per-chunk attribution with bootstrap intervals and several probe seeds ->
counterfactual grids -> JSON, plots and a reading under benchmarks/results/claim/.

Modules: ``plan`` (phase sizes, calibrated), ``pipeline`` (the resumable phases), ``judge`` (are DDPM
samples recognisable?), ``attribution`` (probes, bootstrap, onsets), ``reading`` (plots, markdown),
``__main__`` (the command).
"""
