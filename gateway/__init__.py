"""Switchyard's gateway: the pure routing core (routing/), the data plane (serving/), the
control plane (control/), simulation (sim/), load tests (loadtest/), benchmarks
(bench/) and reports (report/), with the fleet file (config) and the one command line
(cli).

The walls between the planes are pyproject's import-linter contracts: the routing core
imports no grpc, protobuf, clock, asyncio or randomness; generated protobuf stays at the
edges; the simulator never imports grpc. Nothing here is imported by backends/.
"""
