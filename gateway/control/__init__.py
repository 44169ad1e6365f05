"""The control plane: the admin API (servicer, client, CLI), the supervisor of launched
workers, price schedules and the fleet file watch. Every change an SRE or a schedule makes
to a running gateway goes through `plane.Control`.

Its modules may import the routing core, the serving metrics and backends; the routing
core and the data plane's dispatch import nothing from here, and the simulator only
the feeds' formats (pure functions, to replay recorded feeds).
"""
