"""The plugins compquant ships, handed to the plugin manager when the package is imported. They
register through exactly the hooks a third-party package uses; only their list lives here."""
from __future__ import annotations

BUILTIN_PLUGINS: tuple[str, ...] = (
    "compquant.plugins.rtn",
    "compquant.plugins.gptq",
    "compquant.plugins.gptaq",
    "compquant.plugins.rescomp",
    "compquant.plugins.hadamard",
    "compquant.plugins.quarot",
    "compquant.plugins.spinquant",
    "compquant.plugins.lwc",
    "compquant.plugins.sde",
    "compquant.plugins.exporters.compressed_tensors",
    "compquant.plugins.exporters.gptq",
    "compquant.plugins.exporters.fake",
    "compquant.plugins.wikitext",
    "compquant.models.llama",
    "compquant.models.gemma",
    "compquant.models.moe",
    "compquant.models.deit",
)
