"""The control plane: the admin API (servicer, client, CLI), the supervisor of launched
workers, price schedules and the fleet file watch. Every change an SRE or a schedule makes
to a running gateway goes through `plane.Control`."""
