"""Write blocks out as a standard Hugging Face model directory (``save_pretrained`` layout).

An export reads the weights and writes only into its destination:

* it works on copies of the blocks (peft's ``merge_and_unload`` adds s·B·A into the base weights in
  place: handed views of a master copy, it would change the model being trained);
* it is written aside, in a sibling directory of the destination, and moved into place whole
  (``replace_dir``): the destination holds exactly one complete export afterwards, never a mix of
  an earlier export's files and this one's, and a failed export leaves nothing behind;
* the destination is checked first (``check_destination``): a file, or a directory holding files
  that are not a distzo export (``EXPORT_MARK``), is refused before anything is written, so an
  export never replaces a user's own directory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import uuid
from pathlib import Path
import torch

from distzo.common.errors import BadInput

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
EXPORT_MARK = ".distzo-export"  # in every export: a directory holding it may be replaced by the next export
ASIDE = ".export-"  # sibling directories an export is written in (``.<name>.export-<hex>``) or moved out to


class ExportRefused(BadInput):
    """A destination an export will not write: a file, or a directory that is not an earlier export."""


def check_destination(out_dir: str | Path, marks: tuple[str, ...] = (EXPORT_MARK,)) -> Path:
    """The absolute destination, if an export may be written there; raises ExportRefused otherwise.

    Allowed: a path that does not exist yet (its nearest existing parent must be a writable
    directory), an empty directory, or a directory holding an earlier distzo export (one of ``marks``),
    which the export replaces whole."""
    out = Path(os.path.abspath(out_dir))
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportRefused(f"export destination {_shown(out)} is {'a link' if out.is_symlink() else 'a file'}: "
                            "expected a directory (new, empty, or an earlier export)")
    if out.is_dir():
        try:
            names = sorted(p.name for p in out.iterdir())
        except OSError as exc:
            raise ExportRefused(f"export destination {_shown(out)} cannot be read: {exc.strerror}") from None
        if names and not set(marks) & set(names) and not _carded(out):
            raise ExportRefused(f"export destination {_shown(out)} holds files that are not a distzo export (e.g. "
                                f"{names[0][:80]!r}): choose a new or empty directory (an export replaces the whole "
                                "directory)")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportRefused(f"export destination {_shown(out)}: {_shown(parent)} is not a directory this user can "
                            "write in")
    return out


def _carded(d: Path) -> bool:
    """An export written before ``EXPORT_MARK`` existed: its model card says distzo made it."""
    try:
        with open(d / "README.md", encoding="utf-8", errors="replace") as f:
            return "Fine-tuned by distzo (" in f.read(1 << 16)
    except OSError:
        return False


def check_export_root(path: str | Path, root: str | None) -> None:
    """Raise PermissionError when ``server.export_root`` (``root``) is set and ``path`` (links resolved)
    is not inside it; a check of the destination itself is ``check_destination``."""
    if not root:
        return
    target = os.path.realpath(path)
    if not target.startswith(os.path.realpath(root) + os.sep):
        raise PermissionError(f"export path {_shown(Path(target))} is outside server.export_root {root!r}")


def _shown(p: Path) -> str:
    text = str(p)
    return repr(text if len(text) <= 200 else text[:200] + "...")


def export_model_dir(model, buffers: list[torch.Tensor], out_dir: str | Path, merge: bool = False,  # noqa: ANN001
                     card: str | None = None, owned: bool = False, base_name: str | None = None) -> Path:
    """Save the weights in ``buffers`` (fp32 blocks of ``model``, a BlockModel) with the model's config
    and tokenizer files, and ``card`` (the model card, README.md) when given; returns the destination.

    ``owned``: the buffers are the caller's own copies, which the export may change (the parameter
    server's export buffers); otherwise they are copied first. A LoRA or prefix run (``model.adapter``)
    writes peft's adapter directory (``PeftModel.from_pretrained(base, out)``), or with ``merge`` (LoRA)
    the merged plain model (``distzo/model/adapters.py``). Raises ExportRefused (the destination, checked
    before anything is written), ValueError (``merge`` for a target that cannot be merged),
    RuntimeError (tensors missing), OSError; nothing of a failed export is left behind."""
    # transformers and peft, only for an export itself: check_destination and replace_dir stay light (distzo-transfer)
    from distzo.model.adapters import export_adapter
    from distzo.model.modeldir import empty_model
    from distzo.run.modelcard import write_model_card

    out = check_destination(out_dir)
    if merge and model.adapter is None:
        raise ValueError("--merge merges a LoRA adapter into the base: this run trains the full model (train.target full)")
    if not owned:
        buffers = [b.detach().to("cpu", copy=True) for b in buffers]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name[:80]}{ASIDE}{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp, 0o777)  # the umask's mode, as any directory the user makes
    try:
        state = model.state_dict_from_blocks(buffers)
        if model.adapter is not None:
            export_adapter(model.config, base_name if base_name is not None else model.source_dir, state, model.adapter,
                           model.layers_path, tmp, merge)
        else:
            hf = empty_model(model.config)
            missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
            if unexpected:
                raise RuntimeError(f"export: unexpected tensors {unexpected[:5]}")
            untied = [m for m in missing if m not in model.manifest.tied and m not in dict(hf.named_buffers())]
            if untied:
                raise RuntimeError(f"export: tensors missing from the blocks: {untied[:5]}")
            hf.tie_weights()
            hf.save_pretrained(str(tmp), safe_serialization=True)
        _copy_tokenizer(model, tmp)
        if card is not None:
            write_model_card(tmp, card)
        (tmp / EXPORT_MARK).write_text(json.dumps({"merged": bool(merge), "target": getattr(model.adapter, "kind", "full")})
                                       + "\n")
        _umask_modes(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless the export failed
    return out


def replace_dir(new: Path, dest: Path) -> None:
    """Move the complete directory ``new`` to ``dest`` (a sibling path), replacing what is there whole.

    An existing ``dest`` is swapped with ``new`` in one step where the kernel can (renameat2
    RENAME_EXCHANGE), else moved aside first; the old contents are then removed. A reader sees the
    old export or the new one, never a mix."""
    if not dest.exists():
        os.rename(new, dest)
        return
    aside = dest.parent / f".{dest.name[:80]}{ASIDE}old-{uuid.uuid4().hex[:12]}"
    if _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # now the old export
        return
    os.rename(dest, aside)
    try:
        os.rename(new, dest)
    except OSError:
        os.rename(aside, dest)  # put the old one back
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def remove_leftovers(parent: str | Path) -> list[Path]:
    """Remove what exports killed midway left in ``parent`` (their aside directories); returns them."""
    out = []
    p = Path(parent)
    if p.is_dir():
        for d in p.iterdir():
            if d.name.startswith(".") and ASIDE in d.name and d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
                out.append(d)
    return out


def _umask_modes(out: Path) -> None:
    """Give the safetensors files the mode of every other exported file (0o666 less the umask):
    the safetensors writer makes them 0600. The umask is read from a probe file, since os.umask
    would change it for the whole process (the server's other threads) to read it."""
    probe = out / f".mode-probe-{uuid.uuid4().hex}"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = probe.stat().st_mode & 0o777
    finally:
        probe.unlink()
    for f in out.glob("*.safetensors"):
        f.chmod(mode)


def _copy_tokenizer(model, out: Path) -> None:  # noqa: ANN001
    if model.source_dir is not None:
        for name in TOKENIZER_FILES:
            src = model.source_dir / name
            if src.is_file():
                shutil.copyfile(src, out / name)

