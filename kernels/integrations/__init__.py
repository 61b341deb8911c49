"""Adapters from the conventions of public MAE codebases to the mae_kernels ops.

Each module takes what that codebase already carries and calls the ops, so a patch is a few lines:

- :mod:`mae_kernels.integrations.mae`: facebookresearch/mae (``ids_shuffle`` / ``ids_restore``, a cls
  token, ``[1, 1 + L, C]`` positional tables, ``norm_pix_loss``).
- :mod:`mae_kernels.integrations.videomae`: MCG-NJU/VideoMAE and sunlicai/HiCMAE (a boolean mask with
  a fixed number of masked tokens, ImageNet-normalised videos unnormalised for the target, per-channel
  target normalisation of channel-last patches).

docs/drop-in.md shows the lines to change in each codebase and the numbers that show equality.
"""
