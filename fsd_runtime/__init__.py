"""fsd_runtime: the thin runtime of FSD-Inference (model, partition, worker loop, channels, launch)."""
