"""Coordinator metrics: training progress, the step's phases, workers, failures."""

from prometheus_client import Counter, Gauge, Histogram

from distzo.infra.metrics import LATENCY_BUCKETS

STEP = Gauge("distzo_train_step", "Training steps applied")
PLANNED_STEPS = Gauge("distzo_train_steps_planned", "Steps the job will run")
LOSS = Gauge("distzo_train_loss", "Last step's mean loss over shards and directions, by perturbation sign", ["sign"])
GRADIENT = Gauge("distzo_train_projected_gradient", "Last step's projected gradient g of direction 0")
GRADIENT_ABS = Histogram("distzo_train_projected_gradient_abs", "|g| of every direction",
                         buckets=(1e-3, 1e-2, 0.1, 0.3, 1, 3, 10, 30, 100, 1e3, 1e4))
LEARNING_RATE = Gauge("distzo_train_learning_rate", "Last step's learning rate")
STEP_SECONDS = Histogram("distzo_train_step_duration_seconds", "Wall time of one training step",
                         buckets=LATENCY_BUCKETS)
PHASE_SECONDS = Histogram("distzo_train_step_phase_seconds",
                          "Coordinator time per step phase: assign (sending work), wait (for losses), update (server ack)",
                          ["phase"], buckets=LATENCY_BUCKETS)
WORKER_PHASE_SECONDS = Counter("distzo_train_worker_seconds_total",
                               "Worker time reported with results, by phase (fetch, h2d, gather, compute, wait)", ["phase"])
TOKENS = Counter("distzo_train_tokens_total", "Tokens processed by training forwards")
BYTES_RECEIVED = Counter("distzo_train_received_bytes_total", "Block bytes the workers received for training steps")
MODEL_BYTES = Gauge("distzo_train_model_bytes", "One copy of the model at the served dtype")
WORKERS = Gauge("distzo_workers", "Registered workers by state", ["state"])
REASSIGNMENTS = Counter("distzo_reassignments_total", "Forwards re-assigned to another worker")
SKIPPED = Counter("distzo_skipped_steps_total", "Steps not applied because their losses were not finite")
NONFINITE_RETRIES = Counter("distzo_nonfinite_retries_total", "Steps re-run because a loss was not finite")
LATE_REPORTS = Counter("distzo_late_reports_total", "Loss reports for work no longer pending (ignored)")
DEV_LOSS = Gauge("distzo_eval_dev_loss", "Dev loss at the last eval")
DEV_ACCURACY = Gauge("distzo_eval_dev_accuracy", "Dev label accuracy at the last eval")
JOB_STATE = Gauge("distzo_job_state", "1 for the job's current state", ["state"])
JOB_STATES = ("idle", "starting", "waiting_for_workers", "running", "paused", "stopping", "stopped", "done", "failed")
PERTURBATION_EPS = Gauge("distzo_perturbation_eps", "The eps the forwards perturb by (train.eps; train.eps_bf16 for "
                         "bfloat16 forwards)")
PERTURBATION_RMS = Gauge("distzo_perturbation_rms_error_ratio", "RMS error of the perturbation the forwards see, relative "
                         "to eps, by tensor kind (measured at the job's start on a sample of the weights; "
                         "distzo/train/precision.py)", ["kind"])
PERTURBATION_LOST = Gauge("distzo_perturbation_lost_ratio", "Fraction of the weights whose +eps and -eps forward copies "
                          "are equal, by tensor kind (measured at the job's start on a sample; distzo/train/precision.py)",
                          ["kind"])
