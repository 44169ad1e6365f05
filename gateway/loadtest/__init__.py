"""Open-loop load against a live gateway: the generator, its records, reports, charts,
and the demo that plays a scenario live."""
