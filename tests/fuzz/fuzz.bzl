"""bufferd_fuzz_target: a libFuzzer target and the test that replays its seeds."""

def bufferd_fuzz_target(name, srcs, deps):
    """Declares NAME and NAME_corpus_test.

    With --config=fuzz (clang-14, see .bazelrc), NAME is a libFuzzer binary:
    tools/fuzz NAME SECONDS runs it. Otherwise NAME replays the files it is
    given, and NAME_corpus_test replays corpus/NAME/ in every `bazel test`
    (plain and under ASan).
    """
    native.cc_library(
        name = name + "_lib",
        testonly = True,
        srcs = srcs,
        deps = deps + ["//tests/fuzz:quiet"],
        alwayslink = True,
    )
    native.cc_binary(
        name = name,
        testonly = True,
        deps = [":" + name + "_lib"] + select({
            "//tests/fuzz:fuzzing": [],
            "//conditions:default": ["//testing:fuzz_replay_main"],
        }),
        linkopts = select({
            "//tests/fuzz:fuzzing": ["-fsanitize=fuzzer"],
            "//conditions:default": [],
        }),
    )
    native.cc_test(
        name = name + "_corpus_test",
        size = "small",
        deps = [
            ":" + name + "_lib",
            "//testing:fuzz_replay_main",
        ],
        args = ["tests/fuzz/corpus/" + name],
        data = native.glob(["corpus/" + name + "/*"]),
    )
