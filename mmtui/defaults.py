"""Defaults shared by the core and the commands; importing this module is free (no torch)."""

DEFAULT_PRESET = "smol"
DEFAULT_PROMPT = "A picture of"
DEFAULT_MAX_NEW_TOKENS = 20
DEFAULT_KEEP = 6400  # top (layer, unit, patch) triples stored per image: the ablation grid's largest k
NEURON_IMAGES = 20  # the cache keeps each unit's best 20 results per run (neuron_images; the TUI shows 20)
SITES = ("post", "pre")
Y_KINDS = ("prob", "logit", "logprob")
CONVENTIONS = ("raw", "ln_f")
DEFAULT_KS = (0, 50, 100, 200, 400, 800, 1600, 3200, 6400)  # the ablation's k grid (method.md, experiment 4)
GRAPHICS = ("auto", "pixels", "halfblock")  # how the browser draws images
