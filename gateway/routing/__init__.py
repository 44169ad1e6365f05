"""The routing rule: the pure core. The router (choose, explain, baselines), SLA policies,
fleet state with its queue model, and latency estimates. Imports no grpc, no protobuf, no
clock, no asyncio and no randomness: time is an argument, so simulation and tests replay it."""
