"""Stage 5 (deployment): ONNX export with parity check, the HTTP service, production feedback, benchmark."""
