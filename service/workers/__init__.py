"""Worker pool and execution backends (the only part of the service that touches torch or onnxruntime)."""
