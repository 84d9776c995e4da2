"""The core of compquant: hook specifications, plugin registry, quantizer grid, shared column-update
machinery and the layer-by-layer calibration loop. Plugins build on these; nothing here names a
particular solver, transform or architecture."""
