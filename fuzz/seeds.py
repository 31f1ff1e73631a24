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

# The device targets decode their input as ops (node-daemon/src/fuzz/):
# little-endian numbers, addresses and lengths prefixed by a selector byte
# (0: 16 bits follow; 3: 64 or 32 bits follow).
def u16(v): return struct.pack("<H", v)
def u32(v): return struct.pack("<I", v)
def u64(v): return struct.pack("<Q", v)
def gpa(a): return b"\0" + u16(a)
def ln(n): return b"\0" + u16(n)

def desc(addr, length, write=False, indirect=False):
    return gpa(addr) + ln(length) + bytes([(1 if write else 0) | (0xc0 if indirect else 0)])

def chain(op, *descs):
    return bytes([op, len(descs) - 1]) + b"".join(descs)

def patch(addr, data):
    return bytes([0]) + gpa(addr) + bytes([len(data)]) + data

def raw_desc(addr, length, flags, nxt):
    return u64(addr) + u32(length) + struct.pack("<HH", flags, nxt)

BLK = dict(IN=0, OUT=1, FLUSH=2, GET_ID=3)

def blk_request(kind, sector, data=(), hdr=0x1000, status=0x1800, hdr_len=None):
    """A virtio_blk request op body: data is (address, sectors) pairs."""
    b = bytes([BLK[kind]]) + (b"\0" + bytes([sector]) if sector < 256 else b"\1" + u64(sector))
    b += gpa(hdr) + (b"\0" if hdr_len is None else b"\1" + ln(hdr_len))
    b += bytes([len(data)])
    for addr, sectors in data:
        b += gpa(addr) + b"\0" + bytes([sectors])
    return b + gpa(status) + b"\0"

# virtio-mmio registers by index in REGS (node-daemon/src/fuzz/mmio.rs).
REG = {0x00: 0, 0x10: 4, 0x14: 5, 0x20: 6, 0x24: 7, 0x30: 8, 0x34: 9, 0x38: 10, 0x44: 11,
       0x50: 12, 0x60: 13, 0x64: 14, 0x70: 15, 0x80: 16, 0x84: 17, 0x90: 18, 0x94: 19,
       0xa0: 20, 0xa4: 21, 0xfc: 22, 0x100: 23}

def mmio_w(off, v): return bytes([2, REG[off], 2]) + u64(v)
def mmio_r(off, width=2): return bytes([1, REG[off], width])

def mmio_queue(sel, base):
    return (mmio_w(0x30, sel) + mmio_r(0x34) + mmio_w(0x38, 16) + mmio_w(0x80, base)
            + mmio_w(0x90, base + 0x100) + mmio_w(0xa0, base + 0x200) + mmio_w(0x44, 1))

def mmio_init(queues):
    b = mmio_w(0x70, 1) + mmio_w(0x70, 3) + mmio_w(0x14, 1) + mmio_r(0x10) + mmio_w(0x24, 1)
    b += mmio_w(0x20, 1) + mmio_w(0x70, 11)
    for sel in range(queues):
        b += mmio_queue(sel, 0x400 * sel)
    return b + mmio_w(0x70, 15)

def pio_out(index, value): return bytes([1, index, 0]) + u32(value)
def pio_in(index): return bytes([0, index, 0])
def ged_w(which, value): return bytes([1, which, 0]) + u64(value)
def ged_r(which, width=2): return bytes([0, which, width])

def device_seeds():
    frame = bytes(range(60))
    return {
        "virtio_queue": {
            # max 16, size 16, indices 0, no EVENT_IDX, table/avail/used
            "walk": bytes([4, 0]) + u16(0) + u16(0) + b"\0" + gpa(0x1000) + gpa(0x1100) + gpa(0x1200)
            + chain(1, desc(0x2000, 16), desc(0x2100, 512, True), desc(0x2300, 1, True))
            + chain(1, desc(0x2400, 64)) + bytes([2]) + u32(513) + bytes([3]),
            "indirect": bytes([4, 0]) + u16(0) + u16(0) + b"\0" + gpa(0x1000) + gpa(0x1100) + gpa(0x1200)
            + patch(0x3000, raw_desc(0x2000, 16, 1, 1) + raw_desc(0x2100, 8, 2, 0))
            + chain(1, desc(0x3000, 32, indirect=True)) + bytes([2]) + u32(8),
            "event_idx": bytes([3, 1]) + u16(0xfffe) + u16(0xfffe) + b"\1" + gpa(0x800) + gpa(0x900) + gpa(0xa00)
            + chain(1, desc(0x2000, 4)) + chain(1, desc(0x2000, 4)) + bytes([4, 1, 2]) + u32(4) + bytes([3]),
        },
        "virtio_blk": {
            "rw": bytes([2]) + bytes([1]) + blk_request("OUT", 2, [(0x3000, 2)])
            + bytes([3, 1]) + blk_request("IN", 2, [(0x4000, 2)], hdr=0x1010, status=0x1801)
            + bytes([1]) + blk_request("FLUSH", 0, hdr=0x1020, status=0x1802)
            + bytes([1]) + blk_request("GET_ID", 0, [(0x5000, 0)], hdr=0x1030, status=0x1803)
            + bytes([3, 4]),
            "edges": bytes([0, 1]) + blk_request("IN", 127, [(0x3000, 2)])
            + bytes([1]) + blk_request("OUT", 0, [(0x3000, 1)], hdr=0x1010, hdr_len=8, status=0x1801)
            + bytes([1]) + blk_request("IN", 0, [], hdr=0x1020, status=0x1802) + bytes([3]),
            "read_only": bytes([1, 1]) + blk_request("OUT", 0, [(0x3000, 1)]) + bytes([3]),
        },
        "virtio_net": {
            "tx": patch(0x2100, frame) + chain(1, desc(0x2000, 12), desc(0x2100, 60)) + bytes([3])
            + patch(0x3000, bytes(12) + frame[:40]) + chain(1, desc(0x3000, 52)) + bytes([3]),
            "rx": chain(2, desc(0x4000, 1526, True)) + bytes([4]) + u16(60) + frame
            + chain(2, desc(0x5000, 8, True), desc(0x5100, 100, True)) + bytes([4]) + u16(60) + frame
            + bytes([5]),
        },
        "virtio_mmio": {
            "block": bytes([0]) + mmio_init(1) + bytes([3]) + blk_request("OUT", 1, [(0x3000, 1)])
            + mmio_w(0x50, 0) + mmio_r(0x60) + mmio_w(0x64, 1) + mmio_r(0x100, 3) + mmio_r(0xfc)
            + bytes([5]) + u32(0) + u32(15) + bytes([1]) + u16(0) + u16(0) + mmio_w(0x70, 0),
            "net": bytes([1]) + mmio_init(2) + patch(0x2100, frame)
            + bytes([4, 1, 1]) + desc(0x2000, 12) + desc(0x2100, 60) + mmio_w(0x50, 1)
            + mmio_w(0x50, 0) + mmio_r(0x100, 3),
        },
        "port_io": {
            "serial": pio_out(3, 0x80) + pio_out(0, 1) + pio_out(1, 0) + pio_out(3, 3) + pio_out(1, 0x0f)
            + pio_out(0, ord("H")) + pio_out(0, ord("i")) + bytes([2, 3]) + b"abc"
            + pio_in(5) + pio_in(0) + pio_in(2) + pio_out(7, 0x5a) + pio_in(7) + bytes([4])
            + bytes([3]) + bytes([1, 0, 0x0f, 1, 3, 0x60, 8, 0xb0, 0]) + bytes([3]) + b"xyz" + pio_in(0),
            "exits": pio_in(8) + pio_in(9) + pio_out(8, 0xfe) + pio_out(9, 0xfe) + pio_out(10, 0x31),
        },
        "acpi_registers": {
            "button": bytes([2]) + ged_r(0) + ged_r(0) + bytes([3]) + u32(2) + bytes([0x80]) + ged_r(0, 3),
            "sleep": ged_w(1, 3 << 2 | 1 << 5) + ged_w(1, 5 << 2 | 1 << 5) + ged_r(2, 0) + ged_w(2, 0x80)
            + ged_r(2, 0) + ged_w(3, 1) + ged_w(3, 0x42),
        },
    }

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
            # Server-side apply by two managers to one list-type map
            # (status.conditions keyed on type), then one drops its own.
            "apply-conditions": b"POST /apis/godwit.dev/v1alpha1/namespaces/default/virtualmachines\napplication/json\n"
            + json.dumps({"apiVersion": "godwit.dev/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": "a"},
                          "spec": {"templateRef": {"name": "t"}, "disks": [{"name": "d", "source": {"blank": {"size": "1Gi"}}}]}}).encode()
            + b"".join(
                b"\0PATCH /apis/godwit.dev/v1alpha1/namespaces/default/virtualmachines/a/status?fieldManager=" + m
                + b"\napplication/apply-patch+yaml\n"
                + json.dumps({"apiVersion": "godwit.dev/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": "a"},
                              "status": {"conditions": [{"type": t, "status": "True", "reason": "R", "message": "",
                                                         "lastTransitionTime": "2026-01-01T00:00:00Z"}] if t else []}}).encode()
                for m, t in [(b"a", "X"), (b"b", "Y"), (b"a", None)]),
            # kubectl create configmap: a protobuf body in the k8s envelope.
            "protobuf": b"POST /api/v1/namespaces/default/configmaps\napplication/vnd.kubernetes.protobuf\n"
            + b"k8s\x00\x0a\x0f\x0a\x02v1\x12\x09ConfigMap\x12\x12\x0a\x03\x0a\x01c\x12\x0b\x0a\x01a\x12\x06value1",
        },
    }
    seeds.update(device_seeds())
    for target, files in seeds.items():
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(d, "seed-" + name), "wb") as f:
                f.write(data)

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "corpus")
