"""chatq's QueueScaler operator: scales the worker Deployment on queue depth.

`decision` is the pure scaling rule, `sources` reads queues and busy counts, `handlers`
wires both into kopf, and `python -m chatq_operator` runs it.
"""
