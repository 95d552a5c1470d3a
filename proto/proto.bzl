"""bufferd_cc_proto: C++ (and gRPC) code from .proto files with Debian's protoc.

gRPC's own Bazel rules need downloads, so this macro runs /usr/bin/protoc with
/usr/bin/grpc_cpp_plugin in a genrule and wraps the output in a cc_library.
Proto import paths are relative to this package (`bufferd/v1/x.proto`).
"""

def bufferd_cc_proto(name, srcs, grpc_srcs = [], deps = [], visibility = None):
    """Generates a cc_library `name` from `srcs`.

    Args:
      name: the cc_library's name.
      srcs: .proto files, paths relative to this package.
      grpc_srcs: those of `srcs` that declare services.
      deps: other bufferd_cc_proto targets.
      visibility: of the cc_library.
    """
    outs_h = []
    outs_cc = []
    for src in srcs:
        base = src[:-len(".proto")]
        outs_h.append(base + ".pb.h")
        outs_cc.append(base + ".pb.cc")
    for src in grpc_srcs:
        base = src[:-len(".proto")]
        outs_h.append(base + ".grpc.pb.h")
        outs_cc.append(base + ".grpc.pb.cc")

    pkg = native.package_name()
    cmd = ("/usr/bin/protoc -I{pkg} --cpp_out=$(GENDIR)/{pkg} {srcs}").format(
        pkg = pkg,
        srcs = " ".join(["{}/{}".format(pkg, s) for s in srcs]),
    )
    if grpc_srcs:
        cmd += (" && /usr/bin/protoc -I{pkg} --grpc_out=$(GENDIR)/{pkg}" +
                " --plugin=protoc-gen-grpc=/usr/bin/grpc_cpp_plugin {srcs}").format(
            pkg = pkg,
            srcs = " ".join(["{}/{}".format(pkg, s) for s in grpc_srcs]),
        )

    native.genrule(
        name = name + "_gen",
        srcs = srcs,
        outs = outs_h + outs_cc,
        cmd = cmd,
    )
    native.cc_library(
        name = name,
        srcs = outs_cc,
        hdrs = outs_h,
        includes = ["."],
        copts = ["-Wno-unused-parameter", "-Wno-deprecated-declarations"],
        deps = deps + [
            "//tools/bazel/deps:grpc",
            "//tools/bazel/deps:protobuf",
        ],
        visibility = visibility,
    )
