"""The Celery application: Redis broker and result backend, queues by device kind.

Two queues: ``gpu`` carries what runs a model (a job, a part of a split slide), ``cpu``
what is cheap without one (merging a split slide's parts). Which task goes where is
decided by its name, here and nowhere else (:data:`TASK_QUEUES`, Celery's
``task_routes``); a sender never names a queue. ``slidepipe worker --device cuda:N``
consumes ``gpu``; ``--device cpu`` (and ``auto``) consumes both, so that a machine
without a GPU still runs every job (docs/operations.md).

Delivery is at-least-once: a task is acknowledged only after it returns
(``task_acks_late``), a task whose pool process dies is handed back to the queue
(``task_reject_on_worker_lost``), a worker holds one message at a time
(``worker_prefetch_multiplier=1``), and a message left unacknowledged by a worker that
died outright returns to the queue after the Redis visibility timeout, and much sooner
through the reconciler (:mod:`workers.jobs.reconcile`), which also re-queues what a
restarted broker lost. Running a job twice is made harmless by the job store's claim
(see :mod:`workers.jobs.tasks`).
"""

from __future__ import annotations

import uuid

from celery import Celery
from kombu import Queue

from workers.jobs.settings import Settings, get_settings

GPU_QUEUE, CPU_QUEUE = "gpu", "cpu"
#: Every queue a worker may consume, in the order ``--queues`` lists them.
QUEUES: tuple[str, ...] = (GPU_QUEUE, CPU_QUEUE)
#: The queue of jobs (model runs); the name older code and the reconciler know.
QUEUE = GPU_QUEUE
RUN_JOB_TASK = "slidepipe.run_job"
#: Task name -> queue: the one routing table. Split-slide tasks (workers/jobs/split.py)
#: are listed by name so that they land on the right queue before that module is
#: imported; a task not listed goes to ``gpu`` (``task_default_queue``), which is safe
#: (a GPU worker can run anything) but wastes a GPU slot: list CPU-cheap tasks here.
TASK_QUEUES: dict[str, str] = {
    RUN_JOB_TASK: GPU_QUEUE,
    "slidepipe.run_part": GPU_QUEUE,  # one strip of a split slide: runs the model
    "slidepipe.finish_split": CPU_QUEUE,  # merge the strips' results and publish
}


def default_queues(device: str) -> tuple[str, ...]:
    """The queues a worker on ``device`` consumes unless ``--queues`` says otherwise.

    A GPU worker takes only model work; a CPU worker (and ``auto``, the one-worker
    setup of ``slidepipe up``) takes both, since a machine without a GPU must still run
    jobs, and a single worker must also run the CPU-cheap steps.
    """
    return (GPU_QUEUE,) if device.startswith("cuda") else QUEUES


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``; tests build their own with other URLs."""
    app = Celery(
        "slidepipe",
        broker=settings.broker_url,
        backend=settings.effective_result_backend_url,
        # the task, the reconciler that re-queues what the broker lost (worker_ready),
        # and what workers publish for /metrics (their node name, heartbeats)
        include=[
            "workers.jobs.tasks",
            "workers.jobs.reconcile",
            "workers.jobs.telemetry",
            "workers.jobs.worker_beats",
        ],
    )
    transport_options = {
        "visibility_timeout": settings.broker_visibility_timeout_s,
        "unacked_restore_interval": settings.broker_restore_interval_s,
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 3,
        "socket_timeout": 30,
    }
    app.conf.update(
        task_queues=tuple(Queue(q, routing_key=q) for q in QUEUES),
        task_default_queue=GPU_QUEUE,
        task_default_routing_key=GPU_QUEUE,
        task_routes={name: {"queue": q, "routing_key": q} for name, q in TASK_QUEUES.items()},
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=24 * 3600,
        task_track_started=True,
        broker_transport_options=transport_options,
        result_backend_transport_options=transport_options,
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = create_celery_app(get_settings())


def enqueue_job(job_id: str) -> None:
    """Hand a stored job to the broker (the API calls this after storing it)."""
    # The job store, not the result backend, holds the outcome: nobody waits on the
    # AsyncResult, so the sender does not subscribe to it (a dead backend would stall it).
    # No queue named here: task_routes sends it by its name.
    app.send_task(
        RUN_JOB_TASK,
        args=[job_id],
        task_id=f"{job_id}-{uuid.uuid4().hex[:8]}",
        ignore_result=True,
    )


def ping_broker(url: str, timeout_s: float = 2.0) -> None:
    """Raise when the broker at ``url`` does not answer within ``timeout_s``."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        try:
            client.ping()
        finally:
            client.close()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=timeout_s) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout_s)
