"""`make worker`: register this machine in the pool and run a Celery worker on its own queue."""

import os
import socket
import threading

from django.core.management.base import BaseCommand

from factory_saas.celery import app
from jobs import worker as pool_worker
from jobs.runner.isolation import keep_private
from jobs.runtimes import runtimes_probe
from jobs.services.pool import worker_register


class Command(BaseCommand):
    help = "Register this machine's GPUs (or CPU slots) and consume its own queue."

    def add_arguments(self, parser):
        parser.add_argument(
            "--name", default="", help="Worker name (default: WORKER_NAME or the hostname)."
        )
        parser.add_argument(
            "--with-default-queue",
            action="store_true",
            help="Also run the scheduler tick and other default-queue tasks (one-machine setups).",
        )

    def handle(self, *args, name, with_default_queue, **options):
        # First: this process holds the platform's secrets, and job children run as its user.
        keep_private()
        name = name or pool_worker.default_name()
        devices = pool_worker.detect_devices()
        # Once, before registering: a runtime installed or repaired later needs a restart.
        runtimes = runtimes_probe()
        worker = worker_register(
            name=name,
            devices=devices,
            hostname=socket.gethostname(),
            version="0.1.0",
            runtimes=runtimes,
        )
        os.environ["FACTORY_WORKER_ID"] = str(worker.pk)
        os.environ["FACTORY_WORKER_SLOTS"] = str(worker.slots)  # its pool processes warm children
        queues = [worker.queue, *(["default"] if with_default_queue else [])]
        self.stdout.write(
            f"worker {name}: {worker.slots}x {worker.resource_class}, queues {', '.join(queues)}"
        )
        for runtime in runtimes:
            state = (
                f"broken: {runtime.error}" if runtime.error else f"Python {runtime.python_version}"
            )
            self.stdout.write(f"runtime {runtime.name} ({runtime.interpreter}): {state}")
        stop = threading.Event()
        threading.Thread(
            target=pool_worker.heartbeat_forever, args=(worker.pk, stop), daemon=True
        ).start()
        try:
            app.worker_main(
                [
                    "worker",
                    "--loglevel=INFO",
                    f"--hostname={name}@%h",
                    f"--queues={','.join(queues)}",
                    # One pool process per slot, plus one for default-queue work.
                    f"--concurrency={worker.slots + (1 if with_default_queue else 0)}",
                    "--prefetch-multiplier=1",
                    "--without-mingle",
                    "--without-gossip",
                ]
            )
        finally:
            stop.set()
