"""FileStore: tasks' result files on disk, and the names and content types
they may have. Kept apart from the database stores: files live beside
whichever backend holds the tasks.

Files are fenced like rows (DESIGN guarantee 3). A worker writes a task's
results into a folder of its own lease, data/files/<task id>/_lease<token>/,
and the task's `files` entries name that folder (`dir`). Nothing serves or
counts a copy until the fenced store update that records the entries has
committed, and the store refuses that update from a lease that was taken
over: so a worker that lost its lease can write bytes, but never over the
ones another lease published. Copies no entry names (a refused lease's, a
crashed download's, every copy of a task that ended without files) are
removed by whoever learns they are unlisted: the worker after a refused
update, the end of the task, retention, `recover.py --audit --fix`.

Tasks finished before this layout list entries without `dir`; their files
sit directly in the task's folder and are served from there.
"""

import errno
import hashlib
import os
import random
import re
import shutil

from errors import InvalidInput, NotFound


_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TASK_ID = re.compile(r"^t_[0-9A-Z]{26}$")
# A lease's folder starts with "_", which no result file name can (they
# start with a letter or digit): the two never collide in a task's folder.
_LEASE_DIR = re.compile(r"^_lease[0-9]{1,18}$")
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                 ".webp": "image/webp", ".gif": "image/gif", ".mp4": "video/mp4",
                 ".webm": "video/webm", ".mp3": "audio/mpeg", ".wav": "audio/wav",
                 ".json": "application/json", ".txt": "text/plain"}


def safe_file_name(name):
    """A result file's name as holdfast stores it: the last path part, plain
    characters only, never empty, never hidden, never `..`."""
    base = re.split(r"[\\/]", str(name))[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:128]
    return base if _FILE_NAME.match(base) else "file"


def lease_dir(token):
    """The folder, inside its task's, where the lease `token` writes."""
    return f"_lease{int(token)}"


def no_space(exc):
    """True for an OSError that says the disk (or a quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class FileStore:
    """Result files under data/files/<task id>/[<lease dir>/]<name>, written
    atomically (temporary file, fsync, rename) with their size and sha256.
    store/objects.py's ObjectStore keeps them in a bucket instead."""

    remote = False      # files are served from `path`; an ObjectStore's are not

    def __init__(self, root, *, create=True):
        self.root = os.path.abspath(root)
        if create:
            os.makedirs(self.root, exist_ok=True)

    def path(self, task_id, name, scope=None):
        """Where the file `name` is: in the lease folder `scope` (a files
        entry's `dir`), or, for tasks written before lease folders, directly
        in the task's folder. NotFound for a name holdfast never writes."""
        if (not _TASK_ID.match(task_id) or not _FILE_NAME.match(name)
                or (scope is not None and not _LEASE_DIR.match(str(scope)))):
            raise NotFound("file not found", code="file_not_found")
        if scope is None:
            return os.path.join(self.root, task_id, name)
        return os.path.join(self.root, task_id, scope, name)

    def entry_path(self, task_id, meta):
        """The path of one of a task's `files` entries."""
        return self.path(task_id, meta["name"], meta.get("dir"))

    def exists(self, task_id, meta):
        """True while the file a `files` entry names is there."""
        return os.path.exists(self.entry_path(task_id, meta))

    def size_of(self, task_id, meta):
        """The stored size of an entry's file; OSError when it is gone."""
        return os.path.getsize(self.entry_path(task_id, meta))

    def sha256_of(self, task_id, meta):
        """The sha256 of an entry's bytes as read back now; None if gone."""
        digest = hashlib.sha256()
        try:
            with open(self.entry_path(task_id, meta), "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
        except OSError:
            return None         # deleted by retention meanwhile
        return digest.hexdigest()

    def open(self, task_id, meta):
        """(an iterator over an entry's bytes, its size); OSError when gone."""
        fh = open(self.entry_path(task_id, meta), "rb")   # noqa: SIM115 (closed by the iterator)

        def chunks():
            with fh:
                while chunk := fh.read(1 << 16):
                    yield chunk
        return chunks(), os.fstat(fh.fileno()).st_size

    def save(self, task_id, name, chunks, *, max_bytes, content_type=None, scope=None):
        """Write `chunks` (an iterable of bytes) as the task's file `name`,
        in the lease folder `scope` (see lease_dir) when given. Returns the
        files entry, `dir` included. InvalidInput when it passes `max_bytes`;
        nothing is left behind then, nor after any other error."""
        final = self.path(task_id, name, scope)
        self._make_folders(task_id, scope)
        # Only against another try of the same lease: not a secret, so no
        # system call (secrets' is one, and a handover of the GIL).
        tmp = f"{final}.{random.getrandbits(32):08x}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise InvalidInput(f"{name} is larger than {max_bytes} bytes", code="invalid_result")
                    digest.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        ext = os.path.splitext(name)[1].lower()
        meta = {"name": name, "size": size, "sha256": digest.hexdigest(),
                "content_type": content_type or CONTENT_TYPES.get(ext, "application/octet-stream")}
        if scope is not None:
            meta["dir"] = scope
        return meta

    def _make_folders(self, task_id, scope):
        """The task's folder and, when given, its lease folder `scope`: a
        mkdir each. os.makedirs first looks at each parent, a system call
        (and a handover of the GIL) per look."""
        folders = [os.path.join(self.root, task_id)]
        if scope is not None:
            folders.append(os.path.join(folders[0], scope))
        try:
            for folder in folders:
                try:
                    os.mkdir(folder)
                except FileExistsError:
                    pass
        except FileNotFoundError:       # no folder for files at all yet
            os.makedirs(folders[-1], exist_ok=True)

    def task_ids(self):
        """The task ids that have a folder here, sorted; other entries are
        not holdfast's and are left alone."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []      # opened with create=False before any file was saved
        return sorted(n for n in names
                      if _TASK_ID.match(n) and os.path.isdir(os.path.join(self.root, n)))

    def task_of(self, path):
        """The task id a path under this store belongs to, or None."""
        rel = os.path.relpath(path, self.root).split(os.sep)
        return rel[0] if rel and _TASK_ID.match(rel[0]) else None

    def partial_files(self):
        """Temporary files left by downloads a crash interrupted."""
        found = []
        for folder, _, names in os.walk(self.root):
            found += [os.path.join(folder, n) for n in names if n.endswith(".part")]
        return sorted(found)

    def discard_partial(self, ref):
        """Delete one of `partial_files`; one finished meanwhile is no error."""
        try:
            os.unlink(ref)
        except FileNotFoundError:
            pass        # its download finished (renamed it) after we looked

    def unlisted(self, task_id, listed):
        """What the task's folder holds that its `files` entries `listed` do
        not name: lease folders and (pre-lease) files, as names inside the
        task's folder, sorted."""
        try:
            names = os.listdir(os.path.join(self.root, task_id))
        except (FileNotFoundError, NotADirectoryError):
            return []
        named = {meta.get("dir") or meta["name"] for meta in listed}
        return sorted(n for n in names if n not in named)

    def remove_unlisted(self, task_id, listed):
        """Delete what `unlisted` finds (the whole folder when nothing is
        listed). Returns the names removed."""
        stray = self.unlisted(task_id, listed)
        if not listed:
            self.remove_task(task_id)
            return stray
        for name in stray:
            self.discard(task_id, name)
        return stray

    def discard(self, task_id, name):
        """Delete one lease folder (or pre-lease file) of the task, and the
        task's folder if that leaves it empty."""
        if not _TASK_ID.match(task_id) or not (_LEASE_DIR.match(name) or _FILE_NAME.match(name)
                                                or name.endswith(".part")):
            return
        folder = os.path.join(self.root, task_id)
        _remove(os.path.join(folder, name))
        try:
            os.rmdir(folder)
        except OSError:
            pass        # not empty, or already gone

    def remove_task(self, task_id):
        """Delete the task's files and folder. Another process removing them
        at the same moment (retention, an audit's --fix) is not an error."""
        if _TASK_ID.match(task_id):
            _remove(os.path.join(self.root, task_id))


def _remove(path):
    """Delete a file or a folder tree; what vanished meanwhile is no error."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=_gone_is_fine)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _gone_is_fine(fn, path, exc_info):
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]
