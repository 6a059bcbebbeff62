"""FileStore: tasks' result files on disk, and the names and content types
they may have. Kept apart from the database stores: files live beside
whichever backend holds the tasks."""

import hashlib
import os
import re
import secrets

from errors import InvalidInput, NotFound


_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
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


class FileStore:
    """Result files under data/files/<task id>/<name>, written atomically
    (temporary file, fsync, rename) with their size and sha256."""

    def __init__(self, root, *, create=True):
        self.root = os.path.abspath(root)
        if create:
            os.makedirs(self.root, exist_ok=True)

    def path(self, task_id, name):
        if not re.match(r"^t_[0-9A-Z]{26}$", task_id) or not _FILE_NAME.match(name):
            raise NotFound("file not found", code="file_not_found")
        return os.path.join(self.root, task_id, name)

    def save(self, task_id, name, chunks, *, max_bytes, content_type=None):
        """Write `chunks` (an iterable of bytes) as the task's file `name`.
        InvalidInput when it passes `max_bytes`; nothing is left behind then."""
        final = self.path(task_id, name)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.{secrets.token_hex(4)}.part"
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
        return {"name": name, "size": size, "sha256": digest.hexdigest(),
                "content_type": content_type or CONTENT_TYPES.get(ext, "application/octet-stream")}

    def task_ids(self):
        """The task ids that have a folder here, sorted; other entries are
        not holdfast's and are left alone."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []      # opened with create=False before any file was saved
        return sorted(n for n in names
                      if re.match(r"^t_[0-9A-Z]{26}$", n) and os.path.isdir(os.path.join(self.root, n)))

    def partial_files(self):
        """Temporary files left by downloads a crash interrupted."""
        found = []
        for folder, _, names in os.walk(self.root):
            found += [os.path.join(folder, n) for n in names if n.endswith(".part")]
        return sorted(found)

    def remove_task(self, task_id):
        """Delete the task's files and folder. Another process removing them
        at the same moment (retention, an audit's --fix) is not an error."""
        folder = os.path.join(self.root, task_id)
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            pass
