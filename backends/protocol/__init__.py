"""What the worker and the gateway share about the protocol: errors and their gRPC
status mapping, tensors, the codec, and the request and response parameters."""
