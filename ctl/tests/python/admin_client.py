#!/usr/bin/env python3
"""An independent client of Twill's admin API, written from the .proto files alone.

Generates Python stubs from proto/twill/v1/*.proto with grpcio-tools into a temporary
directory, connects to the controller over mutual TLS with
grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain), calls
AdminService ListLeases (every page), GetConfig and Status, and prints one JSON document:

    {"leases": [...], "revision": N, "pages": N, "config": {...}, "status": {...}}

Field names are the proto field names; every field is present, defaults included
(64-bit integers as JSON numbers). Errors: one line on stderr, "error: CODE: message",
exit status 1; exit status 3 when grpcio or grpcio-tools is missing.

Usage:
    python3 admin_client.py --target 127.0.0.1:8474 --ca ca.crt \
        --cert admin-alice.crt --key admin-alice.key [--proto-dir proto] \
        [--server-name localhost] [--page-size 500]
"""

import argparse
import glob
import importlib
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "..", "proto"))


def generate_stubs(proto_dir, out_dir):
    """Runs grpc_tools.protoc over proto_dir/twill/v1/*.proto into out_dir."""
    from grpc_tools import protoc

    protos = sorted(glob.glob(os.path.join(proto_dir, "twill", "v1", "*.proto")))
    if not protos:
        raise SystemExit(f"error: no .proto files under {proto_dir}/twill/v1")
    # protoc wants the files relative to the include directory.
    rel = [os.path.relpath(p, proto_dir) for p in protos]
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
    ] + rel
    cwd = os.getcwd()
    try:
        os.chdir(proto_dir)
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise SystemExit(f"error: grpc_tools.protoc failed with status {rc}")
    # Make twill/ and twill/v1/ importable as packages.
    for d in ("twill", os.path.join("twill", "v1")):
        init = os.path.join(out_dir, d, "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()


def to_dict(msg):
    """A message as a dict of every field (defaults included), by proto field name;
    bytes as hex."""
    out = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED
        is_msg = f.message_type is not None
        if repeated:
            out[f.name] = [to_dict(v) if is_msg else v for v in value]
        elif is_msg:
            out[f.name] = to_dict(value) if msg.HasField(f.name) else None
        elif isinstance(value, bytes):
            out[f.name] = value.hex()
        else:
            out[f.name] = value
    return out


def read(path):
    with open(path, "rb") as f:
        return f.read()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="HOST:PORT of the controller's gRPC endpoint")
    ap.add_argument("--ca", required=True, help="CA certificate (PEM)")
    ap.add_argument("--cert", required=True, help="admin client certificate (PEM)")
    ap.add_argument("--key", required=True, help="its private key (PEM)")
    ap.add_argument("--proto-dir", default=DEFAULT_PROTO_DIR, help="directory holding twill/v1/*.proto")
    ap.add_argument("--server-name", help="name to check the controller's certificate against")
    ap.add_argument("--page-size", type=int, default=500)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    a = ap.parse_args()

    try:
        import grpc  # noqa: F401
        import grpc_tools  # noqa: F401
    except ImportError as e:
        print(f"error: {e}: install with `python3 -m pip install grpcio grpcio-tools`", file=sys.stderr)
        return 3
    import grpc

    with tempfile.TemporaryDirectory(prefix="twill-stubs-") as out_dir:
        generate_stubs(os.path.abspath(a.proto_dir), out_dir)
        sys.path.insert(0, out_dir)
        admin_pb2 = importlib.import_module("twill.v1.admin_pb2")
        admin_grpc = importlib.import_module("twill.v1.admin_pb2_grpc")

        creds = grpc.ssl_channel_credentials(
            root_certificates=read(a.ca),
            private_key=read(a.key),
            certificate_chain=read(a.cert),
        )
        options = []
        if a.server_name:
            options.append(("grpc.ssl_target_name_override", a.server_name))
        try:
            with grpc.secure_channel(a.target, creds, options=options) as channel:
                grpc.channel_ready_future(channel).result(timeout=a.timeout)
                stub = admin_grpc.AdminServiceStub(channel)
                leases, revision, pages, token = [], None, 0, ""
                while True:
                    resp = stub.ListLeases(
                        admin_pb2.ListLeasesRequest(page_size=a.page_size, page_token=token),
                        timeout=a.timeout,
                    )
                    pages += 1
                    if revision is None:
                        revision = resp.revision
                    leases.extend(to_dict(l) for l in resp.leases)
                    token = resp.next_page_token
                    if not token:
                        break
                config = stub.GetConfig(admin_pb2.GetConfigRequest(), timeout=a.timeout)
                status = stub.Status(admin_pb2.StatusRequest(), timeout=a.timeout)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except grpc.FutureTimeoutError:
            print(f"error: cannot connect to {a.target} within {a.timeout}s", file=sys.stderr)
            return 1

    json.dump(
        {
            "leases": leases,
            "revision": revision,
            "pages": pages,
            "config": to_dict(config),
            "status": to_dict(status),
        },
        sys.stdout,
        indent=2,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
