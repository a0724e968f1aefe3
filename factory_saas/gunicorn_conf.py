"""gunicorn settings for the web (`gunicorn -c python:factory_saas.gunicorn_conf`): the hooks
Prometheus's multiprocess mode needs when PROMETHEUS_MULTIPROC_DIR is set (factory_saas.metrics).
Bind address and worker count stay on the command line."""

from factory_saas.metrics import multiprocess_dir_reset, process_dead

# No gunicornc control socket: nothing here uses it, and on Kubernetes the root filesystem (its
# default place, under $HOME) is read-only, where it would warn at every start.
control_socket_disable = True


def on_starting(server):
    multiprocess_dir_reset()


def child_exit(server, worker):
    process_dead(worker.pid)
