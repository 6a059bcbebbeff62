"""For split_bench.py, two halves of `python app.py`:

    python bench/_split_worker.py server   holdfast's serve(), its worker never started
    python bench/_split_worker.py worker   a Worker alone, on the same store (HOLDFAST_DATA)

The worker half prints "worker serving" once started and stops on SIGTERM.
Without a wake from the other process it finds new tasks at its tick.
"""

import os
import signal
import sys
import threading

from _common import ROOT  # noqa: F401  (puts the repository on sys.path)

import app
from config import Config, open_everything, setup_logging, stop_logging
from worker import Worker


def worker_alone():
    config = Config.load()
    setup_logging(config.log)
    store, providers, files = open_everything(config)
    worker = Worker(store, providers, files, threads=config.worker_threads, lease_s=config.lease_s)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker.start()
    print("worker serving", flush=True)
    stop.wait()
    worker.shutdown()
    store.close()
    stop_logging()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        worker_alone()
    elif sys.argv[1:] == ["server"]:
        Worker.start = lambda self: None
        sys.exit(app.main([]))
    else:
        sys.exit("usage: _split_worker.py server|worker")
