"""Weights in and out without ``kubectl cp``: a model directory from where users keep it, an export
to where they want it, through fsspec (a path on a mounted volume, ``file://``, ``s3://`` with
s3fs, ``gs://`` with gcsfs, ``hf://`` with huggingface_hub on clusters with egress, ...).

Every transfer is verified by SHA-256: a source directory carries ``SHA256SUMS`` (the
``sha256sum`` format, paths relative to the directory; ``distzo-transfer sums DIR`` writes it),
``pull`` copies exactly the files listed there and checks each while it streams, and ``push``
writes the directory's files and then its ``SHA256SUMS`` last (a reader that sees the sums sees
a complete upload). Files already present with the right digest are kept (a restarted init step
does not fetch them again); a file is renamed into place only once verified.

    distzo-transfer pull s3://bucket/models/opt-13b /var/lib/distzo/model
    distzo-transfer push /var/lib/distzo/exports/run1 s3://bucket/exports/run1
    distzo-transfer sums ./opt-13b        # once, where the model is prepared

Exit codes: 0 done; 1 the transfer failed (I/O, unreachable store); 2 bad input (no or bad
SHA256SUMS, a digest mismatch, an unsafe path, an unknown protocol).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from pathlib import Path, PurePosixPath

from distzo.common.errors import BadInput

SUMS = "SHA256SUMS"
CHUNK = 8 << 20
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class TransferError(BadInput):
    """A source without valid checksums, a digest that does not match, or an unsafe file name."""


def _fs(url: str):  # noqa: ANN202 - an fsspec filesystem and the path in it
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # e.g. s3:// without s3fs installed
        raise TransferError(f"{url!r}: {exc}") from None


def parse_sums(text: str, where: str) -> dict[str, str]:
    """``{relative path: hex digest}`` from sha256sum output; refuses absolute or ``..`` paths."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line.strip())
        if not m:
            raise TransferError(f"{where}:{n}: not a sha256sum line (expected '<64 hex> <path>')")
        digest, name = m.group(1), m.group(2)
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or name == SUMS:
            raise TransferError(f"{where}:{n}: unsafe path {name!r} (relative paths inside the directory only)")
        out[str(p)] = digest
    if not out:
        raise TransferError(f"{where} lists no files")
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def directory_sums(directory: str | Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``directory`` (relative POSIX paths), SHA256SUMS excluded."""
    root = Path(directory)
    if not root.is_dir():
        raise TransferError(f"{str(root)!r} is not a directory")
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != SUMS and ".tmp-" not in p.name}


def format_sums(sums: dict[str, str]) -> str:
    return "".join(f"{d}  {name}\n" for name, d in sorted(sums.items()))


def write_sums(directory: str | Path) -> Path:
    """Write ``SHA256SUMS`` for the files of a local directory (what ``pull`` will verify)."""
    path = Path(directory) / SUMS
    path.write_text(format_sums(directory_sums(directory)))
    return path


def pull(src: str, dest: str | Path, say=None) -> dict[str, str]:  # noqa: ANN001
    """Copy the files ``src/SHA256SUMS`` lists into ``dest``, verifying each; returns the sums.

    Raises TransferError (no sums, a mismatch, an unsafe path), OSError for I/O."""
    fs, root = _fs(src)
    sums_path = f"{root.rstrip('/')}/{SUMS}"
    if not fs.exists(sums_path):
        raise TransferError(f"{src} has no {SUMS}: write it where the model is prepared (`distzo-transfer sums DIR`) "
                            "so that every file is verified")
    sums = parse_sums(fs.cat_file(sums_path).decode("utf-8", "replace"), f"{src}/{SUMS}")
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    for name, digest in sums.items():
        target = out / name
        if target.is_file() and sha256_file(target) == digest:
            continue  # already here and verified (a restarted init step)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        h = hashlib.sha256()
        try:
            with fs.open(f"{root.rstrip('/')}/{name}", "rb") as r, open(tmp, "wb") as w:
                while chunk := r.read(CHUNK):
                    h.update(chunk)
                    w.write(chunk)
            if h.hexdigest() != digest:
                raise TransferError(f"{src}/{name}: sha256 {h.hexdigest()} does not match {SUMS}'s {digest}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        if say:
            say(f"{name} verified")
    (out / SUMS).write_text(format_sums(sums))
    return sums


def push(src: str | Path, dest: str, say=None) -> dict[str, str]:  # noqa: ANN001
    """Upload a local directory's files to ``dest``, then its SHA256SUMS (last); returns the sums.

    ``dest`` ends with exactly this directory's files: on a local path (or ``file://``) the copy is
    written aside and moved into place whole (``distzo.model.export.replace_dir``; refused, before anything
    is written, for a destination that is neither new, empty, an export nor an earlier push); on an
    object store the old SHA256SUMS goes first (a reader sees no complete upload meanwhile), the
    files it listed that this upload lacks are removed, and the new SHA256SUMS is written last.
    Raises TransferError (bad URL, missing library), distzo.model.export.ExportRefused, OSError."""
    sums = directory_sums(src)
    local = _local_path(dest)
    if local is not None:
        _push_local(Path(src), local, sums)
        return sums
    fs, root = _fs(dest)
    base = root.rstrip("/")
    old: dict[str, str] = {}
    if fs.exists(f"{base}/{SUMS}"):
        try:
            old = parse_sums(fs.cat_file(f"{base}/{SUMS}").decode("utf-8", "replace"), f"{dest}/{SUMS}")
        except TransferError:
            old = {}  # not ours to clean up: only what a valid SHA256SUMS lists is removed
        fs.rm_file(f"{base}/{SUMS}")
    fs.makedirs(base, exist_ok=True)
    for name in sums:
        parent = PurePosixPath(f"{base}/{name}").parent
        fs.makedirs(str(parent), exist_ok=True)
        fs.put_file(str(Path(src) / name), f"{base}/{name}")
        if say:
            say(f"{name} written")
    for name in sorted(set(old) - set(sums)):  # an earlier upload's files this one does not have
        if fs.exists(f"{base}/{name}"):
            fs.rm_file(f"{base}/{name}")
    with fs.open(f"{base}/{SUMS}", "wb") as f:
        f.write(format_sums(sums).encode())
    return sums


def _local_path(dest: str) -> Path | None:
    """The local path of a plain path or a ``file://`` URL; None for anything else."""
    if not is_url(dest):
        return Path(dest)
    if dest.split("://", 1)[0].lower() == "file":
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return Path(url2pathname(urlparse(dest).path))
    return None


def _push_local(src: Path, dest: Path, sums: dict[str, str]) -> None:
    import shutil
    import uuid

    from distzo.model.export import ASIDE, EXPORT_MARK, check_destination, replace_dir  # torch: a local push only

    dest = check_destination(dest, marks=(EXPORT_MARK, SUMS))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name[:80]}{ASIDE}{uuid.uuid4().hex[:12]}"
    try:
        os.mkdir(tmp, 0o777)
        for name in sums:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, tmp / name)
        (tmp / SUMS).write_text(format_sums(sums))
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


EXPORT_SCHEMES = {"file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}  # where an export may be pushed


def check_export_url(url: str, export_root: str | None = None) -> str | None:
    """Why an export to ``url`` would be refused, or None: only object stores and ``file://``, each with
    its fsspec library installed (s3:// needs s3fs, gs:// gcsfs, ...), and a ``file://`` URL, like a path,
    only under ``server.export_root`` when one is set (a URL is no way around it)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme not in EXPORT_SCHEMES:
        return f"export URL scheme {scheme!r} is not one of {', '.join(sorted(EXPORT_SCHEMES))}"
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"export URL scheme {scheme!r} needs a library that is not installed here ({first[:200]})"
    if scheme == "file" and export_root:
        target = os.path.realpath(_local_path(url) or "")
        if not target.startswith(os.path.realpath(export_root) + os.sep):
            return f"export URL {url[:200]!r} is outside server.export_root {export_root!r}"
    return None


def is_url(path: str) -> bool:
    """An fsspec URL (``s3://...``, ``file://...``) rather than a local path."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="distzo-transfer", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pull", help="copy a model directory here, verifying every file against its SHA256SUMS")
    p.add_argument("src", help="a directory URL or path holding SHA256SUMS")
    p.add_argument("dest", help="a local directory")
    p = sub.add_parser("push", help="upload a local directory (an export), then its SHA256SUMS")
    p.add_argument("src", help="a local directory")
    p.add_argument("dest", help="a directory URL or path")
    p = sub.add_parser("sums", help="write SHA256SUMS for a local directory")
    p.add_argument("dir")
    args = ap.parse_args(argv)
    say = lambda s: print(f"distzo-transfer: {s}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.command == "pull":
            n = len(pull(args.src, args.dest, say))
            say(f"{n} files in {args.dest}, verified")
        elif args.command == "push":
            n = len(push(args.src, args.dest, say))
            say(f"{n} files and {SUMS} in {args.dest}")
        else:
            say(f"wrote {write_sums(args.dir)}")
    except BadInput as exc:
        print(f"distzo-transfer {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"distzo-transfer {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
