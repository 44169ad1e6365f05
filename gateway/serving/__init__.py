"""The data plane: the Open Inference Protocol servicer (the protocol edge), the one
Dispatcher (attempts, retries, hedges, deadlines and the queue bookkeeping over an injected
transport and clock), the coalescer, converters, backend pool, prober, metrics and statistics."""
