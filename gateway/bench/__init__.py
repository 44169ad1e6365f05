"""`make bench`: the gateway against the backend it fronts and against KServe 0.21.

Run `python -m gateway.bench` (see `__main__`). Nothing here is imported by the gateway;
this package must not import `protos` (the load client and KServe run as subprocesses).
"""
