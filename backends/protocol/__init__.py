"""What the worker and the gateway share about the protocol: errors and their gRPC
status mapping, tensors, the codec, and the request and response parameters.

Imports nothing from the gateway; of its modules only the codec imports generated
protobuf and only the status mapping imports grpc.
"""
