"""Stage 4, ONNX Runtime: sessions with the provider they really got, latency (`bench`), fidelity and gates
(`validate`), task metrics on data (`evaluate`, `datasets`), many keeps at once (`sweep`), pictures.

Takes models and data; gives measurements. Imports the stages below (`rewrite`, `select`, `graph`, `io`).
"""
