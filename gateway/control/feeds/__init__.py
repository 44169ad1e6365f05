"""Live price and carbon feeds (the fleet file's `feeds:`): `formats` reads each kind of
response into readings (pure functions of bytes and a time, no I/O), `poller` polls a
feed and applies its readings through the control plane."""
