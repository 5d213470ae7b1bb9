"""The gradient store: every training row's projected loss gradient, in shards on disk.

Layout of INDEX_DIR/gradients/:
  manifest.json        model identity (content digests of the model and adapter files,
                       resolved parameter names, dtype; paths as information), loss
                       scope, projection (seed, K), template, data fingerprint, shard list
                       with row ranges, size and sha256, and the same for norms.npy
  shard-00000.npy ...  (rows, K) float16 or float32, memory-mapped at query time
  norms.npy            (n,) float32 norms of the stored vectors (for cosine)
  curvature.npz        only with a curvature (`features.curvature`): the EK-FAC every
                       stored vector and every query was whitened with before projecting

A manifest is data, not a set of instructions: the only files read are the store's own
(`shard-NNNNN.npy`, `norms.npy`, inside the store directory), each checked for size and
.npy header (shape, dtype) on every load and for sha256 unless verification is skipped.

The store stores: `GradientStoreWriter` is handed finished vectors (computed by
`features.gradients`) and imports no model. Building happens in
INDEX_DIR/gradients.partial/: each shard is written to a temporary name and renamed, so a
shard that exists is complete. `plan.json` records what is being built; a rerun with the
same plan keeps the finished shards and continues. The directory is renamed to
`gradients/` only when complete.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datablame import __version__
from datablame.data.rows import Rows
from datablame.data.template import PromptTemplate
from datablame.errors import UserError
from datablame.features.curvature import (
    CURVATURE_FILE,
    holds_both,
    load_curvature,
    save_curvature,
    stored_width,
)
from datablame.features.projection import PROJECTIONS, projector_from_json
from datablame.methods.gradient_alignment import align_dots
from datablame.store.atomic import write_json_atomic
from datablame.store.content_digest import sha256_file

FORMAT = "datablame.gradient-store"
FORMAT_VERSION = 2  # 2: content identity, checksummed norms, shapes checked
STORE_DTYPES = {"fp16": np.float16, "fp32": np.float32}
SHARD_NAME = re.compile(r"shard-\d{5}\.npy")
NORMS_NAME = "norms.npy"
CURVATURE_NAME = re.compile(re.escape(CURVATURE_FILE))
COSINE_SLACK = 1e-3  # |cos| above 1 + this cannot come from intact vectors and norms
SCAN_BLOCK_ROWS = 16_384  # rows converted and scored at once: 64 MB of float32 at K = 1024
# |fp16 product - exact| <= FP16_BOUND x |row| x |unit query| + FP16_FLOOR: rounding the
# query and the output to fp16 costs at most about 2 x 2^-11; 4 x 2^-11 leaves 2x room,
# and a first-block check refuses a kernel that does worse than 2^-11
FP16_BOUND = 4 * 2.0 ** -11
FP16_FLOOR = 2.0 ** -23  # below fp16's normal range, spacing is absolute (2^-24)
FP16_CHECK_ROWS = 2048  # rows of a scan's first block also scored exactly, to check it


def _npy_layout(path: Path) -> tuple[tuple, np.dtype]:
    """(shape, dtype) from a .npy header, without reading the data; ValueError if the
    header is not a plain C-order array's."""
    with path.open("rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    if fortran:
        raise ValueError("Fortran-ordered")
    return tuple(shape), np.dtype(dtype)


def _layout_text(shape: tuple, dtype: np.dtype) -> str:
    return f"{tuple(shape)} {np.dtype(dtype).name}"


def _sha256(path: Path) -> str:
    return sha256_file(path)


def _save_npy_atomic(path: Path, array: np.ndarray) -> tuple[int, str]:
    """Write, fsync and rename into place; returns (size, sha256) of the bytes written,
    taken before the rename so they describe this writer's file even if another writer
    of the same shard renames after it."""
    # a name of its own per writer: two workers writing one shard leave one whole file
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())
    size, digest = tmp.stat().st_size, _sha256(tmp)
    os.replace(tmp, path)
    return size, digest


def store_identity(model_identity: dict, template: PromptTemplate, rows: Rows,
                   proj_dim: int, seed: int, projection: str) -> dict:
    """Everything a stored gradient depends on; a mismatch means the store is unusable.
    `model_identity` is the model's own account of itself (`CausalLMAdapter.identity()`:
    content digests, parameter set, dtype, loss scope); paths ride along as information,
    the digests decide."""
    ident = model_identity
    return {
        "model_dir": ident["model_dir"],
        "adapter_dir": ident["adapter_dir"],
        "params": ident["params"],
        "param_tensors": ident["param_tensors"],
        "model_sha256": ident["model_sha256"],
        "adapter_sha256": ident["adapter_sha256"],
        "params_sha256": ident["params_sha256"],
        "num_params": ident["num_params"],
        "dtype": ident["dtype"],
        # only when quantized: stores of full-precision models keep their plan and manifest
        **({"quantize": ident["quantize"]} if ident.get("quantize", "none") != "none" else {}),
        "loss_on": ident["loss_on"],
        "max_length": ident["max_length"],
        "template": template.to_json(),
        "data_fingerprint": rows.fingerprint(),
        "rows": len(rows),
        "proj_dim": proj_dim,
        "proj_seed": seed,
        "proj_kind": projection,
    }


def check_store_options(projection: str, store_dtype: str) -> None:
    if store_dtype not in STORE_DTYPES:
        raise UserError(f"unknown store dtype '{store_dtype}' (use fp16 or fp32)")
    if projection not in PROJECTIONS:
        raise UserError(f"unknown projection '{projection}' (use {', '.join(PROJECTIONS)})")


def check_store_dir(final: Path) -> None:
    """Refuse to replace an `INDEX/gradients` that holds anything a build did not write
    (a user's notes, a backup folder, a directory that is not a store): a rebuild swaps the
    whole directory out and deletes it."""
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        return
    if not final.is_dir():
        raise UserError(f"{final} is not a gradient store directory: move it away, then "
                        "rerun")
    ours = re.compile(r"(manifest\.json|norms\.npy|shard-\d{5}\.npy|"
                      + re.escape(CURVATURE_FILE) + r"|\..*\.tmp)")
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in final.iterdir()
                     if p.is_dir() or not ours.fullmatch(p.name))
    if foreign or not (final / "manifest.json").is_file():
        shown = ", ".join(foreign[:4]) + (" ..." if len(foreign) > 4 else "")
        what = f"holds files datablame did not write ({shown})" if foreign else \
            "is not a gradient store (no manifest.json)"
        raise UserError(f"{final} {what}; a rebuild replaces that directory: move them "
                        "out (or remove it), then rerun")


def _plan_difference(old: dict, new: dict) -> str:
    """Which build options differ between two plans, said as a person would: `key: was
    -> now` for short values, the key alone for digests and templates."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        short = all(x is None or isinstance(x, (int, float, str)) and len(str(x)) <= 24
                    for x in (a, b))
        parts.append(f"{key}: {a if a is not None else 'none'} -> "
                     f"{b if b is not None else 'none'}" if short else key)
    return ", ".join(parts[:4]) + (", ..." if len(parts) > 4 else "")


class GradientStoreWriter:
    """Writes a store shard by shard into INDEX_DIR/gradients.partial/ and promotes it.

    It stores what it is handed and computes nothing (the featurization loop lives in
    `features.gradients`). A partial build with the same `plan` is kept and continued;
    one with another plan is discarded (it is ours: inside the locked index).
    """

    def __init__(self, index_dir: Path, plan: dict, *, existing_only: bool = False,
                 read_only: bool = False, worker: bool = False):
        """`existing_only` (the commit of a sharded build): use the partial build of this
        plan as it is, never start or discard one. `read_only` (`build_status`): touch
        nothing on disk. `worker` (a `--shard-of` worker): never discard another plan's
        finished shards, which other workers wrote; refuse, naming what differs."""
        import fcntl

        self.plan = plan
        self.rows, self.shard_rows = plan["rows"], plan["shard_rows"]
        self.proj_dim = plan["proj_dim"]
        self.width = stored_width(self.proj_dim, plan.get("curvature"))
        self.dtype = np.dtype(STORE_DTYPES[plan["store_dtype"]])
        self.final = Path(index_dir) / "gradients"
        self.partial = Path(index_dir) / "gradients.partial"
        self._lock_path = Path(index_dir) / ".gradients-plan.lock"
        self._curvature_sha256: str | None = None
        if read_only:
            return
        check_store_dir(self.final)  # before any work: a rebuild would replace it
        # shard workers start together: one at a time decides whether the partial build
        # is theirs (a worker must not discard the directory another has just made)
        Path(index_dir).mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            old = self.partial / "plan.json"
            try:
                found = json.loads(old.read_text()) if old.exists() else None
            except ValueError:
                found = None
            same = found == plan
            finished = len(list(self.partial.glob("shard-*.json"))) if found else 0
            differs = _plan_difference(found, plan) if isinstance(found, dict) else ""
            if existing_only:
                if not same:
                    why = f" (its shards were built with {differs})" if differs else ""
                    raise UserError(f"no gradient shards of this model, data and options "
                                    f"in {self.partial} to commit{why}: run the --shard-of "
                                    "workers with the same options first")
                return
            if self.partial.exists() and not same:
                if worker and finished > 0:
                    raise UserError(f"{self.partial} holds {finished} finished shard(s) of a "
                                    f"build with other options ({differs}): run this worker "
                                    "with that build's options, or remove the directory to "
                                    "start over")
                if finished > 0:
                    from datablame import progress

                    progress.note(f"discarded {finished} finished gradient shard(s) of a "
                                  f"build with other options ({differs})")
                shutil.rmtree(self.partial)  # a different build was interrupted: start over
            self.partial.mkdir(parents=True, exist_ok=True)
            if not same:
                write_json_atomic(self.partial / "plan.json", plan)

    def missing(self) -> list[int]:
        return [s for s in range(self.n_shards) if not self.has(s)]

    def curvature(self, fit):
        """The build's curvature (None when the plan has none): fitted by whichever worker
        comes first (`fit()`, under the plan lock, while the others wait) and saved in the
        build; every worker then whitens with the saved bytes, the first one included."""
        import fcntl

        if not self.plan.get("curvature"):
            return None
        path = self.partial / CURVATURE_FILE
        with open(self._lock_path, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                ek = load_curvature(path) if path.exists() else None
            except (ValueError, KeyError, EOFError, zipfile.BadZipFile):
                ek = None  # damaged content (ours, inside the build): fit it again
            if ek is None:
                save_curvature(fit(), path)
                ek = load_curvature(path)
            self._curvature_sha256 = _sha256(path)
        return ek

    @property
    def curvature_sha256(self) -> str | None:
        """sha256 of the build's curvature file (None: no curvature, or not fitted yet)."""
        if self._curvature_sha256 is None and self.plan.get("curvature"):
            path = self.partial / CURVATURE_FILE
            self._curvature_sha256 = _sha256(path) if path.exists() else None
        return self._curvature_sha256

    @property
    def n_shards(self) -> int:
        return (self.rows + self.shard_rows - 1) // self.shard_rows

    def row_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_rows, min(self.rows, (shard + 1) * self.shard_rows)

    def _path(self, shard: int) -> Path:
        return self.partial / f"shard-{shard:05d}.npy"

    def _sidecar(self, shard: int) -> Path:
        return self.partial / f"shard-{shard:05d}.json"

    def _norms_path(self, shard: int) -> Path:
        return self.partial / f"shard-{shard:05d}.norms.npy"

    @property
    def plan_digest(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(self.plan, sort_keys=True).encode()).hexdigest()

    def _read_sidecar(self, shard: int) -> dict | None:
        try:
            return json.loads(self._sidecar(shard).read_text())
        except (OSError, ValueError):
            return None

    def _expected(self, shard: int) -> tuple[tuple, np.dtype]:
        lo, hi = self.row_range(shard)
        return (hi - lo, self.width), self.dtype

    def has(self, shard: int) -> bool:
        """A shard is complete when its sidecar (written last, atomically) is this plan's
        and its array has the planned layout and the sidecar's size."""
        path, side = self._path(shard), self._read_sidecar(shard)
        return (side is not None and side.get("plan") == self.plan_digest and
                path.exists() and path.stat().st_size == side.get("bytes") and
                _layout_or_none(path) == self._expected(shard) and
                self._norms_path(shard).exists() and
                side.get("curvature") == self.curvature_sha256)

    def write(self, shard: int, vectors: np.ndarray) -> None:
        """The shard, its norms, then its sidecar (row range, size, sha256, this plan's
        digest): the commit merges sidecars and never reads the shards' data."""
        lo, hi = self.row_range(shard)
        if vectors.shape != (hi - lo, self.width):
            raise ValueError(f"shard {shard}: got {vectors.shape}, planned "
                             f"{(hi - lo, self.width)}")
        stored = vectors.astype(self.dtype)
        size, digest = _save_npy_atomic(self._path(shard), stored)
        _save_npy_atomic(self._norms_path(shard),
                         np.linalg.norm(np.asarray(stored, dtype=np.float32), axis=1)
                         .astype(np.float32))
        side = {"plan": self.plan_digest, "rows": [lo, hi], "bytes": size, "sha256": digest}
        if self.plan.get("curvature"):
            if self._curvature_sha256 is None:
                raise ValueError("a curvature build writes shards only after curvature()")
            side["curvature"] = self._curvature_sha256
        write_json_atomic(self._sidecar(shard), side)

    def commit(self, projection: dict) -> dict:
        """Check every shard against its sidecar, merge the sidecars and norms (reading
        headers and metadata, not the shards' data: `GradientStore.load` checks the
        sha256 on use), write the manifest last, swap the store in."""
        check_store_dir(self.final)  # again, before merging: files added during the build
        shards, norms = [], []
        curvature = None
        if self.plan.get("curvature"):
            path = self.partial / CURVATURE_FILE
            if not path.is_file():
                raise UserError(f"gradient store build {self.partial}: {CURVATURE_FILE} is "
                                "missing; rerun the build")
            self._curvature_sha256 = _sha256(path)
            curvature = {**self.plan["curvature"], "file": CURVATURE_FILE,
                         "bytes": path.stat().st_size, "sha256": self._curvature_sha256}
        for s in range(self.n_shards):
            path, want = self._path(s), self._expected(s)
            side = self._read_sidecar(s)
            where = f"gradient store build {self.partial}: {path.name}"
            if side is None:
                raise UserError(f"{where} has no sidecar ({self._sidecar(s).name}): its "
                                "worker did not finish it; rerun the build")
            if side.get("plan") != self.plan_digest or side.get("rows") != \
                    list(self.row_range(s)):
                raise UserError(f"{where}: its sidecar is from another build plan; rerun "
                                "the build")
            if side.get("curvature") != self._curvature_sha256:
                raise UserError(f"{where} was whitened with another curvature fit than "
                                f"{CURVATURE_FILE}; rerun the build")
            layout = _layout_or_none(path)
            if layout != want:  # certify only what this plan made
                raise UserError(f"{where} holds "
                                f"{_layout_text(*layout) if layout else 'no readable array'}"
                                f", expected {_layout_text(*want)}; rerun the build")
            if path.stat().st_size != side.get("bytes"):
                raise UserError(f"{where} is {path.stat().st_size} bytes, its sidecar says "
                                f"{side.get('bytes')} (truncated or replaced); rerun the "
                                "build")
            part = np.load(self._norms_path(s))
            if part.shape != (want[0][0],):
                raise UserError(f"{where}: its norms file does not match; rerun the build")
            norms.append(part)
            shards.append({"file": path.name, "rows": list(self.row_range(s)),
                           "bytes": side["bytes"], "sha256": side["sha256"]})
        norms_path = self.partial / NORMS_NAME
        norms_bytes, norms_sha = _save_npy_atomic(norms_path,
                                                  np.concatenate(norms).astype(np.float32))
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "tool_version": __version__, **self.plan, "projection": projection,
                    **({"curvature": curvature} if curvature else {}), "shards": shards,
                    "norms": {"file": NORMS_NAME, "rows": self.rows,
                              "bytes": norms_bytes, "sha256": norms_sha}}
        write_json_atomic(self.partial / "manifest.json", manifest)
        # merged into the manifest and norms.npy; only now, so a commit that fails before
        # the manifest leaves every shard done; temp files of killed writers go too
        for s in range(self.n_shards):
            self._sidecar(s).unlink()
            self._norms_path(s).unlink()
        for leftover in self.partial.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        (self.partial / "plan.json").unlink()
        old = None
        if self.final.exists():  # ours (inside the locked index): swap, then delete it
            old = self.final.with_name(f".gradients.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.partial, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest


def _layout_or_none(path: Path) -> tuple[tuple, np.dtype] | None:
    try:
        return _npy_layout(path)
    except Exception:  # a damaged header of a partial shard: recompute it
        return None


@dataclass
class GradientStore:
    path: Path
    manifest: dict

    @classmethod
    def load(cls, index_dir: Path, verify: bool = True) -> GradientStore:
        path = Path(index_dir) / "gradients"
        if not (path / "manifest.json").exists():
            hint = " (an interrupted build can be resumed)" if \
                (Path(index_dir) / "gradients.partial").exists() else ""
            raise UserError(
                f"{index_dir} has no gradient store{hint}: run 'datablame index ... "
                "--model ... --gradients'"
            )
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"gradient store {path}: manifest.json is corrupted (not valid "
                            "JSON); rebuild it") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise UserError(f"{path} is not a datablame gradient store; rebuild it")
        version = manifest.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise UserError(f"gradient store {path} was written by a newer datablame; "
                            "upgrade to read it")
        if version < FORMAT_VERSION:
            raise UserError(f"gradient store {path} was written by an older datablame (store "
                            f"format {version}, no content identity or norms checksum); "
                            "rebuild it")
        store = cls(path, manifest)
        store.check_files(verify)
        return store

    def _own_file(self, name: object, pattern: re.Pattern) -> Path:
        """The store's own file `name`: a plain name of the expected form that resolves
        inside the store (a manifest naming ../x or /etc/passwd is refused, not read)."""
        if not isinstance(name, str) or not pattern.fullmatch(name):
            raise UserError(f"gradient store {self.path}: its manifest names a file that is "
                            f"not one of its own ({name!r}); rebuild the store")
        f = self.path / name
        if Path(os.path.realpath(f)).parent != Path(os.path.realpath(self.path)):
            raise UserError(f"gradient store {self.path}: {name} resolves outside the store "
                            f"(to {os.path.realpath(f)}); rebuild the store")
        return f

    def _check_file(self, entry: dict, pattern: re.Pattern, shape: tuple, verify: bool
                    ) -> None:
        """Size and .npy header always (cheap: catches truncation and foreign shards);
        sha256 when `verify` (reads the file: catches any corruption)."""
        name = entry.get("file")
        f = self._own_file(name, pattern)
        if not f.is_file():
            raise UserError(f"gradient store {self.path}: {name} is missing; rebuild it")
        if f.stat().st_size != entry.get("bytes"):
            raise UserError(f"gradient store {self.path}: {name} is truncated or altered "
                            "(size differs); rebuild it")
        try:
            layout = _npy_layout(f)
        except Exception:
            raise UserError(f"gradient store {self.path}: {name} has a damaged header "
                            "(not a readable .npy array); rebuild it") from None
        want = (shape, np.dtype(np.float32) if pattern is not SHARD_NAME
                else np.dtype(STORE_DTYPES.get(self.manifest.get("store_dtype"), np.float16)))
        if layout != want:
            raise UserError(f"gradient store {self.path}: {name} holds "
                            f"{_layout_text(*layout)}, its manifest says "
                            f"{_layout_text(*want)}; the store is damaged (two builds at "
                            "once?): rebuild it")
        if verify and _sha256(f) != entry.get("sha256"):
            raise UserError(f"gradient store {self.path}: {name} is corrupted (checksum "
                            "differs); rebuild it")

    def check_files(self, verify: bool) -> None:
        """Every file the store reads is confined, sized, header-checked and (`verify`)
        checksummed; shard row ranges must tile 0..rows."""
        m = self.manifest
        n = m.get("rows")
        k = stored_width(m.get("proj_dim"), m.get("curvature")) \
            if isinstance(m.get("proj_dim"), int) else None
        at = 0
        for shard in m.get("shards", []):
            lo, hi = shard.get("rows", (None, None))
            if lo != at or not isinstance(hi, int) or hi <= lo:
                raise UserError(f"gradient store {self.path}: its shard row ranges do not "
                                f"cover rows 0..{n}; rebuild it")
            self._check_file(shard, SHARD_NAME, (hi - lo, k), verify)
            at = hi
        if at != n:
            raise UserError(f"gradient store {self.path}: its shards hold {at} rows, its "
                            f"manifest says {n}; rebuild it")
        norms = m.get("norms")
        if not isinstance(norms, dict):
            raise UserError(f"gradient store {self.path}: its manifest lists no norms.npy; "
                            "rebuild it")
        self._check_file(norms, re.compile(re.escape(NORMS_NAME)), (n,), verify)
        curvature = m.get("curvature")
        if curvature is not None:
            f = self._own_file(curvature.get("file") if isinstance(curvature, dict) else None,
                               CURVATURE_NAME)
            if not f.is_file() or f.stat().st_size != curvature.get("bytes") or \
                    (verify and _sha256(f) != curvature.get("sha256")):
                raise UserError(f"gradient store {self.path}: {CURVATURE_FILE} is missing, "
                                "truncated or altered; rebuild it")

    @property
    def curvature(self):
        """The EK-FAC the store's vectors were whitened with (None: plain gradients); a
        query must be whitened with it too (`whiten`)."""
        if not self.manifest.get("curvature"):
            return None
        if getattr(self, "_curvature", None) is None:
            try:
                self._curvature = load_curvature(self.path / CURVATURE_FILE)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                raise UserError(f"gradient store {self.path}: {CURVATURE_FILE} cannot be "
                                "read; rebuild it") from None
        return self._curvature

    @property
    def holds_both(self) -> bool:
        """Plain and whitened vectors side by side, each of unit length (`--curvature
        both`): scanned with `features.curvature.query_vector` and kind "dot"."""
        return holds_both(self.manifest.get("curvature"))

    def whiten(self, grads: np.ndarray) -> np.ndarray:
        """Gradients as the store holds them before projection: H^-1/2 g with the store's
        curvature, or as they are."""
        ek = self.curvature
        return grads if ek is None else ek.whiten(grads).numpy()

    def check_compatible(self, model_identity: dict, template: PromptTemplate, rows: Rows
                         ) -> None:
        """Refuse a store made for another model, adapter, parameter set, dtype, template or
        data (`model_identity`: the tracer's `CausalLMAdapter.identity()`)."""
        m = self.manifest
        want = store_identity(model_identity, template, rows, m["proj_dim"], m["proj_seed"],
                              self.projector.kind)
        detail = {  # readable reasons; the digests themselves say nothing to a person
            "model_sha256": lambda: f"the files of {want['model_dir']} differ from those of "
                                    f"{m.get('model_dir')} when the store was built",
            "adapter_sha256": lambda: (
                f"built with adapter {m.get('adapter_dir')}, none given now"
                if want["adapter_dir"] is None else
                f"built without an adapter, {want['adapter_dir']} given now"
                if m.get("adapter_dir") is None else
                f"the files of {want['adapter_dir']} differ from those of "
                f"{m.get('adapter_dir')} when the store was built"),
            "params_sha256": lambda: f"{m.get('param_tensors')} tensors from "
                                     f"'{m.get('params')}' when built, "
                                     f"{want['param_tensors']} from '{want['params']}' now",
            "dtype": lambda: f"{m.get('dtype')} gradients when built, {want['dtype']} now",
            "quantize": lambda: f"base weights {m.get('quantize', 'none')} when built, "
                                f"{want.get('quantize', 'none')} now",
            "data_fingerprint": lambda: "the rows' content changed since it was built",
            "rows": lambda: f"{m.get('rows')} rows when built, {want['rows']} now",
        }
        labels = {"model_sha256": "model", "adapter_sha256": "adapter",
                  "params_sha256": "parameter set", "num_params": "parameter set",
                  "dtype": "dtype", "quantize": "quantization", "loss_on": "loss scope",
                  "max_length": "max length", "template": "template",
                  "rows": "training data", "data_fingerprint": "training data"}
        for key, label in labels.items():
            if m.get(key) != want.get(key):
                why = detail[key]() if key in detail else \
                    f"{key}: {m.get(key)!r} vs {want[key]!r}"
                fix = f"trace with --dtype {m.get('dtype')} or rebuild it" if key == "dtype" \
                    else f"trace with --quantize {m.get('quantize', 'none')} or rebuild it" \
                    if key == "quantize" else "rebuild it"
                what = "other training data" if label == "training data" else \
                    f"a different {label}"
                raise UserError(f"gradient store {self.path} was built for {what} ({why}); "
                                f"{fix}")

    @property
    def projector(self):
        return projector_from_json(self.manifest["projection"])

    def top_k(self, query: np.ndarray, k: int, kind: str = "cosine", absolute: bool = False,
              workers: int = 1, ray: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of every stored row; returns (row ids, scores) of the best k, by
        score or, with `absolute`, by |score| (strongly aligned or strongly opposed)."""
        return self.top_k_many(np.asarray(query)[None], k, kind, absolute, workers, ray)[0]

    def top_k_many(self, queries: np.ndarray, k: int, kind: str = "cosine",
                   absolute: bool = False, workers: int = 1, ray: str | None = None
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`top_k` for each row of `queries` (m, K) in one pass over the store: each block
        of rows is read once and scored against every query by one matrix product.

        Streams block by block from memory-mapped shards: memory holds one block (converted
        to float32 by torch, several times faster than numpy's float16 conversion) and a
        k-sized heap per query, whatever the number of rows. `workers` > 1 scans contiguous
        groups of shards in threads (the products release the GIL) and merges their exact
        top-k lists: the same rows and scores as one scan, ties to the lower row id.
        `ray` (an address: local, auto or HOST:PORT): the groups are Ray tasks instead,
        on any node that sees the store at this path (`store.ray_scan`); same merge.
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2:
            raise ValueError(f"queries must be (m, K), got shape {q.shape}")
        shards = self.manifest["shards"]
        if k <= 0:
            return [(np.zeros(0, dtype=np.int64), np.zeros(0)) for _ in range(len(q))]
        groups = [g for g in np.array_split(np.arange(len(shards)), max(1, workers)) if len(g)]
        if ray:
            from datablame.store.ray_scan import scan_groups_on_ray

            parts = scan_groups_on_ray(self, q, [[int(i) for i in g] for g in groups], k,
                                       kind, absolute, ray)
            heaps = [[item for part in parts for item in part[j]] for j in range(len(q))]
        elif len(groups) <= 1:
            heaps = self._scan(q, shards, k, kind, absolute)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(groups)) as pool:
                parts = list(pool.map(lambda g: self._scan(q, [shards[i] for i in g], k, kind,
                                                           absolute), groups))
            heaps = [[item for part in parts for item in part[j]] for j in range(len(q))]
        out = []
        for heap in heaps:
            best = sorted(heap, reverse=True)[:k]
            out.append((np.array([-r for _, r, _ in best], dtype=np.int64),
                        np.array([s for _, _, s in best], dtype=np.float64)))
        return out

    def _scan(self, q: np.ndarray, shards: list[dict], k: int, kind: str, absolute: bool
              ) -> list[list[tuple[float, int, float]]]:
        """One k-sized heap of (key, -row, score) per query over these shards."""
        import torch

        norms = np.load(self.path / NORMS_NAME, mmap_mode="r")
        qn = np.linalg.norm(q, axis=1)
        qn = np.where(qn > 0, qn, 1.0)
        q_t = torch.from_numpy(np.ascontiguousarray(q.T))
        heaps: list[list[tuple[float, int, float]]] = [[] for _ in range(len(q))]
        fast = _Fp16Filter(q[0], k, kind, absolute) if len(q) == 1 else None
        bounds = [self._dot_bound(row) for row in q]
        for shard in shards:
            lo, hi = shard["rows"]
            # copy-on-write mapping: writable for torch, never written, so never copied
            block = np.load(self.path / shard["file"], mmap_mode="c")
            for start in range(0, hi - lo, SCAN_BLOCK_ROWS):
                part = block[start:start + SCAN_BLOCK_ROWS]  # mapped, not read yet
                first = lo + start
                ids = np.arange(first, first + len(part))
                if fast is not None and part.dtype == np.float16:
                    found = fast.candidates(part, norms[first:first + len(part)])
                    if found is not None:  # only these rows can be in the top k: score them
                        rows, dots = found
                        scores = align_dots(dots, norms[first + rows], qn[0], kind)
                        self._check_cosines(scores, ids[rows], kind, bounds[0])
                        _push_rows(heaps[0], np.abs(scores) if absolute else scores, scores,
                                   ids[rows], k)
                        continue
                dots = (torch.from_numpy(part).float() @ q_t).numpy()  # (rows, m)
                for j in range(len(q)):
                    scores = align_dots(dots[:, j], norms[first:first + len(part)], qn[j],
                                        kind)
                    self._check_cosines(scores, ids, kind, bounds[j])
                    _push_rows(heaps[j], np.abs(scores) if absolute else scores, scores,
                               ids, k)
        return heaps

    def score_rows(self, query: np.ndarray, row_ids: np.ndarray, kind: str = "cosine"
                   ) -> np.ndarray:
        """Stored scores of the given rows only (reads just their shards' rows)."""
        q = np.asarray(query, dtype=np.float32).ravel()
        norms = np.load(self.path / NORMS_NAME, mmap_mode="r")
        qn = float(np.linalg.norm(q)) or 1.0
        ids = np.asarray(row_ids, dtype=np.int64)
        out = np.zeros(len(ids))
        for shard in self.manifest["shards"]:
            lo, hi = shard["rows"]
            inside = np.flatnonzero((ids >= lo) & (ids < hi))
            if not len(inside):
                continue
            block = np.load(self.path / shard["file"], mmap_mode="r")
            vecs = np.asarray(block[ids[inside] - lo], dtype=np.float32)
            out[inside] = align_dots(vecs @ q, norms[ids[inside]], qn, kind)
            self._check_cosines(out[inside], ids[inside], kind, self._dot_bound(q))
        return out

    def _dot_bound(self, q: np.ndarray) -> float:
        """The largest |dot| a query can have with an intact row of a store of both
        vectors (two unit halves): the sum of its halves' lengths."""
        half = len(q) // 2
        return float(np.linalg.norm(q[:half]) + np.linalg.norm(q[half:]))

    def _check_cosines(self, scores: np.ndarray, row_ids: np.ndarray, kind: str,
                       bound: float = 1.0) -> None:
        """A cosine outside [-1, 1] (or, in a store of both vectors, a dot beyond the
        query's `_dot_bound`) means the vectors or their norms are damaged: refuse rather
        than label a 62.9 `strong` (a last line of defence under --no-checksum)."""
        if not len(scores) or (kind != "cosine" and not self.holds_both):
            return
        limit = 1.0 if kind == "cosine" else bound
        worst = int(np.argmax(np.abs(np.nan_to_num(scores, nan=0.0))))
        if abs(scores[worst]) > limit * (1 + COSINE_SLACK) + 1e-6:
            raise UserError(f"gradient store {self.path} is damaged: a cosine of "
                            f"{scores[worst]:.4g} (row {int(row_ids[worst])}) is impossible; "
                            "rebuild it")


def _push_rows(heap: list, key: np.ndarray, scores: np.ndarray, rows: np.ndarray,
               k: int) -> None:
    """Keep the k largest (key, -row) in a min-heap: ties go to the lower row id. Only rows
    at or above these rows' k-th largest key can enter: all of them, ties included."""
    if len(key) > k:
        kth = np.partition(key, len(key) - k)[len(key) - k]
        keep = np.flatnonzero(key >= kth)
        key, scores, rows = key[keep], scores[keep], rows[keep]
    for kk, row, score in zip(key.tolist(), rows.tolist(), scores.tolist(), strict=True):
        item = (kk, -row, score)
        if len(heap) < k:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)


class _Fp16Filter:
    """A first pass in fp16 for one query: torch's fp16 matrix-vector product reads an fp16
    block many times faster than converting it to float32 first (bench/gradient_scan.py),
    but rounds each product to fp16. Every row gets an interval [approx - bound, approx +
    bound] that holds its exact score (bound = FP16_BOUND relative to |row| |query|,
    checked against the exact product on a scan's first FP16_CHECK_ROWS rows); a row whose
    upper end is below the k-th largest lower end seen so far cannot be in the top k. The
    rest are scored exactly: the exact scan's top k up to fp32 rounding of near-ties."""

    def __init__(self, query: np.ndarray, k: int, kind: str, absolute: bool) -> None:
        import torch

        self.qn = float(np.linalg.norm(query)) or 1.0
        self.q16 = torch.from_numpy((query / self.qn).astype(np.float32)).half()
        self.q64 = np.asarray(query, dtype=np.float64) / self.qn
        self.k, self.kind, self.absolute = k, kind, absolute
        self.lows = np.empty(0)
        self.checked, self.refused = False, False

    def candidates(self, part: np.ndarray, row_norms: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows of `part` that may be in the top k, their exact dot products with the
        query), or None: score the whole block exactly."""
        import torch

        if self.refused:
            return None
        approx = (torch.from_numpy(part) @ self.q16).float().numpy().astype(np.float64)
        norms = np.asarray(row_norms, dtype=np.float64)
        if not (np.isfinite(approx).all() and np.isfinite(norms).all()):
            return None  # fp16 overflow or damaged norms: this block goes exact
        if not self.checked:  # the bound, checked on this machine's kernel, once per scan
            n = min(len(part), FP16_CHECK_ROWS)
            exact = np.asarray(part[:n], dtype=np.float64) @ self.q64
            if np.any(np.abs(approx[:n] - exact) > FP16_BOUND / 4 * norms[:n] + FP16_FLOOR):
                self.refused = True  # a kernel that rounds worse: every block goes exact
                return None
            self.checked = True
        err = FP16_BOUND * norms + FP16_FLOOR  # on dot products with the unit query
        if self.kind == "cosine":
            safe = np.where(norms > 0, norms, 1.0)
            score, err = approx / safe, err / safe
        else:
            score, err = approx * self.qn, err * self.qn
        key = np.abs(score) if self.absolute else score
        lows = np.concatenate([self.lows, key - err])
        if len(lows) > self.k:
            lows = np.partition(lows, len(lows) - self.k)[-self.k:]
        self.lows = lows
        floor = lows.min() if len(lows) >= self.k else -np.inf
        rows = np.flatnonzero(key + err >= floor)
        # in float64, then rounded to float32: a row's score does not depend on where it
        # sits among the candidates, so identical rows tie and go to the lower id
        exact = (np.asarray(part[rows], dtype=np.float64) @ self.q64).astype(np.float32)
        return rows, exact.astype(np.float64) * self.qn


def stale_for(store_manifest: dict, index_manifest: dict) -> str | None:
    """Why a gradient store does not belong to its index's rows or template (None: it
    does). A retrieval index rebuilt over edited data keeps the store beside it (it is
    not ours to delete), so `index` and `status` say so before `trace` refuses it."""
    data = index_manifest.get("data") or {}
    if store_manifest.get("data_fingerprint") != data.get("fingerprint") or \
            store_manifest.get("rows") != data.get("rows"):
        return (f"built for other training data ({store_manifest.get('rows')} rows then, "
                f"{data.get('rows')} now)" if store_manifest.get("rows") != data.get("rows")
                else "built for other training data (the rows' content changed)")
    if store_manifest.get("template") != index_manifest.get("template"):
        return "built with another template than the index"
    return None


def build_status(index_dir: Path) -> dict:
    """Where a gradient store build stands, from files alone (no model, no lock): the
    committed store, or the partial build's shards done / missing / damaged (a file
    without a matching sidecar), the rate from the sidecars' times and an ETA."""
    try:
        return _build_status(Path(index_dir))
    except (FileNotFoundError, ValueError):  # a commit renamed things as we read them ...
        manifest = Path(index_dir) / "gradients" / "manifest.json"
        try:
            if manifest.is_file():
                json.loads(manifest.read_text())
        except ValueError:  # ... or the store's manifest is damaged
            return {"index": str(index_dir),
                    "note": f"{manifest} is damaged (not valid JSON): rebuild the store"}
        return {"index": str(index_dir), "note": "a build is being committed right now: "
                                                 "run status again"}


def _build_status(index_dir: Path) -> dict:
    final, partial = index_dir / "gradients", index_dir / "gradients.partial"
    out: dict = {"index": str(index_dir)}
    if (final / "manifest.json").exists():
        manifest = json.loads((final / "manifest.json").read_text())
        out["store"] = {"rows": manifest.get("rows"), "shards": len(manifest.get("shards", [])),
                        "proj_dim": manifest.get("proj_dim"),
                        "vectors": "plain and whitened" if holds_both(
                            manifest.get("curvature")) else "whitened"
                        if manifest.get("curvature") else "plain",
                        "store_dtype": manifest.get("store_dtype"),
                        "bytes": sum(int(s.get("bytes", 0)) for s in manifest["shards"])}
        try:
            index_manifest = json.loads((index_dir / "manifest.json").read_text())
        except (OSError, ValueError):
            index_manifest = None
        if isinstance(index_manifest, dict):
            stale = stale_for(manifest, index_manifest)
            if stale:
                out["store"]["stale"] = stale
    if (partial / "plan.json").exists():
        plan = json.loads((partial / "plan.json").read_text())
        writer = GradientStoreWriter(index_dir, plan, read_only=True)
        done, missing, damaged = [], [], []
        for s in range(writer.n_shards):
            if writer.has(s):
                done.append(s)
            elif writer._path(s).exists():
                damaged.append(s)
            else:
                missing.append(s)
        from datablame.store.ivfpq_build import progress_of

        times = [writer._sidecar(s).stat().st_mtime for s in done]
        out["build"] = {**progress_of(done, times, writer.rows,
                                      lambda s: writer.row_range(s)[1] - writer.row_range(s)[0],
                                      writer.n_shards),
                        "missing": missing, "damaged": damaged}
    from datablame.store.ivfpq_build import build_status as ivfpq_status

    ivfpq = ivfpq_status(index_dir)
    if ivfpq is not None:
        out["ivfpq_build"] = ivfpq
    return out
