"""Tools that measure the library: benchmarks, the acceptance run, the time-to-accuracy run and their data.

They import the library and time its own code (the trainer's step, the loaders, the kernels); the library never
imports them.
"""
