"""Recipes: the programs that build the Shapes World assets in ``assets/models/``.

Each is a command (``genalign toyworld pretrain sd|clip|verifier``, ``genalign toyworld
distill lcm``) and a module with a ``main(argv)``:

- :mod:`genalign.recipes.pretrain_sd`: the tiny Stable Diffusion pipeline (``tiny-sd``), with
  its pipeline assembly in :mod:`~genalign.recipes.sd_pipeline` and its VAE and UNet stages in
  :mod:`~genalign.recipes.sd_training`;
- :mod:`genalign.recipes.pretrain_clip`: the tiny CLIP and aesthetic head (``shapes-clip``);
- :mod:`genalign.recipes.train_verifier`: the verifier reward's detector (``shapes-verifier``);
- :mod:`genalign.recipes.distill_lcm`: the latent consistency model (``tiny-lcm``).

They share :mod:`genalign.recipes.common` (data streams, augmentation, the step/time budget and
learning-rate schedule, seeding, publishing a finished folder). The benchmark itself,
:mod:`genalign.toyworld`, imports none of this.
"""

import os

# OpenMP threads that spin while waiting stall for seconds per step when another process
# shares the cores (measured: 2-11 s/step spinning vs 0.45 s passive). Set here, before any
# recipe imports torch; only effective when torch has not been loaded yet (e.g. `python -m`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
