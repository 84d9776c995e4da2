"""The built-in checkpoint formats, each a plugin (`compquant_register_exporters`)."""
