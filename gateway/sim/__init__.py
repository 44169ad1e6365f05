"""Offline simulation: the scenario format, arrivals, the simulator (the serving
Dispatcher over a simulated transport and clock) and the offline lower bound.

Imports the routing core and the serving Dispatcher; never grpc or protobuf."""
