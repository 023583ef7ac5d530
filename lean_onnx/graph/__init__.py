"""Stage 1, the channel graph: load an ONNX file (full checker, input shapes, normalisation) and build the
ChannelGraph: every channel a node, every kernel an edge, coupling groups and frozen parts, with one
channel-flow handler per op type (`registry.py`). Also the model's cost (params, MACs) and `inspect`.

Takes a path or ModelProto; gives `LoadedModel` and `ChannelGraph`. Imports only `io`.
"""
