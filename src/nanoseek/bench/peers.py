"""The real peers: llama.cpp's own `llama-server`, `llama-bench` and `llama-perplexity`, built once from source into
a cache.

    make peers        (or: nanoseek bench peers [--jobs 2] [--threads 2] [--rebuild])

The source is the llama.cpp tree vendored in llama-cpp-python's sdist (the version pinned in the `bench` extra,
downloaded with pip into the cache), so the C++ peers run the same llama.cpp as the Python ones. The build goes to
$NANOSEEK_CACHE/peers/llama.cpp-<version>-<tag>/bin (default ~/.cache/nanoseek/peers/...), where <tag> names the
CPU build: `native-<hash>` (GGML_NATIVE=ON) or `noamx-<hash>` (see below); the hash covers the CMake options
and the CPU's ISA flags, so another CPU gets a build of its own. A second run finds the build and returns at once.

CPU detection: some of these machines' Intel CPUs list AMX (`amx_tile`, `amx_int8`, `amx_bf16`) in
/proc/cpuinfo although their VM does not enable it; llama.cpp built with GGML_NATIVE=ON there runs its AMX
kernels and dies with SIGILL on any prompt batch. Where the flags list AMX, the build is GGML_NATIVE=OFF with
the explicit ISA options the CPU lists (AVX2, FMA, F16C, BMI2, AVX512 and its VBMI/VNNI/BF16 extensions, ...)
and every GGML_AMX_* OFF; elsewhere GGML_NATIVE=ON.

After building, `llama-bench -p 64 -n 16` on SmolLM2-135M Q4_1 must run (a prompt batch: the AMX failure); the
build's record (llama-cpp-python version, llama.cpp commit, CMake options, CPU, compiler, that check's figures)
is written to build.json beside the binaries, and the benchmarks print it, so every result says which build ran.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

# llama-cpp-python whose vendored llama.cpp is built: the version pinned in pyproject.toml's `bench` extra
LLAMA_CPP_PYTHON = "0.3.36"
# llama-perplexity: llama.cpp's run of a file for `bench quality` (its --kl-divergence-base log-probs)
BINARIES = ("llama-server", "llama-bench", "llama-perplexity")
BUILD_HINT = "run `make peers` (or `nanoseek bench peers`) to build them once (~6 min on 2 cores)"

# GGML CMake option -> the /proc/cpuinfo flags it needs (all of them) on a GGML_NATIVE=OFF build. GGML_AVX512
# compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw (ggml-cpu/CMakeLists.txt).
ISA_OPTIONS = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512f", "avx512vbmi")),
    ("GGML_AVX512_VNNI", ("avx512f", "avx512_vnni")),
    ("GGML_AVX512_BF16", ("avx512f", "avx512_bf16")),
)
AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
# the CPU flags that decide a build (recorded, and hashed into the build's tag)
ISA_FLAGS = sorted({f for _, needs in ISA_OPTIONS for f in needs} | {"amx_tile", "amx_int8", "amx_bf16"})

# the rest of the configuration: static binaries (the bin folder stands alone), no tests/examples, no downloads
BASE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_OPENSSL": "OFF",
}


class PeerMissing(RuntimeError):
    """A peer binary is not built for this CPU; the message says how to build it."""


# ---- CPU detection and the build's options (pure functions, tested on sample flag strings) ------------------


def cpu_flags(cpuinfo: str) -> set[str]:
    """The ISA flags of the first processor in a /proc/cpuinfo text (empty where it lists none)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return set(value.split())
    return set()


def has_amx(flags: set[str]) -> bool:
    """Whether the CPU *reports* AMX (whether the VM enables it is another matter: that is the trouble)."""
    return any(f.startswith("amx") for f in flags)


def cmake_cpu_options(flags: set[str]) -> dict[str, str]:
    """GGML's CPU options for these flags: GGML_NATIVE=ON, unless the CPU reports AMX; then GGML_NATIVE=OFF with
    each ISA option ON where the CPU lists everything it needs, OFF otherwise, and AMX OFF."""
    if not has_amx(flags):
        return {"GGML_NATIVE": "ON"}
    options = {"GGML_NATIVE": "OFF"}
    for option, needs in ISA_OPTIONS:
        options[option] = "ON" if set(needs) <= flags else "OFF"
    for option in AMX_OPTIONS:
        options[option] = "OFF"
    return options


def build_tag(options: dict[str, str], flags: set[str]) -> str:
    """`native-<hash>` or `noamx-<hash>`: the hash covers the CPU options and the CPU's deciding ISA flags."""
    kind = "native" if options.get("GGML_NATIVE") == "ON" else "noamx"
    key = json.dumps([sorted(options.items()), sorted(flags & set(ISA_FLAGS))])
    return f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def cmake_configure_argv(source: Path, build: Path, options: dict[str, str]) -> list[str]:
    return ["cmake", "-S", str(source), "-B", str(build), *(f"-D{k}={v}" for k, v in options.items())]


def cmake_build_argv(build: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build), "-j", str(jobs), "--target", *BINARIES]


def upstream_commit(changelog: str, version: str) -> str | None:
    """The llama.cpp commit llama-cpp-python `version` vendors, from its CHANGELOG ("update llama.cpp to
    ggml-org/llama.cpp@<sha>" in the version's section; the sdist carries no git metadata)."""
    section = re.search(rf"^## \[{re.escape(version)}\]\s*$(.*?)(?=^## \[|\Z)", changelog, re.M | re.S)
    if section is None:
        return None
    found = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section.group(1))
    return found.group(1) if found else None


# ---- where a build lives -----------------------------------------------------------------------------------


def peers_root() -> Path:
    from nanoseek.assets import default_cache_dir

    return default_cache_dir() / "peers"


def this_cpu() -> tuple[set[str], str]:
    """This machine's CPU flags and model name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set(), platform.processor() or platform.machine()
    model = next((line.partition(":")[2].strip() for line in text.splitlines() if line.startswith("model name")), "")
    return cpu_flags(text), model or platform.machine()


@dataclass(frozen=True)
class Build:
    """The build for this CPU: its folder, binaries and CMake options."""

    root: Path
    options: dict[str, str]
    flags: frozenset[str]

    @classmethod
    def for_this_cpu(cls, root: Path | None = None) -> Build:
        flags, _ = this_cpu()
        options = cmake_cpu_options(flags)
        root = root or peers_root()
        return cls(root / f"llama.cpp-{LLAMA_CPP_PYTHON}-{build_tag(options, flags)}", options, frozenset(flags))

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def record_path(self) -> Path:
        return self.root / "build.json"

    def record(self) -> dict | None:
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return None

    def ready(self) -> bool:
        record = self.record()
        return bool(record and record.get("verified")) and all((self.bin / b).is_file() for b in BINARIES)


def not_built_message(name: str, build: Build) -> str:
    return (f"llama.cpp's {name} is not built for this CPU (looked in {build.bin}): {BUILD_HINT}; "
            "or name another peer")  # fmt: skip


def find_peer(name: str, build: Build | None = None) -> tuple[Path, dict]:
    """The path of a built peer binary and its build record; PeerMissing (saying to run `make peers`) otherwise."""
    build = build or Build.for_this_cpu()
    path = build.bin / name
    record = build.record()
    if not path.is_file() or not (record and record.get("verified")):
        raise PeerMissing(not_built_message(name, build))
    return path, record


def describe(record: dict) -> str:
    """One line naming the build that ran, for the benchmarks' reports."""
    options = record.get("cmake_cpu_options", {})
    if options.get("GGML_NATIVE") == "ON":
        cpu = "GGML_NATIVE=ON"
    else:
        on = [k.removeprefix("GGML_") for k, v in options.items() if v == "ON" and k != "GGML_NATIVE"]
        cpu = f"GGML_NATIVE=OFF ({', '.join(on)} ON; AMX OFF: the CPU reports AMX)"
    return (f"llama.cpp {record.get('llama_cpp_commit') or '?'} (vendored in llama-cpp-python "
            f"{record.get('llama_cpp_python')}), {cpu}, built {record.get('built_at', '?')} "
            f"[{record.get('tag', '?')}]")  # fmt: skip


# ---- building ----------------------------------------------------------------------------------------------


def run_streamed(argv: list[str], log: Path, cwd: Path | None = None) -> None:
    """Run a command, its output shown as it comes and kept in a log; CalledProcessError on failure."""
    print("$ " + " ".join(argv), flush=True)
    with log.open("a") as f:
        f.write("$ " + " ".join(argv) + "\n")
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # quiet make
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)
        for line in proc.stdout:
            f.write(line)
            print(line, end="", flush=True)
        if proc.wait() != 0:
            raise subprocess.CalledProcessError(proc.returncode, argv)


def fetch_source(src_root: Path) -> tuple[Path, Path]:
    """The sdist (downloaded with pip where missing) and the llama.cpp tree unpacked from it."""
    src_root.mkdir(parents=True, exist_ok=True)
    sdist = src_root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        print(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON}'s sdist (pip) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(src_root)], check=True)  # fmt: skip
    top = src_root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    tree = top / "vendor" / "llama.cpp"
    done = top / ".unpacked"
    if not done.is_file():
        print(f"unpacking {sdist.name} ...", flush=True)
        prefix = f"{top.name}/"
        with tarfile.open(sdist) as tar:
            wanted = (prefix + "vendor/llama.cpp/", prefix + "CHANGELOG.md")
            members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
            tar.extractall(src_root, members=members, filter="data")
        done.touch()
    return sdist, tree


def verify(bench: Path, model: Path, threads: int) -> dict:
    """Run a prompt batch and a short decode (`llama-bench -p 64 -n 16`): a build with AMX kernels the VM lacks
    dies here with SIGILL. Returns the tok/s it measured; RuntimeError naming the signal otherwise."""
    argv = [str(bench), "-m", str(model), "-t", str(threads), "-p", "64", "-n", "16", "-r", "1", "-o", "json"]
    print("$ " + " ".join(argv), flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        why = f"exit code {proc.returncode}"
        if proc.returncode < 0:
            why = f"killed by {signal.Signals(-proc.returncode).name}"
            if -proc.returncode == signal.SIGILL:
                why += " (an instruction this CPU/VM does not execute: is AMX reported but not enabled?)"
        raise RuntimeError(f"the built llama-bench failed its check ({why}):\n{proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout)
    return {f"{'pp' if r['n_prompt'] else 'tg'}{r['n_prompt'] or r['n_gen']} tok/s": round(r["avg_ts"], 1)
            for r in rows}  # fmt: skip


def build(jobs: int = 2, threads: int = 2, rebuild: bool = False, root: Path | None = None) -> Build:
    """Build llama-server, llama-bench and llama-perplexity for this CPU into the cache (nothing to do where they
    are built; a build of an older list of binaries builds the missing ones in its build folder)."""
    target = Build.for_this_cpu(root)
    if target.ready() and not rebuild:
        print(f"llama.cpp peers already built: {target.bin}")
        print("  " + describe(target.record()))
        return target
    flags, cpu_model = this_cpu()
    print(f"CPU: {cpu_model}; reports AMX: {'yes' if has_amx(flags) else 'no'} -> "
          + " ".join(f"-D{k}={v}" for k, v in target.options.items()), flush=True)  # fmt: skip
    sdist, tree = fetch_source(target.root.parent / "src")
    changelog = (tree.parents[1] / "CHANGELOG.md").read_text()
    commit = upstream_commit(changelog, LLAMA_CPP_PYTHON)
    options = {**BASE_OPTIONS, **target.options, **({"LLAMA_BUILD_COMMIT": commit} if commit else {})}
    target.root.mkdir(parents=True, exist_ok=True)
    log = target.root / "build.log"
    log.write_text("")
    started = time.monotonic()
    run_streamed(cmake_configure_argv(tree, target.root / "build", options), log)
    run_streamed(cmake_build_argv(target.root / "build", jobs), log)
    target.bin.mkdir(exist_ok=True)
    for name in BINARIES:
        shutil.copy2(target.root / "build" / "bin" / name, target.bin / name)
    took = time.monotonic() - started

    from nanoseek.assets import fetch

    model = Path(fetch("smollm2"))
    record = {
        "tag": target.root.name.removeprefix(f"llama.cpp-{LLAMA_CPP_PYTHON}-"),
        "llama_cpp_python": LLAMA_CPP_PYTHON,
        "llama_cpp_commit": commit,
        "sdist_sha256": hashlib.sha256(sdist.read_bytes()).hexdigest(),
        "cmake_options": options,
        "cmake_cpu_options": target.options,
        "cpu_model": cpu_model,
        "cpu_isa_flags": sorted(flags & set(ISA_FLAGS)),
        "reports_amx": has_amx(flags),
        "compiler": subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
        "built_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "build_seconds": round(took),
        "verified": False,
    }
    target.record_path.write_text(json.dumps(record, indent=1))
    record["check"] = {"command": f"llama-bench -m {model.name} -t {threads} -p 64 -n 16 -r 1",
                       **verify(target.bin / "llama-bench", model, threads)}  # fmt: skip
    record["verified"] = True
    target.record_path.write_text(json.dumps(record, indent=1))
    print(f"built in {took / 60:.1f} min: {target.bin}")
    print("  " + describe(record))
    print(f"  check: {record['check']}")
    return target


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="nanoseek bench peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="cmake --build -j (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the llama-bench check")
    ap.add_argument("--rebuild", action="store_true", help="build again even where a verified build exists")
    ap.add_argument("--where", action="store_true", help="print this CPU's build folder and whether it is built")
    args = ap.parse_args(argv)
    if args.where:
        target = Build.for_this_cpu()
        print(target.bin)
        print("  " + (describe(target.record()) if target.ready() else f"not built: {BUILD_HINT}"))
        return
    build(jobs=args.jobs, threads=args.threads, rebuild=args.rebuild)


if __name__ == "__main__":
    main()
