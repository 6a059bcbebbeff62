"""The two peers of bench/peer_bench.py, doing holdfast's job their usual
way: a Celery 5 task and a huey task that create a job at the fake KIE
provider, poll it by retrying themselves every PEER_POLL_S seconds, then
download its result and write it to PEER_OUT.

    celery -A _peers:celery_app worker -P prefork -c 4      (cwd bench/)
    huey_consumer _peers.huey -w 4 -k thread

Configured by the environment, which peer_bench.py sets for the consumers it
starts and for itself (it enqueues): PEER_KIE_URL, PEER_KIE_KEY, PEER_POLL_S,
PEER_REDIS_URL (broker; its db is peer_bench's --redis-db), PEER_HUEY_DB,
PEER_OUT. Every request has a connect and read timeout; a download is capped.
"""

import os

import requests

KIE = os.environ.get("PEER_KIE_URL", "http://127.0.0.1:9")
KEY = os.environ.get("PEER_KIE_KEY", "")
POLL_S = float(os.environ.get("PEER_POLL_S", "0.5"))
OUT = os.environ.get("PEER_OUT", "/tmp")
TIMEOUT = (5, 10)
MAX_BYTES = 16 * 1024 * 1024

_session = None


def _http():
    # One pooled session per process (a Celery child) or per thread would be
    # fairer still; a Session's pool is thread-safe enough for GETs/POSTs.
    global _session
    if _session is None:
        _session = requests.Session()
        _session.trust_env = False
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=8)
        _session.mount("http://", adapter)
    return _session


def create(prompt):
    resp = _http().post(f"{KIE}/api/v1/jobs/createTask", json={"model": "bench", "input": {"prompt": prompt}},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT)
    resp.raise_for_status()
    return resp.json()["data"]["taskId"]


def poll(job_id):
    """None while the job runs; its result URLs once it succeeded."""
    resp = _http().get(f"{KIE}/api/v1/jobs/recordInfo", params={"taskId": job_id},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT)
    resp.raise_for_status()
    data = resp.json()["data"]
    if data["state"] != "success":
        return None
    import json
    return json.loads(data["resultJson"])["resultUrls"]


def download(job_id, urls):
    for n, url in enumerate(urls):
        with _http().get(url, timeout=TIMEOUT, stream=True) as resp:
            resp.raise_for_status()
            body = resp.raw.read(MAX_BYTES + 1)
            if len(body) > MAX_BYTES:
                raise ValueError("result too big")
        with open(os.path.join(OUT, f"{job_id}-{n}.png"), "wb") as fh:
            fh.write(body)


# -- Celery: prefork, Redis broker, acks_late, polling by self.retry --------------

def _celery():
    from celery import Celery
    app = Celery("peer_bench", broker=os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/7"))
    app.conf.update(task_acks_late=True, task_ignore_result=True, worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True)

    @app.task(bind=True, acks_late=True, max_retries=None, name="peer_bench.job")
    def job(self, prompt, job_id=None):
        if job_id is None:
            job_id = create(prompt)
        urls = poll(job_id)
        if urls is None:
            raise self.retry(args=(prompt, job_id), countdown=POLL_S)
        download(job_id, urls)

    return app, job


# -- huey: SqliteHuey, polling by RetryTask ---------------------------------------

def _huey():
    from huey import SqliteHuey
    from huey.exceptions import RetryTask
    h = SqliteHuey("peer_bench", filename=os.environ.get("PEER_HUEY_DB", os.path.join(OUT, "huey.db")))

    @h.task(context=True, name="peer_bench.job")
    def job(prompt, task=None):
        # The job's id outlives the retries in huey's own key-value table.
        key = f"job:{task.id}"
        job_id = h.get(key, peek=True)
        if job_id is None:
            job_id = create(prompt)
            h.put(key, job_id)
        urls = poll(job_id)
        if urls is None:
            raise RetryTask(delay=POLL_S)
        download(job_id, urls)
        h.get(key)

    return h, job


if os.environ.get("PEER_KIND") == "celery":
    celery_app, celery_job = _celery()
elif os.environ.get("PEER_KIND") == "huey":
    huey, huey_job = _huey()
