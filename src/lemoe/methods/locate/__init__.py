"""The locate-then-edit core shared by MEMIT, AlphaEdit and CoachHooK (and reusable elsewhere).

Typical use (sequential MEMIT in a few lines)::

    from lemoe.methods.locate import (LocateConfig, block_outputs, compute_ks, compute_z,
                                      layer_stats, memit_delta, spread_residual, add_to_weight)
    mom2, _ = layer_stats(model, access, tok, layers)             # C0 per layer, disk-cached
    zs, _ = compute_z(model, access, tok, requests, layers[-1], cfg)
    for i, layer in enumerate(layers):
        ks = compute_ks(access, tok, layer, requests, templates)
        resid = spread_residual(zs, block_outputs(access, tok, layers[-1], requests), len(layers) - i)
        add_to_weight(access.mlp(layer).out_proj, memit_delta(resid, ks, lam * mom2[layer]))  # lam: λ

:class:`LocateEditMethod` wraps the lazy statistics and templates for methods built on this core.
"""

from lemoe.methods.locate.compute import block_outputs, compute_ks, compute_z, template_keys
from lemoe.methods.locate.config import LocateConfig
from lemoe.methods.locate.method import LocateEditMethod
from lemoe.methods.locate.positions import context_templates, sites, subject_end
from lemoe.methods.locate.stats import StatsError, layer_stats, load_corpus, stats_dir
from lemoe.methods.locate.update import add_to_weight, default_layers, memit_delta, spread_residual

__all__ = [
    "LocateConfig",
    "LocateEditMethod",
    "StatsError",
    "add_to_weight",
    "block_outputs",
    "compute_ks",
    "compute_z",
    "context_templates",
    "default_layers",
    "layer_stats",
    "load_corpus",
    "memit_delta",
    "sites",
    "spread_residual",
    "stats_dir",
    "subject_end",
    "template_keys",
]
