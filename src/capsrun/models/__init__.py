"""Model variants, one file each. Models never see a config: :mod:`capsrun.build` makes them."""
