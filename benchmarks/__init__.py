"""Scripts that measure the pipeline and print figures (`python -m benchmarks.<name>`); never
imported by the stages, never timing assertions in tests."""
