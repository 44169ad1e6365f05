"""The v2 backend worker: its gRPC server, dynamic batching with deadline queues, and
the variants it serves.

Imports nothing from the gateway.
"""
