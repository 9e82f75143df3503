"""The host side of serving: which requests run, and where. Plain Python, no jax.

    request.py, sampling_params.py   the records: a request, its sampling, a prefill chunk of it
    block_manager.py                 the paged KV pool's bookkeeping (block ids, no device memory)
    shapes.py                        the padded shapes programs compile for (buckets)
    policies.py                      the scheduling rules, shared with the planner's simulator
    scheduler.py                     FCFS prefill batches and continuous decode batches
    colocated.py                     one replica doing both phases (prefill-first or chunked)
    disaggregated.py, threaded.py    prefill and decode instances, KV pulled between them
    placement.py                     which devices each phase's instances use (the planner's output)
    runner_interface.py              what the engines need from the device side (`Runner`)

The engines drive a runner through `runner_interface.Runner` and never import the runtime; the
runtime (dsjax/runtime) imports these records instead.
"""
