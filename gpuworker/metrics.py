"""Worker metrics: where an assignment's time goes, bytes in, memory."""

from prometheus_client import Counter, Gauge, Histogram

from distzo.infra.metrics import LATENCY_BUCKETS

PHASE_SECONDS = Counter("distzo_worker_phase_seconds_total",
                        "Time in each phase: fetch, h2d (host to device), gather (node all-gather), compute, wait (compute blocked on a block), replay (a node group member rebuilding its slice at the step's version: update windows)",
                        ["phase"])
RECEIVED_BYTES = Counter("distzo_worker_received_bytes_total", "Block bytes received from the parameter server", ["transport"])
ASSIGNMENTS = Counter("distzo_worker_assignments_total", "Assignments run, by kind and outcome", ["kind", "outcome"])
ASSIGNMENT_SECONDS = Histogram("distzo_worker_assignment_duration_seconds", "Wall time of one assignment",
                               buckets=LATENCY_BUCKETS)
PEAK_MEMORY = Gauge("distzo_worker_peak_memory_bytes", "Peak device memory (GPU) or resident set size (CPU)")
PEAK_BLOCK_BYTES = Gauge("distzo_worker_peak_block_bytes", "Block buffers and perturbed copies alive at once, at peak")
READY = Gauge("distzo_worker_ready",
              "1 while the worker has a session with the coordinator and is set up for its job (the readiness probe, gpuworker/probe.py)")
