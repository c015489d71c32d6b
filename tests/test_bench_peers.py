"""The real peers (`make peers`): which llama.cpp build this CPU gets, the peers' command lines, and the message
when they are not built. Pure functions and fake build folders: nothing here builds llama.cpp or needs network."""

from __future__ import annotations

import json

import pytest

from nanoseek.bench import decode, peers, serve

# /proc/cpuinfo "flags" lines (trimmed) of the machines these benchmarks meet
XEON_AMX = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht syscall "
    "nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 "
    "pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch "
    "fsgsbase bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb "
    "avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd arat "
    "avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg "
    "avx512_vpopcntdq rdpid movdiri movdir64b fsrm md_clear serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile "
    "amx_int8 arch_capabilities"
)
EPYC = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx "
    "mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid tsc_known_freq pni "
    "pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm "
    "cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext bmi1 avx2 smep bmi2 erms invpcid "
    "avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec "
    "xgetbv1 xsaves avx512_bf16 clzero xsaveerptr wbnoinvd arat avx512vbmi umip pku ospke avx512_vbmi2 gfni vaes "
    "vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm"
)
AVX2_ONLY_AMX = "fpu sse sse2 ssse3 sse4_1 sse4_2 fma avx f16c avx2 bmi2 amx_tile amx_int8"  # made up: no AVX512


def cpuinfo(flags: str) -> str:
    return f"processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n"


def test_cpu_flags_are_read_from_cpuinfo():
    flags = peers.cpu_flags(cpuinfo(XEON_AMX))
    assert {"avx512f", "avx512_vnni", "amx_tile"} <= flags and "flags" not in flags
    assert peers.cpu_flags("processor : 0\nmodel name : x\n") == set()


def test_amx_is_detected():
    assert peers.has_amx(peers.cpu_flags(cpuinfo(XEON_AMX)))
    assert peers.has_amx(peers.cpu_flags(cpuinfo(AVX2_ONLY_AMX)))
    assert not peers.has_amx(peers.cpu_flags(cpuinfo(EPYC)))


def test_a_cpu_without_amx_builds_native():
    assert peers.cmake_cpu_options(peers.cpu_flags(cpuinfo(EPYC))) == {"GGML_NATIVE": "ON"}


def test_a_cpu_reporting_amx_builds_its_isa_explicitly_with_amx_off():
    options = peers.cmake_cpu_options(peers.cpu_flags(cpuinfo(XEON_AMX)))
    assert options["GGML_NATIVE"] == "OFF"
    for on in ("GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2", "GGML_AVX_VNNI",
               "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"):  # fmt: skip
        assert options[on] == "ON", on
    assert all(options[amx] == "OFF" for amx in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"))


def test_an_option_is_on_only_where_the_cpu_lists_all_it_needs():
    options = peers.cmake_cpu_options(peers.cpu_flags(cpuinfo(AVX2_ONLY_AMX)))
    assert options["GGML_NATIVE"] == "OFF" and options["GGML_AVX2"] == options["GGML_FMA"] == "ON"
    assert options["GGML_AVX512"] == options["GGML_AVX512_VNNI"] == options["GGML_AVX_VNNI"] == "OFF"
    # AVX512 needs F, CD, VL, DQ and BW (llama.cpp compiles GGML_AVX512 with all five)
    flags = peers.cpu_flags(cpuinfo(XEON_AMX)) - {"avx512vl"}
    assert peers.cmake_cpu_options(flags)["GGML_AVX512"] == "OFF"


def test_each_cpu_gets_a_build_folder_of_its_own():
    tags = {}
    for name, flags in (("xeon", XEON_AMX), ("epyc", EPYC), ("avx2", AVX2_ONLY_AMX)):
        parsed = peers.cpu_flags(cpuinfo(flags))
        tags[name] = peers.build_tag(peers.cmake_cpu_options(parsed), parsed)
        assert tags[name] == peers.build_tag(peers.cmake_cpu_options(parsed), parsed)  # stable
    assert tags["epyc"].startswith("native-") and tags["xeon"].startswith("noamx-")
    assert len(set(tags.values())) == 3
    # a flag that decides nothing (hypervisor, sha_ni) does not change the build
    parsed = peers.cpu_flags(cpuinfo(EPYC))
    assert peers.build_tag({"GGML_NATIVE": "ON"}, parsed | {"sha_ni", "foo"}) == tags["epyc"]


def test_cmake_command_lines(tmp_path):
    configure = peers.cmake_configure_argv(tmp_path / "src", tmp_path / "build", {"GGML_NATIVE": "OFF"})
    assert configure[:5] == ["cmake", "-S", str(tmp_path / "src"), "-B", str(tmp_path / "build")]
    assert "-DGGML_NATIVE=OFF" in configure
    assert peers.cmake_build_argv(tmp_path, 2) == ["cmake", "--build", str(tmp_path), "-j", "2", "--target",
                                                   "llama-server", "llama-bench", "llama-perplexity"]  # fmt: skip


def test_the_vendored_commit_is_read_from_the_changelog():
    changelog = ("## [Unreleased]\n\n## [0.3.36]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n\n"
                 "## [0.3.35]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@4df29be4f\n")  # fmt: skip
    assert peers.upstream_commit(changelog, "0.3.36") == "0c1e57098"
    assert peers.upstream_commit(changelog, "0.3.35") == "4df29be4f"
    assert peers.upstream_commit(changelog, "0.3.1") is None


def fake_build(root, verified: bool = True) -> peers.Build:
    build = peers.Build(root / "llama.cpp-x-native-1234", {"GGML_NATIVE": "ON"}, frozenset())
    build.bin.mkdir(parents=True)
    for name in peers.BINARIES:
        (build.bin / name).write_text("")
    record = {"tag": "native-1234", "llama_cpp_python": "0.3.36", "llama_cpp_commit": "0c1e57098",
              "cmake_cpu_options": {"GGML_NATIVE": "ON"}, "built_at": "today", "verified": verified}  # fmt: skip
    build.record_path.write_text(json.dumps(record))
    return build


def test_a_missing_peer_says_to_run_make_peers(tmp_path):
    build = peers.Build(tmp_path / "llama.cpp-x-native-1234", {"GGML_NATIVE": "ON"}, frozenset())
    with pytest.raises(peers.PeerMissing, match=r"llama-server is not built for this CPU .*run `make peers`"):
        peers.find_peer("llama-server", build)
    assert not build.ready()


def test_an_unverified_build_counts_as_missing(tmp_path):
    with pytest.raises(peers.PeerMissing, match="make peers"):
        peers.find_peer("llama-bench", fake_build(tmp_path, verified=False))


def test_a_built_peer_is_found_with_its_record(tmp_path):
    build = fake_build(tmp_path)
    assert build.ready()
    path, record = peers.find_peer("llama-bench", build)
    assert path == build.bin / "llama-bench"
    shown = peers.describe(record)
    assert "0c1e57098" in shown and "0.3.36" in shown and "GGML_NATIVE=ON" in shown
    noamx = peers.describe({**record, "cmake_cpu_options": {"GGML_NATIVE": "OFF", "GGML_AVX2": "ON",
                                                            "GGML_AMX_INT8": "OFF"}})  # fmt: skip
    assert "GGML_NATIVE=OFF (AVX2 ON; AMX OFF" in noamx


def test_a_second_build_is_instant(tmp_path, monkeypatch, capsys):
    build = fake_build(tmp_path)
    monkeypatch.setattr(peers.Build, "for_this_cpu", classmethod(lambda cls, root=None: build))
    monkeypatch.setattr(peers, "fetch_source", lambda *a: pytest.fail("a built peer must not be fetched again"))
    assert peers.build() is build
    assert "already built" in capsys.readouterr().out


@pytest.fixture
def no_peers_built(tmp_path, monkeypatch):
    empty = peers.Build(tmp_path / "llama.cpp-x-native-1234", {"GGML_NATIVE": "ON"}, frozenset())
    monkeypatch.setattr(peers.Build, "for_this_cpu", classmethod(lambda cls, root=None: empty))


def test_serve_without_llama_server_is_a_note(no_peers_built, tmp_path):
    specs, notes = serve.peer_specs(["llama-server"], tmp_path / "m.gguf", 2, 2048)
    assert specs == [] and len(notes) == 1
    assert notes[0].startswith("llama-server MISSING") and "make peers" in notes[0]


def test_llama_server_command_line(tmp_path):
    argv = serve.llama_server_argv(tmp_path / "llama-server", tmp_path / "m.gguf", 8123, 2, 16, 256)
    assert argv[0] == str(tmp_path / "llama-server")

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert value("-m") == str(tmp_path / "m.gguf") and value("--port") == "8123" and value("--host") == "127.0.0.1"
    assert value("-t") == value("-tb") == "2" and value("-np") == "16" and value("-c") == str(16 * 256)
    assert "--cont-batching" in argv


def test_llama_server_runs_each_level_with_its_slots(tmp_path):
    build = fake_build(tmp_path)
    path, record = peers.find_peer("llama-server", build)
    spec = serve.llama_server_spec(path, record, tmp_path / "m.gguf", 2, serve.slot_context(40, 64))
    assert spec.per_level and spec.label == "llama-server" and spec.equal_work(64) == {"ignore_eos": True}
    assert spec.tokenize_path == "/tokenize" and spec.tokenize_field == "content"
    argv = spec.argv(8123, 64)
    assert argv[argv.index("-np") + 1] == "64" and argv[argv.index("-c") + 1] == str(64 * 256)
    assert "0c1e57098" in spec.build
    assert serve.slot_context(40, 64) == 256 and serve.slot_context(200, 128) == 768


def test_serve_defaults_to_llama_server_and_the_queueing_baseline():
    args = serve.parse_args(["m.gguf"])
    assert args.peers == ["llama-server", "llama.cpp-queue"] and args.concurrency == [1, 4, 16, 64]
    assert set(serve.PEER_NOTES) == set(serve.PEERS)


def test_llama_bench_command_line_and_output(tmp_path):
    argv = decode.llama_bench_argv(tmp_path / "llama-bench", tmp_path / "m.gguf", 2, 200, 128)

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert value("-p") == "0" and value("-n") == "128" and value("-d") == "200" and value("-t") == "2"
    assert value("-o") == "json" and value("-r") == "1"
    out = json.dumps([{"n_prompt": 0, "n_gen": 128, "n_depth": 200, "avg_ts": 123.4, "stddev_ts": 0.0}])
    assert decode.llama_bench_tok_s(out) == pytest.approx(123.4)
    with pytest.raises(RuntimeError, match="one tg result"):
        decode.llama_bench_tok_s("[]")


def test_decode_ratios_are_per_round():
    assert decode.per_round_ratios([100.0, 90.0, 120.0], [50.0, 90.0, 60.0]) == [2.0, 1.0, 2.0]
    assert decode.parse_args(["smollm2"]).peers == ["llama-bench", "llama.cpp", "transformers"]


def test_llama_bench_runs_as_a_process(tmp_path):
    """A stand-in binary that prints llama-bench's JSON; one that dies says so (no crash of the benchmark's own)."""
    fake = tmp_path / "llama-bench"
    fake.write_text('#!/bin/sh\necho \'[{"n_prompt": 0, "n_gen": 128, "n_depth": 200, "avg_ts": 99.5}]\'\n')
    fake.chmod(0o755)
    peer = decode.LlamaBench(fake, tmp_path / "m.gguf", 2, 200, 128)
    assert peer.run() == pytest.approx(99.5)
    assert peer.command().startswith("llama-bench -m ") and "-d 200" in peer.command()
    fake.write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    with pytest.raises(RuntimeError, match="llama-bench failed .exit code 3.: boom"):
        peer.run()
