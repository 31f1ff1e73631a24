#!/usr/bin/env python3
"""Writes a small seed corpus for each fuzz target into DIR/<target>/ (made
at run time, not committed): well-formed inputs the fuzzer mutates from."""
import json, os, struct, sys

MAGIC, VERSION = 0x47445754, 1
CMD = dict(Hello=1, HelloAck=2, Pages=3, RoundEnd=4, State=5, Complete=6, Ready=7,
           Commit=8, Activated=9, Abort=10, PageRequest=11, PostCopy=12, DiskBlocks=13)

def frame(cmd, payload=b""):
    return struct.pack("<IHHII", MAGIC, VERSION, CMD[cmd], len(payload), 0) + payload

def run(gpa, pages, data=None):
    kind = 0 if data is None else 1
    return struct.pack("<QIB3x", gpa, pages, kind) + (data or b"")

def main(out):
    seeds = {
        "migration_stream": {
            "precopy": frame("Hello", json.dumps({"vmName": "a", "memory": [[0, 65536]], "config": {}}).encode())
            + frame("Pages", run(4096, 1, b"\x07" * 4096) + run(1 << 20, 2))
            + frame("RoundEnd", struct.pack("<IQ", 1, 3))
            + frame("State", b'{"version":1}') + frame("Complete") + frame("Commit"),
            "postcopy": frame("PostCopy", struct.pack("<QI4x", 0, 4))
            + frame("PageRequest", struct.pack("<QQ", 0, 4096)),
        },
        "saved_state": {"min": b'{"version":1,"config":{},"memory":{"regions":[]},"vm":{},"vcpus":[],"devices":{}}'},
        "control_request": {
            "status": b'{"v":1,"cmd":"status"}',
            "migrate": b'{"v":1,"cmd":"migrate-send","addr":"10.0.0.1:4000","max_downtime_ms":50}',
            "disk": b'{"v":1,"cmd":"disk-take-dirty","disk":0}',
        },
        "apiserver_request": {
            "create": b"POST /apis/godwit.dev/v1alpha1/namespaces/default/virtualmachines\napplication/json\n"
            + json.dumps({"apiVersion": "godwit.dev/v1alpha1", "kind": "VirtualMachine",
                          "metadata": {"name": "a", "labels": {"x": "y"}},
                          "spec": {"templateRef": {"name": "t"}, "cpu": 1, "memory": "64Mi"}}).encode()
            + b"\0PATCH /apis/godwit.dev/v1alpha1/namespaces/default/virtualmachines/a/status\napplication/merge-patch+json\n"
            + b'{"status":{"phase":"Running"}}'
            + b"\0GET /apis/godwit.dev/v1alpha1/virtualmachines?labelSelector=x%3Dy&limit=1\n\n",
            "apply": b"PATCH /api/v1/namespaces/default/configmaps/c?fieldManager=k&force=true\napplication/apply-patch+yaml\n"
            + b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: b\n"
            + b"\0DELETE /api/v1/namespaces/default/configmaps/c\napplication/json\n{\"propagationPolicy\":\"Foreground\"}",
        },
    }
    for target, files in seeds.items():
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(d, "seed-" + name), "wb") as f:
                f.write(data)

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "corpus")
