"""How a save never loses data: stage every file, commit with one journal, then move the files into place.

A checkpoint is several files (config + weights + tokenizer) that must change together, and a save can die at any
instant (``kill -9``, a full disk, a power cut). Replacing the whole folder would delete what is not ours (a
README, a generation_config.json, a user's notes), and renaming it away and back leaves a moment with no
checkpoint at all. So ``save_into`` does it the way databases do:

1. **stage**: the caller writes every new file into a fresh sibling folder ``.NAME.staging-XXXX/``; the old
   checkpoint is untouched. Dying here leaves only the staging folder, which the next save deletes.
2. **commit**: one small journal, ``NAME/.minllama-publish.json``, lists the renames (staged file -> final name)
   and the files of the previous save that the new one no longer has. It is written under a temporary name and
   renamed into place: the single atomic step at which the new checkpoint becomes the one that counts.
3. **apply**: each staged file is renamed over its final name, stale files are deleted, the journal is removed.

Dying during 3 leaves a mix of old and new files *plus the journal*; every loader first calls ``recover``, which
finishes the journal (each step can be repeated safely), so a reader sees the old checkpoint or the new one,
never a mix. Files the save does not own are never touched, and the folder keeps its permissions.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .formats import CheckpointError

JOURNAL = ".minllama-publish.json"
_STAGING = ".staging-"  # a staging folder is named .NAME.staging-XXXX, next to NAME


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write one file through ``write(tmp_path)`` into a temporary sibling, then rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        write(str(tmp))
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync(path: Path) -> None:
    """Make a file's bytes durable before the step that depends on them (the journal, a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[str]:
    """Every file under ``folder``, as relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def inside(folder: Path, name, listed_in: Path) -> Path:
    """``folder / name``, refused unless the *name* stays inside ``folder`` (no absolute path, no ``..``): an index
    must not make a loader read /etc/passwd. Symbolic links are followed (the Hugging Face cache is made of them)."""
    norm = os.path.normpath(name) if isinstance(name, str) and name else ""
    if not norm or os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
        raise CheckpointError(f"{listed_in} names the file {name!r}, which lies outside {folder}: refused "
                              "(a checkpoint may only read its own files)")
    return folder / norm


def _own_file(target: Path, rel, journal: Path) -> Path:
    """A file the journal may replace or delete: inside ``target`` by name *and* after following links."""
    path = inside(target, rel, journal)
    if not path.parent.resolve().is_relative_to(target.resolve()):
        raise CheckpointError(f"{journal} names {rel!r}, which a link leads out of {target}: refused")
    return path


def recover(directory: str | os.PathLike) -> None:
    """Finish a save that was killed after its commit (a journal is present). Safe to call any number of times,
    and cheap when there is nothing to do (one ``stat``). Every loader calls it first. Several processes may run it
    at once on one folder (every rank of a job loading the same checkpoint): a step that another one has done
    already is skipped."""
    target = Path(directory)
    journal = target / JOURNAL
    if not journal.is_file():
        return
    try:
        try:
            plan = json.loads(journal.read_text())
        except FileNotFoundError:
            return  # another process finished it in the meantime
        if not re.fullmatch(rf"\.{re.escape(target.name)}{_STAGING}[0-9a-f]{{8}}", plan["staging"]):
            raise ValueError(f"the journal names {plan['staging']!r}, not a staging folder of {target.name}")
        staging = target.parent / plan["staging"]
        for rel in plan["renames"]:
            src, dst = staging / rel, _own_file(target, rel, journal)
            if src.exists():  # not yet moved (a repeated recover finds it gone: already done)
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(src, dst)
                except FileNotFoundError:
                    if src.exists():
                        raise
                    # another process moved it between our check and our rename
        for rel in plan["deletes"]:
            _own_file(target, rel, journal).unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        journal.unlink(missing_ok=True)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{target} holds an interrupted save ({JOURNAL}) that could not be finished "
                              f"({type(e).__name__}: {e}): give write access to the folder and load it again") \
            from None


def publish(staging: Path, target: Path, owns: Callable[[str], bool] = lambda rel: True) -> None:
    """Move every file of ``staging`` into ``target``; delete the files of ``target`` that ``owns`` (the previous
    save's) and that the new save does not have. A new ``target`` is one atomic rename of the whole folder."""
    new = _files(staging)
    umask = os.umask(0)
    os.umask(umask)
    for rel in new:  # a replaced file keeps its mode; a new one gets the usual rw-r--r-- (writers may make 0600)
        dst = target / rel
        os.chmod(staging / rel, dst.stat().st_mode & 0o777 if dst.is_file() else 0o666 & ~umask)
        _fsync(staging / rel)
    if not target.exists():
        os.rename(staging, target)
        return
    old = [rel for rel in _files(target) if rel != JOURNAL and owns(rel) and rel not in new]
    plan = {"staging": staging.name, "renames": new, "deletes": old}
    atomic_write(target / JOURNAL, lambda tmp: Path(tmp).write_text(json.dumps(plan, indent=1) + "\n"))  # commit
    recover(target)  # apply: the same code that finishes a killed save


def staging_folder(target: Path) -> Path:
    """The path of a fresh staging folder for ``target`` (not created): a name ``recover`` accepts in a journal,
    and one that the next save deletes if this one dies before its commit."""
    return target.with_name(f".{target.name}{_STAGING}{uuid.uuid4().hex[:8]}")


def recover_legacy(target: Path) -> bool:
    """Earlier versions renamed the old folder to ``.NAME.old-XXXX`` and the new one into place: a kill between
    the two renames left no ``NAME`` and the only copy in the hidden folder. Put it back; True if it did."""
    if target.exists():
        return False
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
        if old.is_dir():
            os.rename(old, target)
            return True
    return False


def _remove_stale(target: Path) -> None:
    """Staging folders of saves that died before their commit, and earlier versions' temp folders (an ``.old-``
    one only once ``NAME`` exists again: until then it may be the only copy)."""
    for p in target.parent.glob(f".{target.name}.*"):
        tags = (_STAGING, ".tmp-", ".old-") if target.exists() else (_STAGING, ".tmp-")
        if p.is_dir() and any(p.name.startswith(f".{target.name}{tag}") for tag in tags):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def save_into(directory: str | os.PathLike, owns: Callable[[str], bool], marker: str,
              foreign: Callable[[str], bool] = lambda rel: False, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; what the caller writes there replaces the previous save in ``directory``.

    ``owns(relative_path)`` says which files a save of this kind writes (the previous save's stale ones are
    deleted; every other file is left alone). ``marker`` is the file that says the folder holds a save of this
    kind. ``foreign`` recognizes the files of another format: a folder holding some, or a non-empty folder
    without ``marker``, is refused unless ``overwrite=True`` (which then also deletes the foreign files, so that
    a loader cannot pick the stale format). On an exception the staging folder is deleted and nothing changes.
    """
    target = Path(directory).absolute()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory")
    recover_legacy(target)
    if target.is_dir():
        recover(target)
        existing = [rel for rel in _files(target) if rel != JOURNAL]
        theirs = [rel for rel in existing if foreign(rel)]
        if not overwrite and (theirs or (existing and not (target / marker).is_file())):
            what = f"holds {', '.join(theirs[:3])} of another format" if theirs else f"is not empty and has no {marker}"
            raise CheckpointError(f"refusing to write into {target}: it {what}; choose a new or empty directory, "
                                  "or pass overwrite=True (other files are kept)")
    _remove_stale(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target)
    staging.mkdir()  # not mkdtemp: a new checkpoint folder gets the usual permissions, not 0700
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing was committed: the previous save is untouched
        raise
    # From here on a failure must keep the staging folder: once the journal is written, it holds the new files.
    publish(staging, target, owns=lambda rel: owns(rel) or (overwrite and foreign(rel)))
