"""Joining Ray: the one way screening, training and labelling start or join a cluster."""
import logging

import ray

from screener import reaper


def connect(address: str | None, worker_logs: bool = False, dashboard: bool = False) -> None:
    """Join a running cluster, or start a private local Ray sized to this machine.

    Worker logs stay off for screening (their progress is the driver's bar); training turns
    them on because its epoch lines are printed by the workers. A local Ray starts without its
    dashboard unless asked, which saves start-up time; training asks, because the dashboard
    serves the State API that Ray Train's placement-group monitor polls for the run's
    controller. Without its own, the monitor warns every second, and once another Ray's
    dashboard takes the default port it asks that one, does not find the controller there and
    removes the run's placement group, which ends the training. A local Ray gets a watchdog
    (screener.reaper) that ends its processes should this driver be killed. Ray's start-up
    notices (the local instance's address, the token-authentication note) are held back, as
    they would cut through the progress bars; its later warnings still show.
    """
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=dashboard, log_to_driver=worker_logs,
                 logging_level=logging.ERROR)
        logging.getLogger("ray").setLevel(logging.WARNING)
        if not address:
            reaper.guard()
