"""Where a run may write: the output directory it claims, the scratch directories it creates, the disk it needs.

The rule: a run never writes into or deletes anything it did not create.

- `--out` must be new, empty, or a directory of ours: one holding our marker file (MARKER, written first
  when a run claims the directory) or, from earlier versions, an evolve checkpoint. It is never an input
  (a model, the base model, a dev file or folder) nor inside one, nor does it contain one.
- A run holds an exclusive lock (flock on LOCK inside `--out`) for its whole life: a second run into the
  same directory stops at once with a message naming the holder's pid. The kernel drops the lock when the
  process ends, however it ends, so a killed run never leaves a stale lock.
- Scratch space (the disk tier's individuals) is a fresh directory made by mkdtemp under the scratch root,
  never an existing one, with its own lock: leftovers of a killed run are recognised (our name prefix, our
  marker inside, nobody holding their lock) and removed by the next run that uses the same root.
- Files a run writes into `--out` are listed in the marker, each with its size and modification time (ns) as
  written; a later merge into the same directory removes exactly those before writing its own, so no stale
  shard of an earlier output survives. A recorded file that changed since (a user saved a fine-tune of the
  merge there) is a user's: a run into that directory is refused before any work, naming the file, and the
  file is never removed nor overwritten. A name recorded without its size and time (markers written before
  they were) is ours as before.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile

from evolver_kernels.errors import UserError

MARKER = ".evolver-kernels.json"
LOCK = ".evolver-kernels.lock"
SCRATCH_PREFIX = "evolver-scratch-"
SCRATCH_MARKER = ".evolver-scratch"
LEGACY_STATE = os.path.join("checkpoint", "state.json")  # an evolve checkpoint written before the marker existed


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(child: str, parent: str) -> bool:
    return os.path.commonpath([child, parent]) == parent


def _existing_ancestor(path: str) -> str:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe


def check_not_an_input(option: str, path: str, inputs: list[tuple[str, str]]) -> None:
    """`path` (a directory a run writes into) is not an input, not inside one, and does not contain one."""
    where = _real(path)
    for input_option, input_path in inputs:
        if not input_path:
            continue
        source = _real(input_path)
        if where == source:
            raise UserError(
                f"{option} {path} is the {input_option} input {input_path}: choose a new directory "
                "(a run never writes into its inputs)"
            )
        if _inside(where, source):
            raise UserError(
                f"{option} {path} is inside the {input_option} input {input_path}: choose a directory "
                "outside it (a run never writes into its inputs)"
            )
        if _inside(source, where):
            raise UserError(f"{option} {path} contains the {input_option} input {input_path}: choose a new directory")


def _check_creatable(option: str, path: str) -> None:
    """`path` is a writable directory, or can be created."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{option} {path} exists and is not a directory")
    probe = path if os.path.isdir(path) else _existing_ancestor(path)
    if not os.path.isdir(probe):
        raise UserError(f"{option} {path}: cannot create it, {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK) or os.statvfs(probe).f_flag & os.ST_RDONLY:
        if probe == os.path.abspath(path):
            raise UserError(f"{option} {path}: not writable")
        raise UserError(f"{option} {path}: cannot create it, {probe} is not writable")


def _makedirs(option: str, path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"{option} {path}: cannot create it ({err.strerror})") from None


def read_marker(out: str) -> dict | None:
    """Our marker in `out` (None when absent or unreadable)."""
    try:
        with open(os.path.join(out, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("tool") else None


def owner(out: str) -> str | None:
    """Which of our tools made `out` ("evolve", "merge"), or None if it is not ours."""
    marker = read_marker(out)
    if marker is not None:
        return str(marker["tool"])
    if os.path.isfile(os.path.join(out, LEGACY_STATE)):
        return "evolve"
    return None


WROTE = {"merge": "the merge", "evolve": "the evolve run"}  # who wrote a recorded file, for the refusal


def _stamp(path: str) -> dict | None:
    """A file's size and modification time (ns), not following links; None where there is no file."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "file": os.path.isfile(path) and not os.path.islink(path)}


def changed_outputs(out: str, marker: dict | None = None) -> list[str]:
    """The files a run of ours recorded in `out` that changed since it wrote them (another size or time, or no
    longer a plain file); a recorded name that is gone, or has no size and time (an older marker), is not."""
    marker = read_marker(out) if marker is None else marker
    if marker is None:
        return []
    stamps = marker.get("written")
    stamps = stamps if isinstance(stamps, dict) else {}
    changed = []
    for name in marker.get("files", []):
        was = stamps.get(name)
        now = _stamp(os.path.join(out, name))
        if not isinstance(was, dict) or now is None:
            continue
        if not now["file"] or (now["size"], now["mtime_ns"]) != (was.get("size"), was.get("mtime_ns")):
            changed.append(name)
    return changed


def _refuse_changed(option: str, out: str, tool: str, changed: list[str]) -> None:
    if changed:
        more = f" (and {len(changed) - 1} more recorded file(s))" if len(changed) > 1 else ""
        raise UserError(
            f"{option} {out}: {changed[0]}{more} changed since {WROTE.get(tool, 'a run of ours')} wrote it: move it "
            "away or choose another --out (a run never replaces a file it did not write)"
        )


def check_out(out: str, tool: str, inputs: list[tuple[str, str]], option: str = "--out") -> None:
    """Refuses an output directory this run may not write into; creates nothing (a dry run calls it too)."""
    check_not_an_input(option, out, inputs)
    _check_creatable(option, out)
    # a lock file alone (with a marker half-written) is a run of ours claiming the directory right now: the
    # claim's lock then says so ("in use by another run"), or takes over a lock left by a killed run
    if os.path.isdir(out) and set(os.listdir(out)) - {LOCK, MARKER + ".tmp"}:
        made_by = owner(out)
        if made_by is None:
            raise UserError(
                f"{option} {out} is not empty and was not written by evolver-kernels: choose a new or "
                "empty directory (nothing in it is ever overwritten)"
            )
        if made_by != tool:
            raise UserError(
                f"{option} {out} holds the output of `{made_by}`, not of `{tool}`: choose another directory"
            )
        _refuse_changed(option, out, tool, changed_outputs(out))


class Locked:
    """An exclusive flock on a file, held until release() or the end of the process."""

    def __init__(self, path: str, what: str):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = ""
            try:
                with open(path) as f:
                    holder = f.read().strip()
            except OSError:
                pass
            raise UserError(
                f"{what} is in use by another run{f' ({holder})' if holder else ''}: wait for it to "
                "end or choose another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


class OutputDir:
    """A claimed output directory: ours (marked), locked for the life of the run."""

    def __init__(self, path: str, tool: str):
        self.path, self.tool = path, tool
        self.created = not os.path.exists(path)
        _makedirs("--out", path)
        self.lock = Locked(os.path.join(path, LOCK), f"--out {path}")
        marker = read_marker(path)
        if marker is None:
            marker = {"tool": tool, "created": datetime.datetime.now().isoformat(timespec="seconds"), "files": []}
            self._write_marker(marker)
        self.marker = marker

    @staticmethod
    def claim(path: str, tool: str, inputs: list[tuple[str, str]]) -> OutputDir:
        """Checks `path` (check_out) again under the lock, and claims it."""
        check_out(path, tool, inputs)
        claimed = OutputDir(path, tool)
        try:
            check_out(path, tool, inputs)  # another process may have written there since the first check
        except BaseException:
            claimed.release()
            raise
        return claimed

    def _write_marker(self, marker: dict) -> None:
        tmp = os.path.join(self.path, MARKER + ".tmp")
        with open(tmp, "w") as f:
            json.dump(marker, f, indent=1)
        os.replace(tmp, os.path.join(self.path, MARKER))

    def record(self, paths: list[str]) -> None:
        """Adds files this run wrote (paths inside the directory) to the marker's list of our outputs, each with
        its size and modification time as it is now (call it once they are written)."""
        names = set(self.marker.get("files", []))
        stamps = dict(self.marker.get("written") or {})
        for p in paths:
            name = os.path.relpath(p, self.path)
            names.add(name)
            stamp = _stamp(p)
            if stamp is not None and stamp.pop("file"):
                stamps[name] = stamp
        self.marker = dict(
            self.marker, files=sorted(names), written={n: stamps[n] for n in sorted(names) if n in stamps}
        )
        self._write_marker(self.marker)

    def clear_recorded(self) -> None:
        """Removes the output files an earlier run of ours recorded here (and nothing else); refuses, removing
        nothing, where one changed since it was written (claim refused that already: this is a change made
        while the run worked)."""
        _refuse_changed("--out", self.path, self.tool, changed_outputs(self.path, self.marker))
        for name in self.marker.get("files", []):
            path = os.path.join(self.path, name)
            if _inside(_real(path), _real(self.path)) and os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)
        self.marker = dict(self.marker, files=[], written={})
        self._write_marker(self.marker)

    def release(self, remove_if_unused: bool = False) -> None:
        """Drops the lock; with remove_if_unused, a directory this run created and left holding only our own
        bookkeeping files is removed again."""
        self.lock.release()
        if remove_if_unused and self.created and set(os.listdir(self.path)) <= {MARKER, LOCK}:
            for name in (MARKER, LOCK):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.path, name))
            with contextlib.suppress(OSError):
                os.rmdir(self.path)


def check_scratch_root(option: str, root: str, inputs: list[tuple[str, str]]) -> None:
    """A directory under which scratch directories may be created (not an input, writable or creatable)."""
    check_not_an_input(option, root, inputs)
    _check_creatable(option, root)


class Scratch:
    """A fresh scratch directory under `root` (made by mkdtemp: it cannot have existed), locked while in use."""

    def __init__(self, root: str, option: str = "--population-dir"):
        _makedirs(option, root)
        remove_stale_scratch(root)
        try:
            self.path = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=root)
        except OSError as err:
            raise UserError(f"{option} {root}: cannot create a scratch directory there ({err.strerror})") from None
        # locked under another name, then renamed: a sweep by another run (remove_stale_scratch) only ever sees
        # the marker locked, never in the moment between its creation and its lock
        pending = os.path.join(self.path, SCRATCH_MARKER + ".new")
        self.lock = Locked(pending, f"scratch directory {self.path}")
        os.rename(pending, os.path.join(self.path, SCRATCH_MARKER))

    def remove(self) -> None:
        """Deletes the directory and everything in it (all of it made by this run)."""
        if self.lock.fd is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self.lock.release()


def remove_stale_scratch(root: str) -> list[str]:
    """Removes scratch directories of ended runs under `root`: our prefix, our marker inside, nobody holding
    its lock. Returns what was removed."""
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(root, name)
        marker = os.path.join(path, SCRATCH_MARKER)
        if not name.startswith(SCRATCH_PREFIX) or os.path.islink(path) or not os.path.isdir(path):
            continue
        if os.path.islink(marker) or not os.path.isfile(marker):
            continue
        try:
            stale = Locked(marker, path)
        except (UserError, OSError):
            continue  # in use by a live run
        shutil.rmtree(path, ignore_errors=True)
        stale.release()
        removed.append(path)
    return removed


def disk_problem(needs: list[tuple[str, str, int]]) -> str | None:
    """needs: (what, directory, bytes) written under each directory. Needs on one filesystem add up; returns
    the first filesystem whose free space is short, as a sentence with the numbers, or None."""
    by_fs: dict[int, tuple[list[str], str, int]] = {}
    for what, path, nbytes in needs:
        if nbytes <= 0:
            continue
        probe = _existing_ancestor(path)
        dev = os.stat(probe).st_dev
        whats, _, total = by_fs.get(dev, ([], probe, 0))
        by_fs[dev] = (whats + [f"{what} under {path}"], probe, total + nbytes)
    for whats, probe, total in by_fs.values():
        free = shutil.disk_usage(probe).free
        if total > free:
            return f"the run writes {format_bytes(total)} ({', '.join(whats)}) on a filesystem with {format_bytes(free)} free"
    return None


def same_filesystem(a: str, b: str) -> bool:
    """Whether two directories (or where they would be created) lie on one filesystem."""
    return os.stat(_existing_ancestor(a)).st_dev == os.stat(_existing_ancestor(b)).st_dev


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
