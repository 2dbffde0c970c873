"""A feeder.LogService client that is not icmp-guard's: Python grpcio with stubs that
grpc_tools.protoc generates from icmp-guard/proto/kubearmor.proto at start-up.

Used by tests/grpc.rs. Every mode prints JSON (one object per line) on stdout:

  watch ADDR FILTER OUT [--stall-until FILE] [--window BYTES]
      WatchAlerts(FILTER). Writes each alert to OUT as a JSON line (proto field names, empty
      fields left out: KubeArmor's JSON) and flushes. With --stall-until, stops reading right
      after the stream is open, until FILE exists (a slow client; the HTTP/2 connection stays
      alive). Ends when the stream ends and prints {"end": CODE, "details": ...}.
  relay ADDR SECONDS
      What kubearmor-relay-server does: WatchMessages("all"), WatchAlerts("policy"),
      WatchLogs("system") on one channel, then HealthCheck. Holds the three streams for
      SECONDS, prints {"open_after": [...], "health": RETVAL, "alerts": N}, then keeps reading
      until the streams end and prints each end.
  health ADDR NONCE
      HealthCheck; prints {"retval": N}.
  reflect ADDR
      Lists services through grpc.reflection.v1 (grpcurl 1.8 only speaks v1alpha).
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import grpc
from google.protobuf.json_format import MessageToDict

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "..", "proto")


def stubs():
    out = tempfile.mkdtemp(prefix="icmp-guard-stubs-")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", PROTO_DIR,
         "--python_out", out, "--grpc_python_out", out, "kubearmor.proto"],
        check=True,
    )
    sys.path.insert(0, out)
    import kubearmor_pb2
    import kubearmor_pb2_grpc
    return kubearmor_pb2, kubearmor_pb2_grpc


def channel(addr, options=()):
    options = list(options)
    if addr.startswith("unix:"):
        # grpcio sends the socket path as :authority, which the server's HTTP/2 library (h2)
        # refuses as malformed; grpc-go and kubelet send "localhost".
        options.append(("grpc.default_authority", "localhost"))
    return grpc.insecure_channel(addr, options=options)


def to_json(msg):
    return MessageToDict(msg, preserving_proto_field_name=True)


def say(obj):
    print(json.dumps(obj), flush=True)


def end_of(err):
    if err is None:
        return {"end": "OK", "details": ""}
    return {"end": err.code().name, "details": err.details()}


def watch(pb, rpc, addr, filt, out, stall_until=None, window=None):
    options = []
    if window:
        # A small read-ahead makes the stall reach the server quickly.
        options += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window)]
    stub = rpc.LogServiceStub(channel(addr, options))
    stream = stub.WatchAlerts(pb.RequestMessage(Filter=filt))
    err = None
    with open(out, "a") as f:
        try:
            first = True
            for alert in stream:
                if first and stall_until:
                    while not os.path.exists(stall_until):
                        time.sleep(0.05)
                    say({"resumed": True})
                first = False
                f.write(json.dumps(to_json(alert)) + "\n")
                f.flush()
        except grpc.RpcError as e:
            err = e
    say(end_of(err))


def relay(pb, rpc, addr, seconds):
    stub = rpc.LogServiceStub(channel(addr))
    streams = {
        "messages": stub.WatchMessages(pb.RequestMessage(Filter="all")),
        "alerts": stub.WatchAlerts(pb.RequestMessage(Filter="policy")),
        "logs": stub.WatchLogs(pb.RequestMessage(Filter="system")),
    }
    ended = {}
    counts = {k: 0 for k in streams}

    def read(name, stream):
        err = None
        try:
            for _ in stream:
                counts[name] += 1
        except grpc.RpcError as e:
            err = e
        ended[name] = dict(end_of(err), at=time.time())

    threads = [threading.Thread(target=read, args=kv, daemon=True) for kv in streams.items()]
    for t in threads:
        t.start()
    health = stub.HealthCheck(pb.NonceMessage(nonce=4242)).Retval
    say({"health": health, "opened": time.time()})
    time.sleep(seconds)
    say({
        "open_after": sorted(k for k in streams if k not in ended),
        "ended_early": ended,
        "health": stub.HealthCheck(pb.NonceMessage(nonce=7)).Retval,
        "alerts": counts["alerts"],
    })
    for t in threads:
        t.join()
    say({"ends": ended, "alerts": counts["alerts"]})


def reflect(addr):
    # The v1 and v1alpha messages are the same on the wire; only the method path differs.
    from grpc_reflection.v1alpha import reflection_pb2 as r
    ch = channel(addr)
    call = ch.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=r.ServerReflectionRequest.SerializeToString,
        response_deserializer=r.ServerReflectionResponse.FromString,
    )
    reqs = [
        r.ServerReflectionRequest(list_services=""),
        r.ServerReflectionRequest(file_containing_symbol="feeder.LogService"),
    ]
    services, files = [], []
    for resp in call(iter(reqs)):
        if resp.HasField("list_services_response"):
            services = [s.name for s in resp.list_services_response.service]
        if resp.HasField("file_descriptor_response"):
            files = len(resp.file_descriptor_response.file_descriptor_proto)
    say({"services": services, "feeder_files": files})


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "reflect":
        return reflect(args[0])
    pb, rpc = stubs()
    if mode == "watch":
        stall = window = None
        rest = args[3:]
        while rest:
            flag, value, rest = rest[0], rest[1], rest[2:]
            if flag == "--stall-until":
                stall = value
            elif flag == "--window":
                window = int(value)
        watch(pb, rpc, args[0], args[1], args[2], stall, window)
    elif mode == "relay":
        relay(pb, rpc, args[0], float(args[1]))
    elif mode == "health":
        stub = rpc.LogServiceStub(channel(args[0]))
        say({"retval": stub.HealthCheck(pb.NonceMessage(nonce=int(args[1]))).Retval})
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
