"""Hot-path benchmark suite of gradconflict: ``python -m benchmarks.run --help``."""
