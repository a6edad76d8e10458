"""One module per command: ``capsrun <command>`` runs the function of the same name.

``train``, ``eval``, ``sample``, ``analyze`` and ``bench`` are Hydra tasks (config in, run dir
out); ``report`` reads finished runs and takes plain arguments. These modules and
:mod:`capsrun.build` are the only code that reads a config.
"""
