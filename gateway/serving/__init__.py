"""The data plane: the Open Inference Protocol servicer (the protocol edge), the one
Dispatcher (attempts, retries, hedges, deadlines and the queue bookkeeping over an injected
transport and clock), the coalescer, converters, backend pool, prober, metrics and statistics.

The data plane imports the routing core, backends.protocol and generated protobuf; the
routing core never imports it, and the simulator only its Dispatcher.
"""
