"""The DVC stages' entry points, one module per stage of dvc.yaml (`python -m stages.<name>`).

Each parses its paths, loads params.yaml, calls the library (`lmpipeline`) and writes its outputs.
"""
