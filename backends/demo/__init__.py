"""The demo models, built from code (trained and exported here, nothing downloaded).

Imports nothing from the gateway, and no grpc or generated protobuf.
"""
