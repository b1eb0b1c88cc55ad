"""Files written whole or not at all: checkpoints, results.json, the comparison's tables and plot.

``replacing(path)`` yields a file object on a temporary file in ``path``'s directory; when the block ends
normally the file is flushed, fsynced and renamed onto ``path`` (os.replace, atomic on POSIX), and on any error
it is removed. A kill, a full disk or a file-size limit at any moment therefore leaves the previous file at
``path`` intact, never a file cut short. The temporary file is named ``.tmp-<random><path's suffix>`` (a kill
leaves one behind: the checkpoint manager removes its ``.tmp-*.pth``), and its mode follows the umask (0666
less it) as every other file of a run does, not mkstemp's owner-only 0600.
"""
import contextlib
import json
import os
import secrets


@contextlib.contextmanager
def replacing(path, mode="w", **open_kwargs):
    """``with replacing(path) as f: f.write(...)``: ``path`` holds the old content or all of the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    while True:
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(6)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(obj, path, **dump_kwargs):
    """json.dump(obj) into ``path`` through ``replacing``."""
    with replacing(path) as f:
        json.dump(obj, f, **dump_kwargs)
