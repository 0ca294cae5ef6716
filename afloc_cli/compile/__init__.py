"""`afloc compile`: the encoders as deployable engines (TensorRT on NVIDIA GPUs, AOTInductor anywhere).

- `export`: the one place the compiled graphs are defined (preprocessing contract, outputs,
  dynamic batch); both backends start from its ExportedPrograms.
- `aoti`, `tensorrt`: the two backends, each a thin call of its library's public API.
- `engine`: the engine folder (metadata.json + packages), its parity check, and
  `load_engine` for `afloc localize --engine`.

Submodules are imported on use: torch_tensorrt in particular only by `tensorrt`, lazily.
"""
