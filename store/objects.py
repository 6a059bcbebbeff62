"""ObjectStore: tasks' result files in an S3-compatible bucket (AWS S3,
Cloudflare R2, Aliyun OSS, MinIO), behind the same interface as FileStore,
so that several servers, or one whose disk is wiped on every deploy, serve
every file. `open_files` chooses between the two from HOLDFAST_FILES.

The layout and the fencing are FileStore's: a worker writes a task's
results under <prefix>/<task id>/_lease<token>/<name>, and nothing serves
or counts them until the fenced store update that lists them has committed.
Each object appears whole or not at all: a small file is one PUT, a larger
one a multipart upload whose parts stay invisible until the final
CompleteMultipartUpload, and a crash before that leaves an upload that
`partial_files` finds (recover.py aborts it) and no object. Writes are
conditional (If-None-Match: *): an object, once there, is never replaced,
whoever writes next.

boto3 is needed only by those who use this store, like psycopg for
PostgreSQL; it is imported when the store is opened.
"""

import base64
import hashlib
import logging
import os
import re
import time
from contextlib import contextmanager

from errors import ConfigError, Conflict, InvalidInput, NotFound

from .files import _FILE_NAME, _LEASE_DIR, _TASK_ID, CONTENT_TYPES, FileStore

# One part is what an upload holds in memory, whatever the file's size.
# S3 wants at least 5 MiB in every part but the last.
PART_BYTES = 8 << 20
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_DELETE_BATCH = 1000        # DeleteObjects takes at most 1000 keys
log = logging.getLogger("holdfast.files")
SEEN_S = 60.0               # how long task_ids' listing answers `unlisted`


class ObjectStoreError(OSError):
    """The bucket could not be reached or refused a call. An OSError, so
    that callers treat it as they treat a disk that fails; `transient`:
    the worker tries a save again later, as after a full disk."""

    transient = True


def parse_files_url(value):
    """HOLDFAST_FILES: None for `local`, else (bucket, prefix) of an
    `s3://bucket/prefix` URL (the prefix may be empty). ConfigError
    otherwise."""
    value = (value or "local").strip()
    if value == "local":
        return None
    m = re.match(r"^s3://([^/]+)/?(.*)$", value)
    if not m or not _BUCKET.match(m.group(1)) or (m.group(2).strip("/") and not _PREFIX.match(
            m.group(2).strip("/"))):
        raise ConfigError(f"HOLDFAST_FILES must be local or s3://bucket/prefix, not {value!r}")
    return m.group(1), m.group(2).strip("/")


def open_files(config, *, create=True, env=None):
    """The file store config.files names: FileStore under HOLDFAST_DATA, or
    an ObjectStore configured from the environment."""
    where = parse_files_url(config.files)
    if where is None:
        return FileStore(os.path.join(config.data, "files"), create=create)
    return ObjectStore(where[0], where[1], client=s3_client(config, env),
                       presign_s=config.s3_presign_s if config.s3_presign else None)


def s3_client(config, env=None):
    """A boto3 S3 client whose endpoint, region and credentials come from
    the environment only (no ~/.aws files, no instance metadata), bounded
    in time on every call."""
    env = os.environ if env is None else env
    try:
        import boto3
        from botocore.config import Config as BotoConfig
    except ImportError:
        raise ConfigError("HOLDFAST_FILES names an S3 bucket, which needs boto3: pip install boto3") from None
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise ConfigError("HOLDFAST_FILES names an S3 bucket: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    bounds = BotoConfig(
        connect_timeout=5, read_timeout=60,
        # Retried: timeouts, resets, 5xx, throttling. Each call holdfast
        # makes is safe to repeat: a PUT or a part of the same key and the
        # same bytes leaves the same object (and a conditional PUT whose
        # first try landed is recognised by its ETag, see _landed), a
        # DELETE or an abort of what is gone is no error, reads change
        # nothing. Three tries bound a call at about three read timeouts.
        retries={"max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": config.s3_addressing},
        signature_version="s3v4")
    session = boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret,
                                    aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
                                    region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
                                    or "us-east-1")
    return session.client("s3", endpoint_url=config.s3_endpoint or None, config=bounds)


@contextmanager
def _seam(what):
    """botocore's errors become ObjectStoreError (or the FileNotFoundError a
    missing object is), here and nowhere else."""
    from botocore.exceptions import BotoCoreError, ClientError
    try:
        yield
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(f"{what}: no such object") from None
        raise ObjectStoreError(f"{what}: {code or 'error'}: "
                               f"{exc.response.get('Error', {}).get('Message', '')}".rstrip(": ")) from None
    except BotoCoreError as exc:
        raise ObjectStoreError(f"{what}: {exc}") from None


def _code(exc):
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


class ObjectStore(FileStore):
    """Result files as objects <prefix>/<task id>/[<lease dir>/]<name> in
    one bucket, with their size and sha256. `presign_s`: downloads are
    redirects to links valid that many seconds; None streams them through
    holdfast."""

    remote = True

    def __init__(self, bucket, prefix, *, client, presign_s=300.0, part_bytes=PART_BYTES):
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.root = f"s3://{bucket}/{self.prefix}"
        self.client = client
        self.presign_s = presign_s
        self.part_bytes = part_bytes
        self._seen = (float("-inf"), {})     # see task_ids

    # -- names -----------------------------------------------------------------

    def path(self, task_id, name, scope=None):
        """The object key of the file `name` (see FileStore.path)."""
        if (not _TASK_ID.match(task_id) or not _FILE_NAME.match(name)
                or (scope is not None and not _LEASE_DIR.match(str(scope)))):
            raise NotFound("file not found", code="file_not_found")
        return f"{self.prefix}{task_id}/{name}" if scope is None else f"{self.prefix}{task_id}/{scope}/{name}"

    def task_of(self, path):
        rel = str(path)[len(self.prefix):].split("/")
        return rel[0] if str(path).startswith(self.prefix) and _TASK_ID.match(rel[0]) else None

    # -- writing ---------------------------------------------------------------

    def save(self, task_id, name, chunks, *, max_bytes, content_type=None, scope=None):
        """See FileStore.save. At most one part is held in memory; Conflict
        when the key holds other bytes already (never replaced)."""
        key = self.path(task_id, name, scope)
        ext = os.path.splitext(name)[1].lower()
        ctype = content_type or CONTENT_TYPES.get(ext, "application/octet-stream")
        digest, size, buf, upload = hashlib.sha256(), 0, bytearray(), None
        try:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise InvalidInput(f"{name} is larger than {max_bytes} bytes", code="invalid_result")
                digest.update(chunk)
                buf += chunk
                while len(buf) >= self.part_bytes:
                    upload = upload or _Multipart(self, key, ctype)
                    upload.put(bytes(buf[:self.part_bytes]))
                    del buf[:self.part_bytes]
            if upload is None:
                self._put(key, bytes(buf), ctype, digest)
            else:
                if buf:
                    upload.put(bytes(buf))
                upload.complete()
        except BaseException:
            if upload is not None:
                upload.abort()
            raise
        meta = {"name": name, "size": size, "sha256": digest.hexdigest(), "content_type": ctype}
        if scope is not None:
            meta["dir"] = scope
        return meta

    def _put(self, key, body, ctype, digest):
        from botocore.exceptions import ClientError
        try:
            with _seam(f"PUT {key}"):
                try:
                    # S3 checks the bytes it got against our sha256.
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=ctype,
                                           IfNoneMatch="*",
                                           ChecksumSHA256=base64.b64encode(digest.digest()).decode())
                except ClientError as exc:
                    if _code(exc) not in ("PreconditionFailed", "412"):
                        raise
                    self._landed(key, hashlib.md5(body, usedforsecurity=False).hexdigest())
        except FileNotFoundError:
            raise ObjectStoreError(f"PUT {key}: refused, and no object is there") from None

    def _landed(self, key, etag):
        """After a conditional write was refused: fine when the object there
        is the one we sent (a retried request whose first try landed),
        Conflict when it holds other bytes."""
        head = self.client.head_object(Bucket=self.bucket, Key=key)
        if head.get("ETag", "").strip('"') != etag:
            raise Conflict(f"{key} exists already and is never replaced", code="object_exists")

    # -- reading ---------------------------------------------------------------

    def exists(self, task_id, meta):
        try:
            self.size_of(task_id, meta)
        except FileNotFoundError:
            return False
        return True

    def size_of(self, task_id, meta):
        key = self.entry_path(task_id, meta)
        with _seam(f"HEAD {key}"):
            return self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]

    def sha256_of(self, task_id, meta):
        """The sha256 of the object's bytes as read back now; None if gone."""
        digest = hashlib.sha256()
        try:
            chunks, _ = self.open(task_id, meta)
            for chunk in chunks:
                digest.update(chunk)
        except FileNotFoundError:
            return None
        return digest.hexdigest()

    def open(self, task_id, meta):
        """(an iterator over the object's bytes, its size); the body is
        closed when the iterator ends or is closed."""
        key = self.entry_path(task_id, meta)
        with _seam(f"GET {key}"):
            res = self.client.get_object(Bucket=self.bucket, Key=key)

        def chunks():
            try:
                with _seam(f"GET {key}"):
                    yield from res["Body"].iter_chunks(1 << 16)
            finally:
                res["Body"].close()
        return chunks(), res["ContentLength"]

    def link(self, task_id, meta):
        """A presigned GET of the file, valid presign_s seconds."""
        key = self.entry_path(task_id, meta)
        with _seam(f"presign {key}"):
            return self.client.generate_presigned_url(
                "get_object", ExpiresIn=max(1, int(self.presign_s)),
                Params={"Bucket": self.bucket, "Key": key, "ResponseContentType": meta["content_type"]})

    # -- listing and removing ----------------------------------------------------

    def _list(self, prefix, delimiter=None):
        """(keys, common prefixes) under `prefix`, every page."""
        keys, folders = [], []
        args = {"Bucket": self.bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
        with _seam(f"LIST {prefix}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(**args):
                keys += [o["Key"] for o in page.get("Contents", ())]
                folders += [p["Prefix"] for p in page.get("CommonPrefixes", ())]
        return keys, folders

    def _uploads(self, prefix):
        """(key, upload id) of the multipart uploads begun under `prefix`."""
        found = []
        with _seam(f"LIST uploads {prefix}"):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=self.bucket, Prefix=prefix):
                found += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", ())]
        return found

    def task_ids(self):
        """See FileStore.task_ids. One listing of the whole prefix (a page
        per 1000 objects), whose contents `unlisted` then uses for a minute:
        the pass that follows (retention's, the audit's) asks about every
        finished task, and a LIST per task and pass would cost a request
        per task every five minutes. Only finished tasks are asked about,
        whose lists never change: a copy made after the listing is found
        by the next pass, and nothing listed is ever taken for a stray."""
        seen = {}
        for key in self._list(self.prefix)[0] + [k for k, _ in self._uploads(self.prefix)]:
            task, _, rest = key[len(self.prefix):].partition("/")
            if _TASK_ID.match(task) and rest:
                seen.setdefault(task, set()).add(rest.split("/")[0])
        self._seen = (time.monotonic(), seen)
        return sorted(seen)

    def partial_files(self):
        """Multipart uploads a crash interrupted, as `key?uploadId=...`."""
        return sorted(f"{key}?uploadId={upload}" for key, upload in self._uploads(self.prefix))

    def discard_partial(self, ref):
        key, _, upload = ref.rpartition("?uploadId=")
        _abort(self, key, upload)

    def unlisted(self, task_id, listed):
        at, seen = self._seen
        named = {meta.get("dir") or meta["name"] for meta in listed}
        if time.monotonic() - at < SEEN_S and task_id in seen:
            return sorted(n for n in seen[task_id] if n not in named)
        base = f"{self.prefix}{task_id}/"
        keys, folders = self._list(base, "/")
        names = {k[len(base):] for k in keys} | {f[len(base):].rstrip("/") for f in folders}
        # A lease whose upload a crash cut short has no object, only the
        # upload: its folder is unlisted all the same, as on disk.
        names |= {key[len(base):].split("/")[0] for key, _ in self._uploads(base)}
        return sorted(n for n in names if n not in named)

    def discard(self, task_id, name):
        if not _TASK_ID.match(task_id) or not (_LEASE_DIR.match(name) or _FILE_NAME.match(name)):
            return
        self._seen[1].get(task_id, set()).discard(name)
        base = f"{self.prefix}{task_id}/{name}"
        try:
            if _LEASE_DIR.match(name):
                self._delete_under(base + "/")
            else:
                self._delete([base])
        except ObjectStoreError as exc:
            # An unlisted copy is never served; the end of its task, or
            # retention's next pass, removes it once the bucket answers.
            log.warning("could not remove %s of task %s yet: %s", name, task_id, exc)

    def remove_task(self, task_id):
        if _TASK_ID.match(task_id):
            self._seen[1].pop(task_id, None)
            self._delete_under(f"{self.prefix}{task_id}/")

    def _delete_under(self, prefix):
        # Uploads first: one that completed after the listing would leave
        # an object behind; aborted first, it cannot complete.
        for key, upload in self._uploads(prefix):
            _abort(self, key, upload)
        self._delete(self._list(prefix)[0])

    def _delete(self, keys):
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i:i + _DELETE_BATCH]
            with _seam(f"DELETE {len(batch)} object(s)"):
                res = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in batch], "Quiet": True})
            errors = [e for e in res.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise ObjectStoreError(f"DELETE {errors[0].get('Key')}: {errors[0].get('Code')}")


def _abort(store, key, upload):
    from botocore.exceptions import ClientError
    with _seam(f"abort {key}"):
        try:
            store.client.abort_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload)
        except ClientError as exc:
            if _code(exc) not in ("NoSuchUpload", "404"):
                raise


class _Multipart:
    """One multipart upload: parts invisible until `complete`, which is
    conditional like a PUT."""

    def __init__(self, store, key, ctype):
        self.store, self.key, self.parts, self.md5s = store, key, [], []
        with _seam(f"begin {key}"):
            self.upload = store.client.create_multipart_upload(
                Bucket=store.bucket, Key=key, ContentType=ctype)["UploadId"]

    def put(self, body):
        n = len(self.parts) + 1
        self.md5s.append(hashlib.md5(body, usedforsecurity=False).digest())
        try:
            with _seam(f"part {n} of {self.key}"):
                res = self.store.client.upload_part(Bucket=self.store.bucket, Key=self.key,
                                                    UploadId=self.upload, PartNumber=n, Body=body)
        except ObjectStoreError as exc:
            if "NoSuchUpload" in str(exc):
                # Aborted by whoever removed the task's files: it ended.
                raise Conflict(f"the task ended while {self.key} was being saved",
                               code="task_finished") from None
            raise
        self.parts.append({"PartNumber": n, "ETag": res["ETag"]})

    def complete(self):
        from botocore.exceptions import ClientError
        etag = hashlib.md5(b"".join(self.md5s), usedforsecurity=False).hexdigest() + f"-{len(self.md5s)}"
        with _seam(f"complete {self.key}"):
            try:
                self.store.client.complete_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self.upload, IfNoneMatch="*",
                    MultipartUpload={"Parts": self.parts})
            except ClientError as exc:
                if _code(exc) not in ("PreconditionFailed", "412", "NoSuchUpload"):
                    raise
                try:
                    self.store._landed(self.key, etag)
                except ClientError as missing:
                    if _code(missing) in ("404", "NoSuchKey") and _code(exc) == "NoSuchUpload":
                        raise Conflict(f"the task ended while {self.key} was being saved",
                                       code="task_finished") from None
                    raise
                if _code(exc) != "NoSuchUpload":
                    self.abort()        # a refused completion leaves its parts
        self.upload = None

    def abort(self):
        if self.upload is None:
            return
        try:
            _abort(self.store, self.key, self.upload)
        except OSError:
            pass        # best effort: recover.py and retention find what is left
