"""Writing a bundle folder without ever losing one: what an export may replace (only a bundle of the
same runtime, ``check_replaceable``) and the staged write that validates a new bundle before it takes
the old one's place (``write_validated``; the swap itself is ``crisp_edge.files.transaction.swap_folder``).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from crisp_edge.export.bundle import MANIFEST, MAX_MANIFEST_BYTES, RUNTIMES, inside
from crisp_edge.export.errors import BundleError

from crisp_edge.files.io import atomic_write_json, read_json
from crisp_edge.files.transaction import clean_folder_leftovers, make_staging_folder, remove_marked, swap_folder


def is_bundle_of(folder: Path, fmt: str | None = None) -> bool:
    """Whether ``folder`` holds a crisp-edge bundle manifest (of format ``fmt``, when given): what an
    export may replace. Only the manifest's envelope is read; the files need not verify."""
    try:
        meta = read_json(inside(folder, MANIFEST, str(folder)), BundleError, "bundle manifest", MAX_MANIFEST_BYTES)
    except BundleError:
        return False
    return meta.get("format") in RUNTIMES and (fmt is None or meta.get("format") == fmt)


def check_replaceable(out_dir: Path, fmt: str, overwrite: bool) -> None:
    """Refuse to write a bundle over anything but a bundle of the same format (and that only with
    ``overwrite``): an export never deletes a folder it did not write."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    runtime = RUNTIMES[fmt].name
    if not overwrite:
        raise BundleError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace the {runtime} bundle in "
                          "it, or choose another --out.")
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise BundleError(f"{out_dir} is not a folder (a file or a link); --overwrite replaces only a {runtime} bundle "
                          "folder. Move it away or choose another --out.")
    if not any(out_dir.iterdir()):
        return
    if not is_bundle_of(out_dir, fmt):
        other = " (a bundle of another runtime)" if is_bundle_of(out_dir) else ""
        raise BundleError(f"{out_dir} is not a crisp-edge {runtime} bundle{other}: it has no {MANIFEST} with format "
                          f"{fmt!r}. --overwrite replaces only a bundle of the same kind and never deletes other "
                          "files; move them away or choose another --out.")


def write_validated(out_dir: Path, write: Any, make_bundle: Any, *, threads: int = 1,
                    validate: Callable[..., Any] | None = None) -> Any:
    """Write a bundle with ``write(folder) -> manifest`` into a temporary sibling of ``out_dir``, check
    its parity there with ``validate(bundle, threads=...)`` (the runtime against the stored PyTorch
    reference; ``ParityError`` on a mismatch; skipped when ``None``), record the result in the manifest,
    and only then move it into place (replacing an old bundle: the caller checked with
    ``check_replaceable`` that it is one) with ``crisp_edge.files.transaction.swap_folder``.
    Any failure removes the temporary folder: ``out_dir`` holds the old bundle or the new, never half,
    at every instant. Leftovers of an earlier, killed export to ``out_dir`` are cleaned up first."""
    clean_folder_leftovers(out_dir, is_bundle_of)
    tmp = make_staging_folder(out_dir)
    try:
        manifest = write(tmp)
        if validate is not None:
            report = validate(make_bundle(tmp, manifest), threads=threads)
            manifest["parity"] = {"passed": report.passed, "max_abs": report.max_abs,
                                  "checked_cases": len(report.comparisons)}
            atomic_write_json(tmp / MANIFEST, manifest)
        swap_folder(tmp, out_dir)
    except BaseException:
        try:
            remove_marked(tmp)
        except OSError:  # e.g. a full disk: the marked leftover is cleaned up by the next export
            pass
        raise
    return make_bundle(out_dir, manifest)


def params_record(model: Any, stored: int) -> dict[str, int]:
    """The manifest's ``params`` that every runtime's bundle records: the stored parameter count, its
    float32 bytes and the number of CRISP groups (a runtime adds its own sizes)."""
    from crisp_edge.method.convert import crisp_bases

    return {"stored": stored, "stored_bytes_fp32": 4 * stored, "crisp_groups": len(crisp_bases(model))}


def add_sections(manifest: dict, **sections: Any) -> dict:
    """Add the manifest's optional sections (``quantize``, ``source``, ``swappable``) that are not None."""
    manifest.update({k: v for k, v in sections.items() if v is not None})
    return manifest
