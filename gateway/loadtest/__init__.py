"""Open-loop load against a live gateway: the generator, its records, reports, charts,
and the demo that plays a scenario live.

The generator reaches the gateway only over gRPC and imports none of its running parts
(servicer, dispatcher); the records and the report import no grpc or protobuf.
"""
